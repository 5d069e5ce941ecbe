"""Sparse pretraining: a small Llama trained from scratch, its weights and gates together.

The paper's fourth scenario prunes *during* pretraining: every block's q, k, v, o, gate and up
projections carry row/column gates, the weights train with them (unlike finetuning, where they
are frozen), and a sparsity penalty switches on after a warm-up. Afterwards `finegates compress`
deletes what closed, exactly as for a finetuned run. Three modes answer whether that pays:

  gated   gates on q,k,v,o,gate,up of every block, sparsity target (default 0.4)
  dense   the same model without gates, same budget
  dense + match_params=N   the config's intermediate_size shrunk so the model has ~N parameters:
          the dense model trained directly at the compressed model's size (the real baseline)

    finegates pretrain --config configs/small-llama.json --text-files wiki.train.tokens \
        --valid-text-file wiki.valid.tokens --test-text-file wiki.test.tokens --sparsity 0.4 --out runs/pt

Tokenizer: a byte-level BPE trained on the training text (`tokenizers`, default 8,192 tokens),
saved as a Hugging Face tokenizer. SmolLM2's 49,152-token vocabulary would put 49k x 384 = 19M
parameters in the embedding of a ~10M-parameter model: the embedding (which gates never cut)
would dominate and the blocks, what pruning acts on, would be a small minority.

Penalty: the paper uses its per-layer penalty, lambda 100, after 1,000 warm-up steps. We keep
lambda 100 and the warm-up (as a fraction of our much shorter runs) but use the `fast` recipe's
gates and top-k budget penalty (regularizer.py): the per-layer penalty pulls every gate vector,
residual-side ones included (compression cannot delete those), towards an *expected* open
fraction, which does not close gates hard. The top-k penalty pushes shut the lowest-ranked
deletable units (MLP units, V/O and Q/K dims) up to a cubic schedule's parameter budget, so the
hard removed fraction, what `compress` deletes, follows the schedule and stops at the target.
Penalty off for the first `reg_start_step` steps (default 20%), ramp over `ramp_steps` (default
50%); the rest trains the final structure. The gate learning rate stays constant after warm-up
(the penalty's schedule, not a decaying lr, should decide when gates close); weights follow a
cosine schedule with linear warm-up. bf16 autocast on CUDA, fp32 on CPU.

RUN_DIR (an lm run: `finegates compress`, `finegates eval`, `lm.load_lm_run` read it):
  config.json            "objective": "lm", "model_location": "model" (RUN_DIR/model), method_config.gate
  model/                 HF folder: tokenizer (written first), config.json + weights (written last)
  trainable.safetensors  the gates (gated mode), tagged with the trained model's fingerprint
  metrics.jsonl          validation perplexity every `eval_every` steps
  checkpoint/state.pt    weights + gates + optimizer + step + data order + RNG (resume), removed at the end
  metrics.json           final: valid/test perplexity, params, removed fraction; "complete": true
A moved run directory loads as it is (its model folder is named relative to it); to resume it or
compress it elsewhere, `relocate(run_dir, data_dir)` points its text files at their new place.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .arch import spec_for_model_type
from .checkpoint import (
    CHECKPOINT, FORMAT_VERSION, RunError, model_fingerprint, read_checkpoint, read_run_config, restore_checkpoint,
    save_checkpoint, save_trainable, truncate_log,
)
from .files import append_jsonl, atomic_write, read_json, write_json
from .lm import _autocast, check_window, eval_ids, lr_lambda, pack, perplexity, read_text, tokenize_files
from .model import apply_gates, count_params, gate_parameters, gate_state_dict
from .recipes import get_recipe
from .regularizer import TOPK_UNITS, Regularizer

GATED_ROLES = ("q", "k", "v", "o", "gate", "up")  # the paper's pretraining scenario: down is not gated
SPECIAL = "<|endoftext|>"  # BOS = EOS = the separator between files


@dataclass
class PretrainConfig:
    """A pretraining run; `finegates pretrain` options map onto these fields."""

    out: Path = field(metadata={"help": "Run directory to write."})
    model_config: Path = field(metadata={"help": "JSON of a Hugging Face decoder config (llama, qwen2, mistral)."})
    text_files: tuple[Path, ...] = field(default=(), metadata={"help": "Training text files."})
    valid_text_file: Path | None = field(default=None, metadata={"help": "Validation text (perplexity during training)."})
    test_text_file: Path | None = field(default=None, metadata={"help": "Test text (perplexity at the end)."})
    tokenizer: Path | None = field(default=None, metadata={"help": "Existing tokenizer folder; default: train one."})
    vocab_size: int = field(default=8192, metadata={"help": "BPE vocabulary when training the tokenizer."})
    mode: str = field(default="gated", metadata={"help": "gated (weights + gates) or dense (no gates)."})
    match_params: int | None = field(default=None, metadata={"help": "dense: shrink intermediate_size to ~N params."})
    sparsity: float = field(default=0.4, metadata={"help": "gated: target fraction of block linear params removed."})
    lam: float = field(default=100.0, metadata={"help": "gated: penalty weight lambda (paper: 100)."})
    reg_start_step: int | None = field(default=None, metadata={"help": "gated: penalty starts here (default 20%)."})
    ramp_steps: int | None = field(default=None, metadata={"help": "gated: steps the target ramps over (default 50%)."})
    prune_units: tuple[str, ...] = field(default=TOPK_UNITS, metadata={"help": "gated: units the penalty may close."})
    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=32, metadata={"help": "Blocks per step."})
    block_size: int = field(default=256, metadata={"help": "Tokens per training block."})
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate of the weights."})
    gate_lr: float = field(default=1e-2, metadata={"help": "gated: learning rate of the gates (constant)."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear learning-rate warm-up steps."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay of matrices (not gates, norms)."})
    grad_clip: float = field(default=1.0, metadata={"help": "Gradient-norm clip of the weights (0: off)."})
    eval_every: int = field(default=100, metadata={"help": "Validation perplexity every N steps (and at the end)."})
    eval_tokens: int | None = field(default=None, metadata={"help": "Validate on the first N tokens only."})
    window: int | None = field(default=None, metadata={"help": "Perplexity window; default block_size."})
    stride: int | None = field(default=None, metadata={"help": "Perplexity stride; default block_size // 2."})
    eval_batch_size: int = field(default=32, metadata={"help": "Windows per evaluation forward pass."})
    checkpoint_every: int = field(default=0, metadata={"help": "Checkpoint every N steps (0: at evaluations)."})
    time_limit_s: float | None = field(default=None, metadata={"help": "Stop training after N s (then evaluate, save)."})
    save_dtype: str = field(default="float32", metadata={
        "help": "float32, or bfloat16: weights rounded to bf16 before the final evaluation and saved in half the "
        "bytes (lossless on reload; GPU autocast already runs the linears in bf16)."})
    seed: int = field(default=0, metadata={"help": "Random seed (initialisation, data order, gate noise)."})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def __post_init__(self) -> None:
        self.out, self.model_config = Path(self.out), Path(self.model_config)
        self.text_files = tuple(Path(p) for p in self.text_files)
        self.prune_units = tuple(self.prune_units)
        for name in ("valid_text_file", "test_text_file", "tokenizer"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        if not self.text_files:
            raise ValueError("pretrain needs --text-files (comma-separated plain text files)")
        if self.valid_text_file is None:
            raise ValueError("pretrain needs --valid-text-file (validation perplexity)")
        for path in (*self.text_files, self.valid_text_file, self.test_text_file):
            if path is not None and not path.is_file():
                raise ValueError(f"text file not found: {path}")
        if self.tokenizer is not None and not self.tokenizer.is_dir():
            raise ValueError(f"tokenizer folder not found: {self.tokenizer}")
        read_model_config(self.model_config)  # missing, not JSON, or not a decoder: one clear line
        if self.mode not in ("gated", "dense"):
            raise ValueError(f"--mode must be gated or dense, got {self.mode!r}")
        if not (0.0 <= self.sparsity < 1.0) or math.isnan(self.sparsity):
            raise ValueError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.match_params is not None and (self.mode != "dense" or self.match_params < 1):
            raise ValueError("--match-params N (N > 0) sizes a dense model: use it with --mode dense")
        if min(self.max_steps, self.batch_size, self.eval_every, self.eval_batch_size) < 1 or self.block_size < 2:
            raise ValueError("--max-steps, --batch-size, --eval-every, --eval-batch-size must be >= 1, --block-size >= 2")
        if min(self.warmup_steps, self.checkpoint_every, self.reg_start_step or 0, self.ramp_steps or 0) < 0:
            raise ValueError("--warmup-steps, --checkpoint-every, --reg-start-step, --ramp-steps must be >= 0")
        if not (0 < self.lr < 1) or not (0 < self.gate_lr < 10) or self.lam < 0 or self.weight_decay < 0:
            raise ValueError("--lr must be in (0, 1), --gate-lr in (0, 10), --lam and --weight-decay >= 0")
        if self.vocab_size < 260:
            raise ValueError(f"--vocab-size must be >= 260 (256 bytes + specials), got {self.vocab_size}")
        if not self.prune_units or set(self.prune_units) - set(TOPK_UNITS):
            raise ValueError(f"--prune-units must be a subset of {', '.join(TOPK_UNITS)}, got {self.prune_units}")
        if self.save_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--save-dtype must be float32 or bfloat16, got {self.save_dtype!r}")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ValueError("--time-limit-s must be > 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        self.window = self.window or self.block_size
        self.stride = self.stride or max(1, self.block_size // 2)
        check_window(self.window, self.stride)

    @property
    def gated(self) -> bool:
        return self.mode == "gated"


# ---- tokenizer and model ------------------------------------------------------------------------
def train_tokenizer(files, vocab_size: int):
    """A byte-level BPE tokenizer trained on `files` (never an unknown token), as a HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator((line for f in files for line in read_text(f).splitlines(keepends=True)), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=SPECIAL, eos_token=SPECIAL, pad_token=SPECIAL)


