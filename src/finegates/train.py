"""The training loop shared by every method, and the run directory it writes.

RUN_DIR/
  config.json        resolved TrainConfig (+ recipe, versions): enough to rebuild the model
  metrics.jsonl      one line per evaluation (epoch)
  trace.jsonl        every `trace_every` steps: loss, penalty, lambda, removed fraction, gate stats
  trainable.safetensors   every trained tensor (gates, head, trained biases): small
  metrics.json       final metrics; written last, so its presence marks a complete run
"""

from __future__ import annotations

import math
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import metrics as M
from .files import append_jsonl, save_tensors, write_json
from .methods import Method, get_method
from .model import count_params, count_trainable, gate_state_dict
from .models import load_classifier, load_tokenizer, resolve
from .tasks import DataError, Example, TaskSpec, UserData, load_glue


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
    recipe: str = field(default="fast", metadata={"help": "Gate recipe: fast (ours), paper, stg."})
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
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    method_options: dict = field(default_factory=dict, metadata={"help": "Method-specific options."})

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if not (0.0 <= self.sparsity < 1.0) or math.isnan(self.sparsity):
            raise ValueError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.epochs <= 0 or self.batch_size <= 0 or self.max_length <= 0:
            raise ValueError("--epochs, --batch-size and --max-length must be positive")
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
def predict(model, data: Encoded, batch_size: int, device, regression: bool, progress: bool = False) -> np.ndarray:
    model.eval()
    preds = []
    for start in tqdm(range(0, len(data), batch_size), desc="eval", leave=False, disable=not progress):
        b = data.batch(list(range(start, min(start + batch_size, len(data)))))
        b.pop("labels")
        with _autocast(device):
            logits = model(**{k: v.to(device) for k, v in b.items()}).logits.float()
        preds.append(logits.squeeze(-1).cpu() if regression else logits.argmax(-1).cpu())
    return torch.cat(preds).numpy()


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


def train(cfg: TrainConfig) -> dict:
    """Train, evaluate each epoch, write the run directory; return the final metrics."""
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    spec, train_ex, eval_ex = load_task(cfg)
    location = resolve(cfg.model)
    tokenizer = load_tokenizer(location)
    model = load_classifier(location, spec.num_labels, spec.regression)
    train_data = Encoded(train_ex, tokenizer, cfg.max_length, spec.regression)
    evals = {k: Encoded(v, tokenizer, cfg.max_length, spec.regression) for k, v in eval_ex.items()}

    steps_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
    total_steps = math.ceil(cfg.epochs * steps_per_epoch)
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    method: Method = get_method(cfg.method)
    dense_params = count_params(model)
    groups = method.prepare(model, cfg, total_steps)
    model.to(device)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)

    cfg.out.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.json", "metrics.jsonl", "trace.jsonl"):
        (cfg.out / stale).unlink(missing_ok=True)
    write_json(cfg.out / "config.json", {
        "train": asdict(cfg), "model_location": location, "task": spec.name, "labels": spec.labels,
        "metrics": spec.metrics, "num_labels": spec.num_labels, "regression": spec.regression,
        "method_config": _jsonable(getattr(method, "recipe", None)), "versions": _versions(),
    })

    eval_points = _eval_points(total_steps, steps_per_epoch, cfg.evals_per_epoch)
    history: list[dict] = []
    gen = torch.Generator().manual_seed(cfg.seed)
    step, t_train, order = 0, 0.0, []
    bar = tqdm(total=total_steps, desc=f"{cfg.method} {spec.name}", disable=not cfg.progress, dynamic_ncols=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while step < total_steps:
        if not order:
            order = torch.randperm(len(train_data), generator=gen).tolist()
        idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        model.train()
        t0 = time.perf_counter()
        batch = {k: v.to(device) for k, v in train_data.batch(idx).items()}
        with _autocast(device):
            out = model(**batch)
        task_loss = out.loss.float()
        extra, logs = method.extra_loss(model, step, batch, out)
        loss = task_loss if extra is None else task_loss + extra
        if not torch.isfinite(loss):
            bar.close()
            raise TrainingError(
                f"loss is {loss.item()} at step {step} (task loss {task_loss.item():.4g}); "
                f"the last complete evaluation's state is in {cfg.out}"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
        optimizer.step()
        method.after_step(model, step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_train += time.perf_counter() - t0
        step += 1
        bar.update(1)
        if cfg.trace_every and (step % cfg.trace_every == 0 or step == 1):
            append_jsonl(cfg.out / "trace.jsonl", {"step": step, "task_loss": task_loss.item(),
                                                    **logs, **method.progress(), **_gate_trace(model)})
        if step in eval_points:
            scores = evaluate(model, spec, evals, cfg, device)
            record = {"step": step, "epoch": round(step / steps_per_epoch, 3), "dev": scores,
                      "score": M.main_score(scores, _metric_keys(spec, evals)), **method.progress()}
            history.append(record)
            append_jsonl(cfg.out / "metrics.jsonl", record)
            save_tensors(cfg.out / "trainable.safetensors", gate_state_dict(model))
            bar.write(f"step {step} epoch {record['epoch']}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
                      + "".join(f", {k} {v}" for k, v in method.progress().items()))
        bar.set_postfix(loss=f"{task_loss.item():.3f}", **method.progress())
    bar.close()

    final = history[-1]
    best = max(history, key=lambda r: r["score"])
    result = {
        "task": spec.name, "method": cfg.method, "seed": cfg.seed, "steps": step,
        "dev": final["dev"], "score": final["score"], "best": {"step": best["step"], "dev": best["dev"]},
        "trainable_params": count_trainable(model), "total_params": dense_params,
        "train_seconds": t_train, "seconds_per_step": t_train / max(step, 1),
        "peak_memory_mb": peak_memory_mb(device), "device": str(device),
        "complete": True, **method.summary(model),
    }
    write_json(cfg.out / "metrics.json", result)
    return result


def _metric_keys(spec: TaskSpec, evals: dict) -> tuple[str, ...]:
    return tuple(f"{n}_{s}" if s else n for s in evals for n in spec.metrics)


def _eval_points(total: int, per_epoch: int, per_epoch_evals: int) -> set[int]:
    every = max(1, per_epoch // max(1, per_epoch_evals))
    return {s for s in range(every, total + 1, every)} | {total}


def _gate_trace(model) -> dict:
    """Gate-value quantiles and gradient norm: the internals the recipe study plots."""
    from .model import gate_parameters, gated_layers

    thetas = gate_parameters(model)
    if not thetas:
        return {}
    with torch.no_grad():
        vals = torch.cat([g.values().flatten() for m in gated_layers(model) for g in m.gates().values()]).float().cpu()
        grads = [p.grad for p in thetas if p.grad is not None]
        gnorm = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads))) if grads else 0.0
    q = torch.quantile(vals, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])).tolist()
    return {"gate_q": [round(x, 4) for x in q], "gate_closed": float((vals <= 0).float().mean()),
            "gate_grad_norm": gnorm,
            "gate_hist": torch.histc(vals, bins=20, min=0.0, max=1.0).int().tolist()}


def _jsonable(obj):
    if obj is None:
        return None
    from dataclasses import is_dataclass

    return asdict(obj) if is_dataclass(obj) else obj
