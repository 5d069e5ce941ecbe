"""The training loop shared by every method, and the run directory it writes.

RUN_DIR/
  config.json        resolved TrainConfig (+ recipe, versions): enough to rebuild the model
  metrics.jsonl      one line per evaluation (epoch)
  trace.jsonl        every `trace_every` steps: loss, penalty, lambda, removed fraction, gate stats
  trainable.safetensors   every trained tensor (gates, head, trained biases): small
  checkpoint/state.pt     everything to resume bit-exactly (checkpoint.py); removed once complete
  metrics.json       final metrics, "complete": true; written last, so its presence marks a complete run

Every file is written atomically (files.py). A non-finite loss or gradient stops the run with
the last good checkpoint kept (or, with `skip_nonfinite`, skips that batch and counts it).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import metrics as M
from .checkpoint import (
    CHECKPOINT, FORMAT_VERSION, RunError, model_fingerprint, nonfinite, read_checkpoint, restore_checkpoint,
    save_checkpoint, save_trainable, truncate_log,
)
from .distributed import Processes, all_finite, barrier, broadcast, gather, local_slice, processes, wrap
from .files import append_jsonl, write_json
from .methods import Method, get_method
from .model import count_params, count_trainable, gate_trace
from .fits import check_token_types, max_tokens
from .models import load_classifier, load_config, load_tokenizer, resolve
from .outputs import TRAIN_RUN, output_folder
from .pooling import POOLINGS
from .progress import Progress
from .recipes import DEFAULT_RECIPE
from .tasks import Example, TaskSpec, UserData, load_glue


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, ...); the message says at which step."""


