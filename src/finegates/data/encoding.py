"""A classification task's examples, read and tokenized: what the training loop batches."""

from __future__ import annotations

import torch

from .tasks import Example, TaskSpec, UserData, load_glue


def load_task(cfg) -> tuple[TaskSpec, list[Example], dict[str, list[Example]]]:
    """(spec, training examples, evaluation splits) of a TrainConfig: GLUE or own data, cut to its limits."""
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
    """Tokenized examples; batches are padded to their own longest sequence, or to `max_length`
    with `full_length` (one shape for every batch: what a step replayed as a CUDA graph needs)."""

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

    def batch(self, idx, full_length: bool = False) -> dict[str, torch.Tensor]:
        padding = {"padding": "max_length", "max_length": self.max_length} if full_length else {}
        b = self.tokenizer.pad([self.features[i] for i in idx], return_tensors="pt", **padding)
        b["labels"] = self.labels[idx]
        return dict(b)
