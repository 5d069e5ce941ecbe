"""Language modelling as an objective of the one loop: gate a decoder on plain text, measure perplexity.

The paper's "post-training" mode for Llama: gates on every linear layer of the blocks, trained
on the causal-LM loss (no task head), cosine learning-rate schedule; evaluated by perplexity
(perplexity.py). It shares the `Method` abstraction, so `--method gates` (and any method that
only needs the model) works unchanged; like classification it resumes (`finegates train --resume`).

RUN_DIR (the loop's layout, loop.py, plus "objective": "lm" in config.json):
  config.json, metrics.jsonl (one line per evaluation), trace.jsonl, trainable.safetensors,
  checkpoint/state.pt (until complete), metrics.json (final; dev.perplexity, dense perplexity, window/stride).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from ..core.model import count_params, count_trainable
from ..data.outputs import TRAIN_RUN
from ..data.text import eval_ids, pack, tokenize_corpus
from ..loaders import load_causal_lm, load_tokenizer, resolve
from .checkpoint import FORMAT_VERSION, model_fingerprint, read_checkpoint
from .config import LMConfig
from .distill import frozen_copy, lm_kd_loss
from .loop import Objective, finish_run_dir, fit, in_run_folder
from .plan import LoopState
from .methods import get_method
from .perplexity import perplexity
from .recipes import get_recipe
from .runtime import autocast, launch, peak_memory_mb, versions
from .schedules import lr_lambda


class LanguageModelling(Objective):
    """Blocks of a token stream, the causal-LM loss, sliding-window perplexity on held-out text."""

    graph_safe = True  # fixed-length blocks, the model's own loss

    def __init__(self, blocks: torch.Tensor, eval_stream: torch.Tensor, window: int, stride: int,
                 eval_batch_size: int, amp: bool = True, progress: bool = False, name: str = "lm",
                 steps_per_epoch: int = 1) -> None:
        self.blocks, self.eval_stream, self.window, self.stride = blocks, eval_stream, window, stride
        self.eval_batch_size, self.amp, self.progress = eval_batch_size, amp, progress
        self.steps_per_epoch = steps_per_epoch
        self.name, self.n_examples = name, len(blocks)

    def batch(self, idx, device):
        x = self.blocks[idx].to(device)
        return {"input_ids": x, "labels": x}

    def loss(self, runner: nn.Module, batch: dict, idx: list[int]):
        with autocast(batch["input_ids"].device):
            out = runner(**batch, use_cache=False)
        task_loss = out.loss.float()
        return task_loss, task_loss, out, {}

    def perplexity(self, model: nn.Module, ids: torch.Tensor | None = None) -> dict:
        ids = self.eval_stream if ids is None else ids
        return perplexity(model, ids, self.window, self.stride, self.eval_batch_size, self.progress, self.amp)

    def evaluate(self, model, state: LoopState) -> dict:
        return {"epoch": round(state.step / self.steps_per_epoch, 3),
                "dev": self.perplexity(model), "train_loss": state.task_loss}

    def describe(self, record: dict) -> str:
        return f"step {record['step']}: perplexity {record['dev']['perplexity']:.3f} (window {self.window}, " \
               f"stride {self.stride})"


def train_lm(cfg: LMConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Train on the LM loss, evaluate perplexity `cfg.evals` times, write the run directory (new,
    empty or resumed; `overwrite=True` replaces an earlier run there once the new one is complete:
    data/outputs.py)."""
    return in_run_folder(_train_lm, cfg, TRAIN_RUN, (cfg.model, *cfg.text_files, cfg.eval_text_file), resume, overwrite)