@dataclass
class TrainConfig:
    """Everything a run needs; the CLI's `train` options map 1:1 onto these fields."""

    out: Path = field(metadata={"help": "Run directory to write."})
    model: str | None = field(default=None, metadata={"help": "Model folder or hub id; default: embedded MiniLM."})
    task: str | None = field(default=None, metadata={"help": "GLUE task name (with data_dir)."})
    data_dir: Path | None = field(default=None, metadata={"help": "GLUE task folder (train.tsv, dev.tsv)."})
    train_file: Path | None = field(default=None, metadata={"help": "Own data: train CSV/TSV/JSONL."})
    eval_file: Path | None = field(default=None, metadata={"help": "Own data: eval CSV/TSV/JSONL."})
    text_columns: tuple[str, ...] = field(default=(), metadata={"help": "Own data: one or two text columns."})
    label_column: str = field(default="label", metadata={"help": "Own data: label column."})
    regression: bool = field(default=False, metadata={"help": "Own data: numeric target."})
    method: str = field(default="gates", metadata={"help": "Training method."})
    recipe: str = field(default=DEFAULT_RECIPE, metadata={
        "help": "Gate recipe: finetune (ours, default), frozen (ours, frozen weights + low-rank update), fast (ours, "
        "frozen weights), paper, stg."})
    sparsity: float = field(default=0.4, metadata={"help": "Target fraction of layer parameters removed."})
    epochs: float = field(default=3, metadata={"help": "Training epochs (fractions allowed)."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many steps."})
    batch_size: int = field(default=16, metadata={"help": "Training batch size."})
    eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size."})
    max_length: int = field(default=128, metadata={"help": "Max tokens per example."})
    lr: float | None = field(default=None, metadata={"help": "Gate (or main) learning rate; default per recipe/method."})
    head_lr: float | None = field(default=None, metadata={"help": "Task-head learning rate."})
    lam: float | None = field(default=None, metadata={"help": "Penalty weight lambda (initial, with the controller)."})
    reg_start_step: int | None = field(default=None, metadata={"help": "Step at which the penalty starts."})
    regularizer: str | None = field(default=None, metadata={"help": "Override the recipe's penalty: layer, stg, budget."})
    train_bias: bool | None = field(default=None, metadata={"help": "Override: train biases of gated layers."})
    gate_roles: tuple[str, ...] | None = field(default=None, metadata={"help": "Override: roles to gate."})
    train_limit: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})
    eval_limit: int | None = field(default=None, metadata={"help": "Use only the first N eval examples."})
    evals_per_epoch: int = field(default=1, metadata={"help": "Evaluations per epoch."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    grad_clip: float = field(default=1.0, metadata={"help": "Gradient-norm clip (0: off)."})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda."})
    trace_every: int = field(default=0, metadata={"help": "Log training internals every N steps (0: off)."})
    log_every: int = field(default=50, metadata={
        "help": "Progress statistics every N steps: the bar's values, or a plain line when not on a terminal."})
    checkpoint_every: int = field(default=0, metadata={"help": "Also checkpoint every N steps (0: at evaluations only)."})
    skip_nonfinite: bool = field(default=False, metadata={"help": "Skip batches with a NaN/inf loss or gradient."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    method_options: dict = field(default_factory=dict, metadata={"help": "Method-specific options (--opt key=value)."})
    pooling: str = field(default="auto", metadata={
        "help": "Which token state the head reads: cls, mean, or auto (what the checkpoint was trained with)."})
    distill: str | None = field(default=None, metadata={
        "help": "Feature distillation from the dense model: none or squarehead. Default: per method (gmp: squarehead)."})
    recipe_options: dict = field(default_factory=dict, metadata={"help": "Dotted-path recipe overrides, e.g. {'reg.lam': 10}."})
    train_weights: bool | None = field(default=None, metadata={
        "help": "Override: also finetune the weights of gated layers (gates over finetuned weights)."})
    teacher: str | None = field(default=None, metadata={
        "help": "Finetuned teacher to distil logits from: a run directory, compressed or HF model folder."})
    kd_weight: float = field(default=0.5, metadata={"help": "With --teacher: loss = (1 - w) task + w KD."})
    kd_temperature: float = field(default=2.0, metadata={"help": "With --teacher: softmax temperature of the KD loss."})

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if not (0.0 <= self.sparsity < 1.0) or math.isnan(self.sparsity):
            raise ValueError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if not (0 < self.epochs < math.inf):
            raise ValueError(f"--epochs must be positive and finite, got {self.epochs}")
        for name in ("batch_size", "max_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "train_limit", "eval_limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
        for name in ("eval_batch_size", "evals_per_epoch", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("trace_every", "checkpoint_every", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.lam is not None and not (0 <= self.lam < math.inf):
            raise ValueError(f"--lam must be >= 0 and finite, got {self.lam}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        for name in ("lr", "head_lr"):
            v = getattr(self, name)
            if v is not None and not (0 < v < 10):
                raise ValueError(f"--{name.replace('_', '-')} must be in (0, 10), got {v}")
        if self.task is None and self.train_file is None:
            raise ValueError("give --task with --data-dir, or --train-file/--eval-file with --text-columns")
        if self.task is not None and self.data_dir is None:
            raise ValueError(f"--task {self.task} needs --data-dir (the folder with train.tsv and dev.tsv)")
        if self.train_file is not None and (self.eval_file is None or not self.text_columns):
            raise ValueError("--train-file needs --eval-file and --text-columns")
        if len(self.text_columns) > 2:
            raise ValueError("--text-columns takes one or two columns")
        self.text_columns = tuple(self.text_columns)
        if self.distill is not None and self.distill not in ("none", "squarehead"):
            raise ValueError(f"--distill must be none or squarehead, got {self.distill!r}")
        self.method_options = dict(self.method_options)
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"--kd-weight must be in [0, 1], got {self.kd_weight}")
        if not 0.0 < self.kd_temperature < math.inf:
            raise ValueError(f"--kd-temperature must be positive and finite, got {self.kd_temperature}")
        if self.teacher is not None:
            self.teacher = str(self.teacher)
            if not Path(self.teacher).is_dir():
                raise ValueError(f"--teacher {self.teacher}: no such folder (a finetuned run, compressed or HF model folder)")
        if self.pooling not in POOLINGS:
            raise ValueError(f"--pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")


# ---- data ---------------------------------------------------------------------------------
def load_task(cfg: TrainConfig) -> tuple[TaskSpec, list[Example], dict[str, list[Example]]]:
    if cfg.task is not None:
        spec, train, evals = load_glue(cfg.task, cfg.data_dir)
    else:
        spec, train, evals = UserData(
            cfg.train_file, cfg.eval_file, cfg.text_columns, cfg.label_column, cfg.regression
        ).load()
    if cfg.train_limit:
        train = train[: cfg.train_limit]
    if cfg.eval_limit:
        evals = {k: v[: cfg.eval_limit] for k, v in evals.items()}
    return spec, train, evals


class Encoded:
    """Tokenized examples; batches are padded to their own longest sequence."""

    def __init__(self, examples: list[Example], tokenizer, max_length: int, regression: bool) -> None:
        columns = list(zip(*[e.texts for e in examples]))
        enc = tokenizer(*columns, truncation=True, max_length=max_length)
        self.max_length = max_length
        self.features = [{k: enc[k][i] for k in enc.keys()} for i in range(len(examples))]
        dtype = torch.float32 if regression else torch.long
        self.labels = torch.tensor([e.label for e in examples], dtype=dtype)
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.features)

    def batch(self, idx) -> dict[str, torch.Tensor]:
        b = self.tokenizer.pad([self.features[i] for i in idx], return_tensors="pt")
        b["labels"] = self.labels[idx]
        return dict(b)


# ---- loop -----------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def predict_logits(model, data: Encoded, batch_size: int, device, progress: bool = False,
                   desc: str = "eval") -> torch.Tensor:
    """The model's fp32 logits on every example of `data`, in order, on the CPU (eval mode)."""
    model.eval()
    out = []
    for start in tqdm(range(0, len(data), batch_size), desc=desc, leave=False, disable=not progress):
        b = data.batch(list(range(start, min(start + batch_size, len(data)))))
        b.pop("labels")
        with _autocast(device):
            out.append(model(**{k: v.to(device) for k, v in b.items()}).logits.float().cpu())
    return torch.cat(out)


def predict(model, data: Encoded, batch_size: int, device, regression: bool, progress: bool = False) -> np.ndarray:
    logits = predict_logits(model, data, batch_size, device, progress)
    return (logits.squeeze(-1) if regression else logits.argmax(-1)).numpy()


def evaluate(model, spec: TaskSpec, evals: dict[str, Encoded], cfg: TrainConfig, device) -> dict[str, float]:
    scores = {}
    for suffix, data in evals.items():
        pred = predict(model, data, cfg.eval_batch_size, device, spec.regression)
        for name, value in M.compute(spec.metrics, data.labels.numpy(), pred).items():
            scores[f"{name}_{suffix}" if suffix else name] = value
    return scores


def _autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _versions() -> dict:
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}


WARM_STEPS = 3  # `steady_seconds_per_step` leaves out each process's first steps (allocator, kernel choice)
MAX_NONFINITE_IN_A_ROW = 10  # with skip_nonfinite: more than this means the run has diverged


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Train, evaluate each epoch, write the run directory; return the final metrics.

    `resume=True` goes on from RUN_DIR/checkpoint (checkpoint.py); on CPU the result is
    bit-identical to an uninterrupted run. Without a checkpoint it starts from step 0.
    The run directory must be new, empty, or this run resumed; `overwrite=True` replaces an
    earlier run there once the new one is complete (outputs.py: the rule every command follows).
    """
    procs = processes(cpu=cfg.device == "cpu")
    inputs = (cfg.model, cfg.data_dir, cfg.train_file, cfg.eval_file, cfg.teacher)
    with output_folder(cfg.out, TRAIN_RUN, inputs=inputs, resume=resume, overwrite=overwrite, procs=procs) as folder:
        return _train(replace(cfg, out=folder), resume, cfg.out)


def _train(cfg: TrainConfig, resume: bool, target: Path) -> dict:
    """`train` writing into `cfg.out` (the run directory, or a staging folder that becomes `target`)."""
    if resume and (cfg.out / "metrics.json").is_file():
        return json.loads((cfg.out / "metrics.json").read_text(encoding="utf-8"))  # already complete
    seed_everything(cfg.seed)
    procs = processes(cpu=cfg.device == "cpu")
    device = procs.device if procs.active and cfg.device != "cpu" else pick_device(cfg.device)
    if cfg.batch_size % procs.world:
        raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) must be a multiple of the "
                         f"{procs.world} training processes")
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
    total_steps = math.ceil(cfg.epochs * steps_per_epoch)
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    method: Method = get_method(cfg.method)
    dense_params = count_params(model)
    groups = method.prepare(model, cfg, total_steps)
    trainable_params = count_trainable(model)  # before `finish` (which may merge adapters away)
    model.to(device)
    runner = wrap(model, procs)  # DDP over several processes (distributed.py), the model itself otherwise
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)

    ckpt = read_checkpoint(cfg.out) if resume else None
    gen = torch.Generator().manual_seed(cfg.seed)
    loop = {"step": 0, "t_train": 0.0, "order": [], "history": [], "skipped": 0, "in_a_row": 0}
    if ckpt is not None:
        loop = restore_checkpoint(ckpt, cfg.out / CHECKPOINT, model=model, optimizer=optimizer, method=method,
                                  generator=gen, fingerprint=fingerprint)
        if loop.get("data") != data_fp:
            raise RunError(f"{cfg.out / CHECKPOINT}: the training data changed since this checkpoint was written")
    _start_run_dir(cfg, ckpt, procs, {
        "format_version": FORMAT_VERSION,
        "train": {**asdict(cfg), "out": str(target)}, "model_location": location, "task": spec.name,
        "labels": spec.labels,
        "metrics": spec.metrics, "num_labels": spec.num_labels, "regression": spec.regression,
        "method_config": method.config(), "versions": _versions(),
        "fingerprint": fingerprint,
    })

    eval_points = _eval_points(total_steps, steps_per_epoch, cfg.evals_per_epoch)
    step, t_train, order, history = loop["step"], loop["t_train"], list(loop["order"]), list(loop["history"])
    skipped, in_a_row, last_ckpt = loop["skipped"], loop["in_a_row"], (step if ckpt is not None else None)
    params = [p for g in groups for p in g["params"]]
    bar = Progress(total_steps, step, f"{cfg.method} {spec.name}", cfg.progress and procs.main, cfg.log_every)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first_step, warm, peak = step, None, None  # steady timing starts after this process's WARM_STEPS
    while step < total_steps:
        if not order:
            order = torch.randperm(len(train_data), generator=gen).tolist()
        idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        model.train()
        t0 = time.perf_counter()
        local = local_slice(idx, procs)
        batch = {k: v.to(device) for k, v in train_data.batch(local).items()}
        with _autocast(device):
            out = runner(**batch)
        task_loss = out.loss.float()
        extra, logs = method.extra_loss(model, step, batch, out)
        loss = task_loss
        if teacher is not None:
            loss, logs["kd"] = teacher.mix(task_loss, out.logits.float(), local)
        loss = loss if extra is None else loss + extra
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # a clip at inf measures the norm and scales by exactly 1
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        # the step's one host synchronisation: all processes agree to step or to skip
        bad = None if all_finite(torch.stack([loss.detach(), norm.to(loss.dtype)]), procs) else _why(loss, task_loss, norm)
        if bad is None:
            optimizer.step()
            in_a_row = 0
        else:
            skipped, in_a_row = skipped + 1, in_a_row + 1
            optimizer.zero_grad(set_to_none=True)
            method.discard_step(model)
            if not cfg.skip_nonfinite or in_a_row >= MAX_NONFINITE_IN_A_ROW:
                bar.close()
                why = (f"{bad} at step {step}, {in_a_row} non-finite batches in a row: training diverged"
                       if cfg.skip_nonfinite else
                       f"{bad} at step {step}: lower --lr, or pass --skip-nonfinite to skip such batches")
                raise TrainingError(_stopped(cfg, why, last_ckpt))
        method.after_step(model, step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_train += time.perf_counter() - t0
        step += 1
        warm = (step, t_train) if step == first_step + WARM_STEPS else warm
        peak = peak_memory_mb(device) if step == total_steps else peak  # training's peak, before the last eval
        bar.update(lambda: {"loss": f"{task_loss.item():.3f}", **method.progress()})
        if procs.main and cfg.trace_every and (step % cfg.trace_every == 0 or step == 1):
            append_jsonl(cfg.out / "trace.jsonl", {"step": step, "task_loss": task_loss.item(),
                                                    **_floats(logs), **method.progress(), **gate_trace(model)})
        if step in eval_points:
            scores = broadcast(evaluate(model, spec, evals, cfg, device) if procs.main else None, procs)
            record = {"step": step, "epoch": round(step / steps_per_epoch, 3), "dev": scores,
                      "score": M.main_score(scores, _metric_keys(spec, evals)), **method.progress()}
            history.append(record)
            _check_finite(model, step, cfg, last_ckpt)
            if procs.main:
                append_jsonl(cfg.out / "metrics.jsonl", record)
                save_trainable(cfg.out / "trainable.safetensors", model, fingerprint, step,
                               tensors=method.trainable_state(model))
                bar.write(f"step {step} epoch {record['epoch']}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
                          + "".join(f", {k} {v}" for k, v in method.progress().items()))
        if step < total_steps and (step in eval_points or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
            _check_finite(model, step, cfg, last_ckpt)
            if procs.main:
                save_checkpoint(cfg.out, step=step, model=model, optimizer=optimizer, method=method, generator=gen,
                                fingerprint=fingerprint, loop={"step": step, "t_train": t_train, "order": order,
                                                               "history": history, "skipped": skipped,
                                                               "in_a_row": in_a_row, "data": data_fp})
            last_ckpt = step
    bar.close()
    method.finish(model)

    final = history[-1]
    best = max(history, key=lambda r: r["score"])
    result = {
        "task": spec.name, "method": cfg.method, "seed": cfg.seed, "steps": step,
        "dev": final["dev"], "score": final["score"], "best": {"step": best["step"], "dev": best["dev"]},
        "trainable_params": trainable_params, "total_params": dense_params,
        "train_seconds": t_train, "seconds_per_step": t_train / max(step, 1),
        "steady_seconds_per_step": (t_train - warm[1]) / (step - warm[0]) if warm and step > warm[0] else None,
        "peak_memory_mb": peak if peak is not None else peak_memory_mb(device),
        "peak_memory_mb_per_process": gather(peak if peak is not None else peak_memory_mb(device), procs),
        "device": str(device), "skipped_nonfinite": skipped,
        "resumed_from_step": ckpt["step"] if ckpt is not None else None,
        "processes": procs.world, "samples_per_second": step * cfg.batch_size / max(t_train, 1e-9),
        **method.summary(model), "complete": True,
    }
    if procs.main:
        write_json(cfg.out / "metrics.json", result)
        shutil.rmtree(cfg.out / CHECKPOINT.parent, ignore_errors=True)  # complete: the result is trainable.safetensors
    barrier(procs)
    return result


def _teacher(cfg: TrainConfig, train_data: Encoded, data_fp: str, spec: TaskSpec, device):
    """The teacher's logit table for `--teacher` (distill.TeacherLogits), None without one."""
    if cfg.teacher is None:
        return None
    from .distill import TeacherLogits, teacher_logits

    key = hashlib.sha256(f"{data_fp}|{train_data.max_length}|{len(train_data.tokenizer)}".encode()).hexdigest()[:16]
    logits = teacher_logits(cfg.teacher, train_data, key, spec.num_labels, spec.regression, device,
                            batch_size=cfg.eval_batch_size, progress=cfg.progress)
    return TeacherLogits(logits, cfg.kd_weight, cfg.kd_temperature, spec.regression)


def _start_run_dir(cfg: TrainConfig, ckpt: dict | None, procs: Processes, config: dict) -> None:
    """A fresh run clears what an earlier run left there; a resumed one cuts its logs back to the
    checkpoint's step, so no line is repeated. Only the main process touches the folder."""
    if procs.main:
        _prepare_run_dir(cfg, ckpt, config)
    barrier(procs)


def _prepare_run_dir(cfg: TrainConfig, ckpt: dict | None, config: dict) -> None:
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "metrics.json").unlink(missing_ok=True)
    for tmp in [*cfg.out.glob(".*.tmp"), *cfg.out.glob("checkpoint/.*.tmp")]:
        tmp.unlink(missing_ok=True)  # half-written files of a killed run (files.atomic_write's temporaries)
    if ckpt is not None:
        for log in ("metrics.jsonl", "trace.jsonl"):
            truncate_log(cfg.out / log, ckpt["step"])
        return
    for stale in ("metrics.jsonl", "trace.jsonl", "trainable.safetensors"):
        (cfg.out / stale).unlink(missing_ok=True)
    shutil.rmtree(cfg.out / CHECKPOINT.parent, ignore_errors=True)
    write_json(cfg.out / "config.json", config)


def _data_fingerprint(examples: list[Example]) -> str:
    """A resumed run must see the same examples in the same order as the one that was cut off."""
    return hashlib.sha256(repr([(e.texts, e.label) for e in examples]).encode()).hexdigest()[:16]


def _stopped(cfg: TrainConfig, why: str, last_ckpt: int | None) -> str:
    kept = (f"the last good checkpoint (step {last_ckpt}) is kept in {cfg.out / CHECKPOINT.parent}"
            if last_ckpt is not None else "no checkpoint had been written yet")
    return f"{why}; {kept}"


def _check_finite(model, step: int, cfg: TrainConfig, last_ckpt: int | None) -> None:
    """Never write NaN/inf tensors: stop, keeping the last good checkpoint."""
    bad = nonfinite({n: p for n, p in model.named_parameters() if p.requires_grad})
    if bad:
        raise TrainingError(_stopped(cfg, f"trained tensor {bad[0]} is not finite at step {step}", last_ckpt))


def _why(loss: torch.Tensor, task_loss: torch.Tensor, norm: torch.Tensor) -> str:
    """What made a step non-finite (read back only when one is)."""
    if not torch.isfinite(loss):
        return f"loss is {loss.item()} (task loss {task_loss.item():.4g})"
    if not torch.isfinite(norm):
        return f"gradient norm is {norm.item()}"
    return "the loss or gradient of another process is not finite"


def _floats(logs: dict) -> dict:
    """Per-step log values stay on the device until a trace line is written."""
    return {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in logs.items()}


def _metric_keys(spec: TaskSpec, evals: dict) -> tuple[str, ...]:
    return tuple(f"{n}_{s}" if s else n for s in evals for n in spec.metrics)


def _eval_points(total: int, per_epoch: int, per_epoch_evals: int) -> set[int]:
    every = max(1, per_epoch // max(1, per_epoch_evals))
    return {s for s in range(every, total + 1, every)} | {total}


def _jsonable(obj):
    if obj is None:
        return None
    from dataclasses import is_dataclass

    return asdict(obj) if is_dataclass(obj) else obj
