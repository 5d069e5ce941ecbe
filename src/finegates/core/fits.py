"""What a model can take, checked before training: its position table, its token types, its head.

An input beyond these fails deep inside `torch.nn.functional.embedding` (a 60-line traceback,
after the model has loaded) or in a many-line weight-loading report; checked here it is one line
naming the model, the limit, and what to change.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn

from .arch import spec_for_model_type


class InputError(ValueError):
    """Inputs the model cannot take; the message names the model and the limit."""


def max_tokens(model: nn.Module, tokenizer) -> int | None:
    """The longest input `model` takes: its position table (RoPE families have none) less the slots
    before the first position (RoBERTa and MPNet number positions from padding_idx + 1), capped by
    the tokenizer's `model_max_length`. None: no limit."""
    config = model.config
    limits = [getattr(tokenizer, "model_max_length", None)]
    table = getattr(config, "max_position_embeddings", None)
    if table is not None and not spec_for_model_type(config.model_type).rope:
        embeddings = getattr(model.base_model, "embeddings", None)
        offset = getattr(embeddings, "padding_idx", None)  # only set where positions start after it
        limits.append(table - (offset + 1 if isinstance(offset, int) else 0))
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 10**6]
    return min(limits) if limits else None


def check_token_types(model: nn.Module, features: Iterable[dict], location: str) -> None:
    """Refuse token type ids the model has no embedding for (a BERT tokenizer marks the second
    text of a pair with type 1; a model with type_vocab_size=1 has only type 0)."""
    n = getattr(model.config, "type_vocab_size", None)
    if n is None:
        return
    top = max((max(f["token_type_ids"], default=0) for f in features if "token_type_ids" in f), default=0)
    if top >= n:
        raise InputError(f"{location}: the tokenizer gives token type ids up to {top} (the second text of a pair), "
                         f"but the model has {n} token type{'s' if n > 1 else ''} (type_vocab_size={n}): give one "
                         "text column, or a model trained on sentence pairs")


def check_head(config, num_labels: int, location: str) -> None:
    """A folder that holds a trained sequence-classification head must have as many outputs as the
    task needs (transformers refuses to load a head of another shape, in a long report)."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs) and config.num_labels != num_labels:
        raise InputError(f"{location}: its classification head has {config.num_labels} outputs, the task needs "
                         f"{num_labels}: use the base model (without a task head) or a task with "
                         f"{config.num_labels} labels")