def read_model_config(path: Path) -> dict:
    """The config JSON as a dict; refuse a missing file, bad JSON, or a family finegates cannot gate."""
    path = Path(path)
    raw = read_json(path, ValueError, "model config not found")
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ValueError(f"{path}: not a Hugging Face config (no model_type)")
    if not spec_for_model_type(raw["model_type"]).decoder:
        raise ValueError(f"{path}: {raw['model_type']} is not a decoder; pretraining needs a causal LM")
    return raw


def build_config(raw: dict, tokenizer):
    """A HF config from the JSON, with vocabulary and special ids taken from the tokenizer."""
    from transformers import AutoConfig

    raw = {k: v for k, v in raw.items() if not k.startswith("_")}  # "_comment" keys document the JSON
    eos = tokenizer.eos_token_id
    return AutoConfig.for_model(**{**raw, "vocab_size": len(tokenizer), "bos_token_id": eos, "eos_token_id": eos,
                                   "pad_token_id": tokenizer.pad_token_id})


def param_count(config) -> int:
    """Parameters of a causal LM built from `config` (tied weights once), without allocating them."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def match_intermediate(config, n_params: int, multiple: int = 8):
    """A copy of `config` whose intermediate_size (a multiple of `multiple`) gives the parameter
    count closest to `n_params`. Only the MLP width shrinks: heads, hidden size and vocabulary stay,
    as in the compressed model, whose residual stream and embedding compression never cuts."""
    full, i = param_count(config), config.intermediate_size
    per_unit = (param_count(replace_attr(config, intermediate_size=i + multiple)) - full) / multiple
    width = multiple * round((i - (full - n_params) / per_unit) / multiple)
    if width < multiple:
        floor = full - per_unit * (i - multiple)
        raise ValueError(f"--match-params {n_params:,}: shrinking intermediate_size alone cannot go below "
                         f"{floor:,.0f} parameters with this config")
    return replace_attr(config, intermediate_size=int(width))


def replace_attr(config, **changes):
    new = config.__class__.from_dict(config.to_dict())
    for k, v in changes.items():
        setattr(new, k, v)
    return new


def build_model(config, seed: int) -> nn.Module:
    """A freshly initialised causal LM in fp32 (bf16 comes from autocast on the GPU)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def gate_model(model: nn.Module, cfg: PretrainConfig, total: int) -> tuple[dict, Regularizer]:
    """Put gates on GATED_ROLES, make every weight trainable again, build the penalty.

    Returns (method_config for config.json, regularizer)."""
    recipe = get_recipe("fast")
    gate_cfg = replace(recipe.gate, roles=GATED_ROLES, train_bias=False, train_head=False)
    reg_cfg = replace(recipe.reg, sparsity=cfg.sparsity, lam=cfg.lam, units=cfg.prune_units,
                      start_step=cfg.reg_start_step if cfg.reg_start_step is not None else int(0.2 * total),
                      ramp_steps=cfg.ramp_steps if cfg.ramp_steps is not None else int(0.5 * total))
    apply_gates(model, gate_cfg)
    for p in model.parameters():  # apply_gates freezes the weights (finetuning); here they train
        p.requires_grad_(True)
    method_config = {"name": "pretrain-gates", "gate": asdict(gate_cfg), "reg": asdict(reg_cfg), "gate_lr": cfg.gate_lr}
    return method_config, Regularizer(model, reg_cfg)