def _train_lm(cfg: LMConfig, resume: bool, target: Path) -> dict:
    """`train_lm` writing into `cfg.out` (the run directory, or a staging folder that becomes `target`)."""
    if resume and (cfg.out / "metrics.json").is_file():
        return json.loads((cfg.out / "metrics.json").read_text(encoding="utf-8"))  # already complete
    procs, device = launch(cfg.seed, cfg.device, cfg.batch_size)
    location = resolve(cfg.model)
    tokenizer = load_tokenizer(location)
    stream, file_tokens = tokenize_corpus(cfg.text_files, tokenizer, cfg.drop_unk)
    blocks_ = pack(stream, cfg.block_size)
    eval_stream = eval_ids(cfg.eval_text_file, tokenizer, cfg.eval_tokens)
    model = load_causal_lm(location)
    fingerprint = model_fingerprint(model)
    model.to(device)

    per_epoch = math.ceil(len(blocks_) / cfg.batch_size)
    total = cfg.total_steps(per_epoch)
    kd_weight = lm_kd_weight(cfg)
    args = (blocks_, eval_stream, cfg.window, cfg.stride, cfg.eval_batch_size, cfg.eval_amp, cfg.progress)
    kw = {"name": f"{cfg.method} lm", "steps_per_epoch": per_epoch}
    objective = LanguageModelling(*args, **kw) if not kd_weight else \
        DistilledLanguageModelling(*args, **kw, teacher=frozen_copy(model), weight=kd_weight, temperature=cfg.kd_temperature)
    dense = objective.perplexity(model) if cfg.eval_dense and procs.main else None

    method = get_method(cfg.method)
    dense_params = count_params(model)
    groups = method.prepare(model, cfg, total)
    trainable_params = count_trainable(model)  # before `finish` (which may merge adapters away)
    model.to(device)
    for g in groups:
        g["base_lr"] = g["lr"]
    config = {
        "format_version": FORMAT_VERSION, "objective": "lm", "train": {**asdict(cfg), "out": str(target)},
        "model_location": location,
        "task": "lm", "fingerprint": fingerprint, "train_tokens": int(blocks_.numel()), "kd_weight": kd_weight,
        "eval_tokens": int(eval_stream.numel()), "method_config": method.config(), "versions": versions(),
    }
    eval_at = {max(1, round(total * (i + 1) / cfg.evals)) for i in range(cfg.evals)} | {total}
    schedule = lr_lambda(cfg.schedule, total, cfg.warmup_steps)
    plan = cfg.plan(total, eval_at, steps_per_epoch=per_epoch, lr_factor=lambda step, group: schedule(step),
                    desc=objective.name)
    ckpt = read_checkpoint(cfg.out) if resume else None
    st = fit(model, method, groups, objective, plan, procs=procs, device=device, fingerprint=fingerprint,
             config=config, ckpt=ckpt)
    method.finish(model)

    final = st.history[-1]
    return finish_run_dir(cfg.out, {
        "task": "lm", "objective": "lm", "method": cfg.method, "seed": cfg.seed, "steps": st.step,
        "dev": final["dev"], "score": -final["dev"]["perplexity"],  # higher is better, as for classification
        "perplexity": final["dev"]["perplexity"], "dense_perplexity": dense["perplexity"] if dense else None,
        "dense": dense, "window": cfg.window, "stride": cfg.stride, "eval_text_file": str(cfg.eval_text_file),
        "train_text_files": [str(p) for p in cfg.text_files], "train_tokens": int(blocks_.numel()),
        "train_file_tokens": file_tokens, "drop_unk": cfg.drop_unk, "tokens_seen": st.step * cfg.batch_size * cfg.block_size,
        "kd_weight": kd_weight, "kd_temperature": cfg.kd_temperature if kd_weight else None,
        "trainable_params": trainable_params, "total_params": dense_params,
        **st.step_metrics(),
        "peak_memory_mb": st.peak_mb if st.peak_mb is not None else peak_memory_mb(device), "device": str(device),
        "complete": True,
        "resumed_from_step": ckpt["step"] if ckpt is not None else None, "processes": procs.world,
        **method.summary(model),
    }, procs)


def lm_kd_weight(cfg: LMConfig) -> float:
    """The weight of the KL to the dense model: `--kd-weight`, else the gates recipe's (0 for other methods)."""
    if cfg.kd_weight is not None:
        return cfg.kd_weight
    if cfg.method != "gates":
        return 0.0
    return get_recipe(cfg.recipe, cfg.recipe_options).kd_weight


class DistilledLanguageModelling(LanguageModelling):
    """The LM loss mixed with the KL to the dense starting model's next-token distribution:
    `(1 - w) * LM loss + w * T^2 KL(teacher || student)` at every position (distill.lm_kd_loss).

    The teacher is a frozen copy of the model taken before the method gates it (`frozen_copy`):
    it stays the dense model whatever trains, and it is rebuilt the same way when a run resumes.
    It runs under the same autocast as the student; `train_loss` stays the LM loss alone."""

    def __init__(self, *args, teacher: nn.Module, weight: float, temperature: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.teacher, self.weight, self.temperature = teacher, weight, temperature

    def loss(self, runner: nn.Module, batch: dict, idx: list[int]):
        with autocast(batch["input_ids"].device):
            out = runner(**batch, use_cache=False)
            with torch.no_grad():
                teacher = self.teacher(input_ids=batch["input_ids"], use_cache=False).logits
        lm_loss = out.loss.float()
        kd = lm_kd_loss(out.logits, teacher, self.temperature)
        return (1.0 - self.weight) * lm_loss + self.weight * kd, lm_loss, out, {"kd": kd.detach()}
