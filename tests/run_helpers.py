"""A tiny random BERT (with the real MiniLM tokenizer) and a small own-data task: fast training runs."""

from __future__ import annotations

import csv
import random
from pathlib import Path

WORDS = "good bad fine awful great poor nice terrible lovely dull".split()


def make_tiny_bert(folder: Path, seed: int = 0, model_class: str = "BertModel", **config) -> Path:
    """A 2-layer, 32-wide random BERT saved as an HF folder, with MiniLM's tokenizer. `config`
    overrides BertConfig fields; `model_class` saves e.g. a RobertaModel or a model with a task head."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    from finegates.loaders import default_model_path

    torch.manual_seed(seed)
    cls = getattr(transformers, model_class)
    cfg = cls.config_class(**{**dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=128), **config})
    cls(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(folder)
    return Path(folder)


def write_task(folder: Path, n_train: int = 48, n_eval: int = 16, seed: int = 0) -> tuple[Path, Path]:
    """train.csv/dev.csv with columns text,label: label 1 when a positive word occurs."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n in (("train.csv", n_train), ("dev.csv", n_eval)):
        with open(folder / name, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for _ in range(n):
                t = " ".join(rng.choice(WORDS) for _ in range(6))
                w.writerow([t, int("good" in t or "great" in t)])
        paths.append(folder / name)
    return paths[0], paths[1]
