"""Classification (GLUE or own data) as an objective of the one loop: batches of tokenized
examples, the model's own loss (mixed with a teacher's logits under `--teacher`), dev scores."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from safetensors.torch import load_file, save_file

from ..core.distributed import gather
from ..core.fits import check_token_types, max_tokens
from ..core.model import count_params, count_trainable
from ..data import metrics as M
from ..data.encoding import Encoded, load_task
from ..data.files import atomic_write
from ..data.outputs import TRAIN_RUN
from ..data.tasks import Example, TaskSpec
from ..loaders import load_classifier, load_config, load_teacher, load_tokenizer, resolve
from .checkpoint import FORMAT_VERSION, model_fingerprint, read_checkpoint
from .config import TrainConfig
from .distill import TeacherLogits
from .loop import Objective, finish_run_dir, fit, in_run_folder
from .methods import get_method
from .plan import LoopState
from .runtime import autocast, launch, peak_memory_mb, versions


class Classification(Objective):
    """Tokenized examples, the head's loss (+ the teacher's), dev scores with the task's metrics."""

    def __init__(self, spec: TaskSpec, train: Encoded, evals: dict[str, Encoded], cfg: TrainConfig,
                 teacher: TeacherLogits | None, device: torch.device, steps_per_epoch: int) -> None:
        self.spec, self.data, self.evals, self.teacher = spec, train, evals, teacher
        self.eval_batch_size, self.device, self.steps_per_epoch = cfg.eval_batch_size, device, steps_per_epoch
        self.name, self.n_examples = f"{cfg.method} {spec.name}", len(train)

    @property
    def graph_safe(self) -> bool:
        return self.teacher is None  # the teacher's logits are looked up by example index, on the host

    def batch(self, idx, device):
        return {k: v.to(device) for k, v in self.data.batch(idx, full_length=self.static_shapes).items()}

    def loss(self, runner: nn.Module, batch: dict, idx: list[int]):
        loss, task_loss, out, logs = super().loss(runner, batch, idx)
        if self.teacher is not None:
            loss, logs["kd"] = self.teacher.mix(task_loss, out.logits.float(), idx)
        return loss, task_loss, out, logs

    def evaluate(self, model, state: LoopState) -> dict:
        scores = evaluate(model, self.spec, self.evals, self.eval_batch_size, self.device)
        return {"epoch": round(state.step / self.steps_per_epoch, 3), "dev": scores,
                "score": M.main_score(scores, _metric_keys(self.spec, self.evals))}

    def describe(self, record: dict) -> str:
        return f"step {record['step']} epoch {record['epoch']}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in record["dev"].items())


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Train, evaluate each epoch, write the run directory; return the final metrics.

    `resume=True` goes on from RUN_DIR/checkpoint (checkpoint.py); on CPU the result is
    bit-identical to an uninterrupted run. Without a checkpoint it starts from step 0.
    The run directory must be new, empty, or this run resumed; `overwrite=True` replaces an
    earlier run there once the new one is complete (data/outputs.py: the rule every command follows).
    """
    inputs = (cfg.model, cfg.data_dir, cfg.train_file, cfg.eval_file, cfg.teacher)
    return in_run_folder(_train, cfg, TRAIN_RUN, inputs, resume, overwrite)


def _train(cfg: TrainConfig, resume: bool, target: Path) -> dict:
    """`train` writing into `cfg.out` (the run directory, or a staging folder that becomes `target`)."""
    if resume and (cfg.out / "metrics.json").is_file():
        return json.loads((cfg.out / "metrics.json").read_text(encoding="utf-8"))  # already complete
    procs, device = launch(cfg.seed, cfg.device, cfg.batch_size)
    spec, train_ex, eval_ex = load_task(cfg)
    location = resolve(cfg.model)
    load_config(location)  # an unsupported model folder fails here, in one line, before the tokenizer
    tokenizer = load_tokenizer(location)
    model = load_classifier(location, spec.num_labels, spec.regression, cfg.pooling)
    fingerprint = model_fingerprint(model)
    limit = max_tokens(model, tokenizer)  # longer inputs would overflow the position table
    max_length = min(cfg.max_length, limit) if limit else cfg.max_length
    train_data = Encoded(train_ex, tokenizer, max_length, spec.regression)
    evals = {k: Encoded(v, tokenizer, max_length, spec.regression) for k, v in eval_ex.items()}
    check_token_types(model, (f for d in (train_data, *evals.values()) for f in d.features), location)

    data_fp = _data_fingerprint(train_ex)
    teacher = _teacher(cfg, train_data, data_fp, spec, device)  # every process: each looks up its own slice
    steps_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
    total_steps = cfg.total_steps(steps_per_epoch)
    method = get_method(cfg.method)
    dense_params = count_params(model)
    groups = method.prepare(model, cfg, total_steps)
    trainable_params = count_trainable(model)  # before `finish` (which may merge adapters away)
    model.to(device)

    config = {
        "format_version": FORMAT_VERSION,
        "train": {**asdict(cfg), "out": str(target)}, "model_location": location, "task": spec.name,
        "labels": spec.labels,
        "metrics": spec.metrics, "num_labels": spec.num_labels, "regression": spec.regression,
        "method_config": method.config(), "versions": versions(),
        "fingerprint": fingerprint,
    }
    ckpt = read_checkpoint(cfg.out) if resume else None
    objective = Classification(spec, train_data, evals, cfg, teacher, device, steps_per_epoch)
    plan = cfg.plan(total_steps, _eval_points(total_steps, steps_per_epoch, cfg.evals_per_epoch),
                    steps_per_epoch=steps_per_epoch, desc=objective.name)
    st = fit(model, method, groups, objective, plan, procs=procs, device=device, fingerprint=fingerprint,
             config=config, ckpt=ckpt, data=data_fp)
    method.finish(model)

    final = st.history[-1]
    peak = st.peak_mb if st.peak_mb is not None else peak_memory_mb(device)
    best = max(st.history, key=lambda r: r["score"])
    return finish_run_dir(cfg.out, {
        "task": spec.name, "method": cfg.method, "seed": cfg.seed, "steps": st.step,
        "dev": final["dev"], "score": final["score"], "best": {"step": best["step"], "dev": best["dev"]},
        "trainable_params": trainable_params, "total_params": dense_params,
        **st.step_metrics(), "peak_memory_mb": peak,
        "peak_memory_mb_per_process": gather(peak, procs), "device": str(device), "skipped_nonfinite": st.skipped,
        "resumed_from_step": ckpt["step"] if ckpt is not None else None,
        "processes": procs.world, "samples_per_second": st.step * cfg.batch_size / max(st.t_train, 1e-9),
        **method.summary(model), "complete": True,
    }, procs)


@torch.no_grad()
def predict_logits(model, data: Encoded, batch_size: int, device, progress: bool = False,
                   desc: str = "eval") -> torch.Tensor:
    """The model's fp32 logits on every example of `data`, in order, on the CPU (eval mode)."""
    model.eval()
    out = []
    for start in tqdm(range(0, len(data), batch_size), desc=desc, leave=False, disable=not progress):
        b = data.batch(list(range(start, min(start + batch_size, len(data)))))
        b.pop("labels")
        with autocast(device):
            out.append(model(**{k: v.to(device) for k, v in b.items()}).logits.float().cpu())
    return torch.cat(out)