def param_groups(model: nn.Module, cfg: PretrainConfig) -> list[dict]:
    """AdamW groups: matrices decay; norms and gates do not; gates get their own learning rate."""
    gate_ids = {id(p) for p in gate_parameters(model)}
    params = [p for p in model.parameters() if id(p) not in gate_ids]
    groups = [{"params": [p for p in params if p.dim() >= 2], "lr": cfg.lr, "weight_decay": cfg.weight_decay,
               "name": "weights"},
              {"params": [p for p in params if p.dim() < 2], "lr": cfg.lr, "weight_decay": 0.0, "name": "norms"}]
    if gate_ids:
        groups.append({"params": gate_parameters(model), "lr": cfg.gate_lr, "weight_decay": 0.0, "name": "gates"})
    for g in groups:
        g["base_lr"] = g["lr"]
    return [g for g in groups if g["params"]]


class _NoPenalty:
    """The dense mode's stand-in for the regularizer (the checkpoint stores its state)."""

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass


# ---- saving ---------------------------------------------------------------------------------------
def _write_folder(folder: Path, write) -> None:
    """`write(tmp_dir)`, then move each file into `folder` atomically, config.json last."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-") as tmp:
        write(tmp)
        files = sorted(Path(tmp).iterdir(), key=lambda f: f.name == "config.json")
        for f in files:
            if f.is_file():
                atomic_write(folder / f.name, lambda t, src=f: os.replace(src, t))


def save_model_folder(model: nn.Module, config, folder: Path, dtype: torch.dtype) -> None:
    """The trained weights as a plain HF model (gate wrappers removed, gates not baked in)."""
    from transformers import AutoModelForCausalLM

    state = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if not k.endswith(".theta")}
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(state, strict=True)
    plain.to(dtype)
    _write_folder(folder, lambda tmp: plain.save_pretrained(tmp))


def relocate(run_dir, data_dir: Path | None = None) -> dict:
    """Point a moved run directory's config.json at its own model folder (and at `data_dir` for
    text files that are not where they were). Returns the updated config."""
    run_dir = Path(run_dir).resolve()
    run = read_run_config(run_dir)
    run["model_location"] = "model"  # relative to the run (lm.run_location); older runs held an absolute path
    for key in ("text_files", "valid_text_file", "test_text_file", "eval_text_file"):
        value = run["train"].get(key)
        if data_dir is None or value is None:
            continue
        moved = [str(Path(data_dir) / Path(v).name) if not Path(v).is_file() else v
                 for v in (value if isinstance(value, list) else [value])]
        run["train"][key] = moved if isinstance(value, list) else moved[0]
    write_json(run_dir / "config.json", run)
    return run


def config_from_run(run_dir) -> PretrainConfig:
    """The PretrainConfig a run was started with (for resume); `out` is where the run is now."""
    run = read_run_config(Path(run_dir))
    if run.get("train", {}).get("method", "").split("-")[0] != "pretrain":
        raise RunError(f"{run_dir}: not a pretraining run")
    known = {f.name for f in fields(PretrainConfig)}
    return PretrainConfig(**{**{k: v for k, v in run["train"].items() if k in known}, "out": Path(run_dir)})


# ---- training ---------------------------------------------------------------------------------------
def pretrain(cfg: PretrainConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Train from scratch, validate every `eval_every` steps, test at the end, write RUN_DIR (new,
    empty or resumed; `overwrite=True` replaces an earlier run once the new one is complete)."""
    from .outputs import PRETRAIN_RUN, output_folder

    inputs = (cfg.model_config, *cfg.text_files, cfg.valid_text_file, cfg.test_text_file, cfg.tokenizer)
    with output_folder(cfg.out, PRETRAIN_RUN, inputs=inputs, resume=resume, overwrite=overwrite) as folder:
        return _pretrain(replace(cfg, out=folder), resume, cfg.out)


