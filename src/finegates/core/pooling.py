"""Which token representation the task head reads: the first token ([CLS]) or the masked mean.

Why this exists: the default model, all-MiniLM-L6-v2, is a sentence-transformers checkpoint. It
was trained so that the *mean* of its token states is the sentence representation
(`1_Pooling/config.json`: `pooling_mode_mean_tokens`); its [CLS] state was never trained for
that. Full finetuning can re-purpose [CLS]; gates (which only scale rows and columns) and other
small-capacity methods largely cannot. Reading the pooling the checkpoint was trained with is
what sentence-transformers itself does.

How: the stock HF heads all read position 0 of the encoder's last hidden state (BERT's pooler,
RoBERTa's classification head, DistilBERT's `hidden_state[:, 0]`). `MeanPooling` puts the
attention-masked mean of the token states into position 0 of that output, with two hooks:
one on the task model records the attention mask of the call, one on the block stack rewrites
its output. Nothing else changes, so gates, compression, saving and ONNX export are unaffected;
the choice is recorded in `config.finegates_pooling` so that every loader re-installs it.

Decoders keep HF's last-token pooling: `mean` is refused for them, `cls` and `auto` mean the stock head.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from .arch import get_submodule, spec_for

POOLINGS = ("auto", "cls", "mean")
CONFIG_KEY = "finegates_pooling"


def checkpoint_pooling(location: str) -> str:
    """The pooling a sentence-transformers folder declares ('mean' or 'cls'); 'cls' otherwise."""
    cfg = Path(location) / "1_Pooling" / "config.json"
    try:
        pooling = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "cls"
    return "mean" if pooling.get("pooling_mode_mean_tokens") else "cls"


def resolve_pooling(pooling: str, location: str, decoder: bool) -> str:
    """'auto' -> what the checkpoint was trained with; decoders always pool their last token."""
    if pooling not in POOLINGS:
        raise ValueError(f"--pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if decoder:
        if pooling == "mean":
            raise ValueError("--pooling mean is for encoders; decoder classifiers pool their last token")
        return "last"
    return checkpoint_pooling(location) if pooling == "auto" else pooling


class MeanPooling:
    """Hooks that make a HF encoder classifier's head read the masked token mean (see module doc)."""

    def __init__(self, model: nn.Module) -> None:
        spec = spec_for(model)
        if spec.decoder:
            raise ValueError("mean pooling is for encoders; decoder classifiers pool their last token")
        stack = get_submodule(model.base_model, spec.layers.rpartition(".")[0])
        self.mask: torch.Tensor | None = None
        self.handles = [
            model.register_forward_pre_hook(self._record_mask, with_kwargs=True),
            stack.register_forward_hook(self._pool),
        ]

    def _record_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        self.mask = mask
        return None

    def _pool(self, module, args, output):
        hidden = output[0]
        mask = self.mask
        if mask is None:
            mean = hidden.mean(dim=1, keepdim=True)
        else:
            m = mask[:, : hidden.shape[1]].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1.0)
        pooled = torch.cat([mean, hidden[:, 1:]], dim=1)
        if isinstance(output, tuple):
            return (pooled, *output[1:])
        output["last_hidden_state"] = pooled
        return output

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def apply_pooling(model: nn.Module, pooling: str) -> nn.Module:
    """Install `pooling` ('cls'/'last': the stock head; 'mean': MeanPooling) and record it in the config.

    Calling it again replaces what an earlier call installed (hooks never stack).
    """
    old = getattr(model, "_finegates_pooling", None)
    if old is not None:
        old.remove()
        del model._finegates_pooling
    if pooling == "mean":
        model._finegates_pooling = MeanPooling(model)  # keeps the hooks' state alive with the model
    model.config.finegates_pooling = pooling
    return model


def restore_pooling(model: nn.Module) -> nn.Module:
    """Re-install the pooling a saved config records (models saved before this option: stock head)."""
    pooling = getattr(model.config, CONFIG_KEY, None) or "cls"
    return apply_pooling(model, pooling) if pooling == "mean" else model