def predict(model, data: Encoded, batch_size: int, device, regression: bool, progress: bool = False) -> np.ndarray:
    logits = predict_logits(model, data, batch_size, device, progress)
    return (logits.squeeze(-1) if regression else logits.argmax(-1)).numpy()


def evaluate(model, spec: TaskSpec, evals: dict[str, Encoded], batch_size: int, device) -> dict[str, float]:
    scores = {}
    for suffix, data in evals.items():
        pred = predict(model, data, batch_size, device, spec.regression)
        for name, value in M.compute(spec.metrics, data.labels.numpy(), pred).items():
            scores[f"{name}_{suffix}" if suffix else name] = value
    return scores


def _teacher(cfg: TrainConfig, train_data: Encoded, data_fp: str, spec: TaskSpec, device):
    """The teacher's logit table for `--teacher` (distill.TeacherLogits), None without one."""
    if cfg.teacher is None:
        return None
    key = hashlib.sha256(f"{data_fp}|{train_data.max_length}|{len(train_data.tokenizer)}".encode()).hexdigest()[:16]
    logits = teacher_logits(cfg.teacher, train_data, key, spec.num_labels, spec.regression, device,
                            batch_size=cfg.eval_batch_size, progress=cfg.progress)
    return TeacherLogits(logits, cfg.kd_weight, cfg.kd_temperature, spec.regression)


def _data_fingerprint(examples: list[Example]) -> str:
    """A resumed run must see the same examples in the same order as the one that was cut off."""
    return hashlib.sha256(repr([(e.texts, e.label) for e in examples]).encode()).hexdigest()[:16]


def _metric_keys(spec: TaskSpec, evals: dict) -> tuple[str, ...]:
    return tuple(f"{n}_{s}" if s else n for s in evals for n in spec.metrics)


def _eval_points(total: int, per_epoch: int, per_epoch_evals: int) -> set[int]:
    every = max(1, per_epoch // max(1, per_epoch_evals))
    return {s for s in range(every, total + 1, every)} | {total}


def teacher_logits(teacher: str, data, key: str, num_labels: int, regression: bool, device,
                   batch_size: int = 128, progress: bool = False) -> torch.Tensor:
    """The teacher's logits on every example of `data` (train.Encoded), from its cache or computed now."""
    cache = Path(teacher) / "teacher_logits" / f"{key}.safetensors"
    if cache.is_file():
        logits = load_file(str(cache))["logits"]
        if logits.shape[0] == len(data):
            return logits
    model = load_teacher(teacher, num_labels, regression, data.tokenizer).to(device)
    logits = predict_logits(model, data, batch_size, device, progress, desc="teacher")
    outputs = 1 if regression else num_labels
    if logits.shape[-1] != outputs:
        raise ValueError(f"--teacher {teacher}: it outputs {logits.shape[-1]} values per example, this task needs {outputs}")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda tmp: save_file({"logits": logits.contiguous()}, tmp))
    except OSError:
        pass  # a read-only teacher folder: the next run computes the table again
    return logits