def _pretrain(cfg: PretrainConfig, resume: bool, target: Path) -> dict:
    from transformers import AutoTokenizer

    from .train import _versions, peak_memory_mb, pick_device

    device, out = pick_device(cfg.device), cfg.out
    state = read_checkpoint(out) if resume else None
    if resume and state is None:
        raise RunError(f"{out}: no checkpoint to resume from")
    if state is None:  # a fresh start: the tokenizer first, so a resumed run reads the same one
        out.mkdir(parents=True, exist_ok=True)
        for stale in ("metrics.json", "metrics.jsonl", "trainable.safetensors"):
            (out / stale).unlink(missing_ok=True)
        for stale in ("model", CHECKPOINT.parent):
            shutil.rmtree(out / stale, ignore_errors=True)
        tok = AutoTokenizer.from_pretrained(cfg.tokenizer) if cfg.tokenizer else \
            train_tokenizer(cfg.text_files, cfg.vocab_size)
        _write_folder(out / "model", lambda tmp: tok.save_pretrained(tmp))
    tok = AutoTokenizer.from_pretrained(out / "model")
    if tok.eos_token_id is None:
        raise ValueError(f"{cfg.tokenizer}: the tokenizer has no EOS token (needed between files)")
    config = build_config(read_model_config(cfg.model_config), tok)
    if cfg.match_params:
        config = match_intermediate(config, cfg.match_params)
    if max(cfg.block_size, cfg.window) > config.max_position_embeddings:
        raise ValueError(f"block size / window exceed the config's max_position_embeddings "
                         f"({config.max_position_embeddings})")
    blocks_ = pack(tokenize_files(cfg.text_files, tok), cfg.block_size)
    valid = eval_ids(cfg.valid_text_file, tok, cfg.eval_tokens)

    model = build_model(config, cfg.seed)
    fingerprint = model_fingerprint(model)  # of the initialisation: checks a resumed checkpoint
    method_config, reg = gate_model(model, cfg, cfg.max_steps) if cfg.gated else (None, _NoPenalty())
    model.to(device)
    groups = param_groups(model, cfg)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    schedule = lr_lambda("cosine", cfg.max_steps, cfg.warmup_steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    loop = {"step": 0, "order": [], "train_seconds": 0.0, "stopped_early": False}
    if state is not None:
        loop = restore_checkpoint(state, out / CHECKPOINT, model=model, optimizer=optimizer, method=reg,
                                  generator=gen, fingerprint=fingerprint)
        truncate_log(out / "metrics.jsonl", loop["step"])
    else:
        write_json(out / "config.json", {
            "format_version": FORMAT_VERSION, "objective": "lm", "task": "lm",
            "train": {**asdict(cfg), "out": str(target), "method": f"pretrain-{cfg.mode}",
                      "eval_text_file": cfg.valid_text_file},
            "model_location": "model", "method_config": method_config,  # relative: the run's own folder
            "model_config": config.to_dict(), "train_tokens": int(blocks_.numel()), "versions": _versions(),
        })

    def ppl(ids: torch.Tensor) -> dict:
        return perplexity(model, ids, cfg.window, cfg.stride, cfg.eval_batch_size)

    step, order = loop["step"], list(loop["order"])
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"pretrain {cfg.mode}", disable=not cfg.progress,
               dynamic_ncols=True)
    t_start = time.perf_counter()
    while step < cfg.max_steps:
        if cfg.time_limit_s and time.perf_counter() - t_start > cfg.time_limit_s:
            loop["stopped_early"] = True
            bar.write(f"time limit of {cfg.time_limit_s:.0f} s reached at step {step}")
            break
        if not order:
            order = torch.randperm(len(blocks_), generator=gen).tolist()
        idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
        t0 = time.perf_counter()
        loss, penalty = _train_step(model, blocks_[idx].to(device), reg, step, optimizer, schedule(step), cfg)
        loop["train_seconds"] += time.perf_counter() - t0
        step += 1
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss:.3f}", **({"removed": f"{reg.removed_fraction():.2f}"} if cfg.gated else {}))
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            record = {"step": step, "train_loss": loss, "penalty": penalty, "valid": ppl(valid),
                      "lr": optimizer.param_groups[0]["lr"], "train_seconds": loop["train_seconds"]}
            if cfg.gated:
                record["removed_fraction"] = reg.removed_fraction()
            append_jsonl(out / "metrics.jsonl", record)
        if step % (cfg.checkpoint_every or cfg.eval_every) == 0 and step < cfg.max_steps:
            loop.update(step=step, order=order)
            save_checkpoint(out, step=step, model=model, optimizer=optimizer, method=reg, generator=gen,
                            fingerprint=fingerprint, loop=loop)
    bar.close()
    return _finish(cfg, model, config, tok, reg, valid, step, loop, device, peak_memory_mb(device))


