"""Reading a run directory back: the gated model it trained, and its evaluation data.

    model, tokenizer, run = finegates.runs.load_run("runs/mrpc")   # gated, eval mode
    batches = finegates.runs.eval_batches("runs/mrpc", tokenizer, limit=64)

Compression, evaluation and the baselines all start from a run directory; this module turns one
back into models and data, on top of checkpoint.py's strict readers.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import RunError, config_from_run, load_trainable, read_run_config
from .gates import GateParam
from .model import GateConfig, apply_gates
from .models import load_classifier, load_tokenizer

__all__ = ["RunError", "eval_batches", "eval_examples", "gate_config", "load_run", "read_run_config", "run_classifier"]


def gate_config(run: dict) -> GateConfig:
    """The GateConfig a run trained with, from its config.json's method_config.gate."""
    gate = (run.get("method_config") or {}).get("gate")
    if gate is None:
        raise RunError(f"run of method {run['train'].get('method')!r} has no gates to load")
    known = {f.name for f in fields(GateConfig)}
    kwargs = {k: v for k, v in gate.items() if k in known}
    kwargs["param"] = GateParam(**gate.get("param", {}))
    for key in ("roles", "target_modules", "layers", "adapter_roles"):
        if kwargs.get(key) is not None:
            kwargs[key] = tuple(kwargs[key])
    return GateConfig(**kwargs)


def run_classifier(run: dict) -> nn.Module:
    """The classifier a run started from (base weights, fresh head, the run's pooling), before its
    method changed anything. Runs written before `--pooling` existed read [CLS]."""
    return load_classifier(run["model_location"], run["num_labels"], run.get("regression", False),
                           run["train"].get("pooling", "cls"))


def load_run(run_dir) -> tuple[nn.Module, object, dict]:
    """(gated model in eval mode, tokenizer, run config) of a finished or checkpointed gates run."""
    run_dir = Path(run_dir)
    run = read_run_config(run_dir)
    weights = run_dir / "trainable.safetensors"
    if not weights.is_file():
        raise RunError(f"{run_dir}: no trainable.safetensors (the run never reached an evaluation)")
    model = run_classifier(run)
    apply_gates(model, gate_config(run))
    load_trainable(model, weights)  # strict; refuses another base model's gates
    model.run_dir = str(run_dir)
    return model.eval(), load_tokenizer(run["model_location"]), run


def eval_examples(run_dir, limit: int | None = None, split: str | None = None):
    """(task spec, examples) of the run's evaluation split (the first one unless `split`)."""
    from .train import load_task

    spec, _, evals = load_task(config_from_run(Path(run_dir)))
    key = split if split is not None else next(iter(evals))
    if key not in evals:
        raise RunError(f"no evaluation split {key!r}: the task has {', '.join(map(repr, evals))}")
    return spec, evals[key][:limit] if limit else evals[key]


def eval_batches(run_dir, tokenizer, limit: int | None = 64, batch_size: int = 32,
                 max_length: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Tokenized, padded model inputs (no labels) of the run's evaluation examples."""
    from .train import Encoded

    spec, examples = eval_examples(run_dir, limit)
    run = read_run_config(Path(run_dir))
    data = Encoded(examples, tokenizer, max_length or run["train"].get("max_length", 128), spec.regression)
    out = []
    for start in range(0, len(data), batch_size):
        b = data.batch(list(range(start, min(start + batch_size, len(data)))))
        b.pop("labels")
        out.append(b)
    return out