def _train_step(model, x, reg, step: int, optimizer, factor: float, cfg: PretrainConfig) -> tuple[float, float]:
    """One optimizer step on LM loss + penalty; returns (LM loss, penalty) as floats."""
    from .train import TrainingError

    groups = optimizer.param_groups  # not the dicts passed in: loading a checkpoint replaces them
    for g in groups:  # weights: warm-up then cosine; gates: warm-up then constant (module docstring)
        g["lr"] = g["base_lr"] * (factor if g["name"] != "gates" or step < cfg.warmup_steps else 1.0)
    model.train()
    with _autocast(x.device):
        lm_loss = model(input_ids=x, labels=x, use_cache=False).loss.float()
    penalty = reg(step)[0] if cfg.gated else torch.zeros((), device=x.device)
    loss = lm_loss + penalty
    if not torch.isfinite(loss):
        raise TrainingError(f"loss is {loss.item()} at step {step} (LM loss {lm_loss.item():.4g})")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:  # weights only: lambda-sized penalty gradients on the gates would scale the weights'
        # updates down during the ramp, and Adam normalises the gates' step size anyway
        torch.nn.utils.clip_grad_norm_([p for g in groups if g["name"] != "gates" for p in g["params"]], cfg.grad_clip)
    optimizer.step()
    return lm_loss.item(), penalty.item()


def _finish(cfg, model, config, tok, reg, valid, step, loop, device, peak_mb) -> dict:
    """Round (bfloat16 saving), evaluate, save model folder + gates, write metrics.json."""
    out = cfg.out
    dtype = getattr(torch, cfg.save_dtype)
    gate_ids = {id(p) for p in gate_parameters(model)}
    with torch.no_grad():  # bf16-representable weights: the saved model is exactly the evaluated one
        for p in model.parameters():
            if id(p) not in gate_ids:
                p.copy_(p.to(dtype).float())
    final = perplexity(model, valid, cfg.window, cfg.stride, cfg.eval_batch_size)
    test = None
    if cfg.test_text_file is not None:
        test = perplexity(model, eval_ids(cfg.test_text_file, tok), cfg.window, cfg.stride, cfg.eval_batch_size)
    if loop["stopped_early"]:  # the curve ends where training did
        append_jsonl(out / "metrics.jsonl", {"step": step, "valid": final, "train_seconds": loop["train_seconds"],
                                             "stopped_early": True})
    model.cpu()
    fingerprint = model_fingerprint(model)  # of the trained model: what load_lm_run will compute
    save_model_folder(model, config, out / "model", dtype)
    metrics = {
        "objective": "lm", "method": f"pretrain-{cfg.mode}", "mode": cfg.mode, "steps": step,
        "max_steps": cfg.max_steps, "stopped_early": loop["stopped_early"], "valid": final, "test": test,
        "perplexity": final["perplexity"], "test_perplexity": test["perplexity"] if test else None,
        "params": count_params(model), "model_config": {k: getattr(config, k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size")},
        "train_tokens_seen": step * cfg.batch_size * cfg.block_size, "train_seconds": loop["train_seconds"],
        "seconds_per_step": loop["train_seconds"] / max(step, 1), "peak_memory_mb": peak_mb,
        "device": str(device), "window": cfg.window, "stride": cfg.stride, "complete": True,
    }
    if cfg.gated:
        from .compress import linear_params, predicted_kept

        save_trainable(out / "trainable.safetensors", model, fingerprint, step,
                       {n: p.detach() for n, p in gate_state_dict(model).items() if n.endswith(".theta")})
        metrics.update(removed_fraction=reg.removed_fraction(), sparsity=cfg.sparsity,
                       block_linear_params=linear_params(model), predicted_kept_linear_params=predicted_kept(model))
    shutil.rmtree(out / CHECKPOINT.parent, ignore_errors=True)
    write_json(out / "metrics.json", metrics)
    return metrics
