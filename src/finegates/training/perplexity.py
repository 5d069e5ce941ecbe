"""Sliding-window perplexity, exact: one function for dense, gated and compressed decoders.

Windows of `window` tokens start every `stride` tokens; each token is scored once, by the first
window that reaches it, with the window's earlier tokens as context (at least `window - stride`
of them, except at the start). The first token has no context and is not scored; with stride ==
window (independent chunks) neither is the first token of each chunk. Result: exp(sum NLL /
scored tokens), with the scored count reported (the HF docs' evaluation).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.text import LMDataError
from .runtime import autocast


def check_window(window: int, stride: int) -> None:
    if window < 2 or stride < 1 or stride > window:
        raise ValueError(f"perplexity needs window >= 2 and 1 <= stride <= window, got window {window}, stride {stride}")


# ---- perplexity ----------------------------------------------------------------------------------
def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of every evaluation window over n_tokens tokens.

    Positions [score_from, end) are scored in the window [begin, end): each position once, by the
    first window that reaches it, never the window's own first token (it has no context). With
    stride < window that is every position 1..n-1; with stride == window (independent chunks, as
    in the HF recipe) the first token of every chunk goes unscored.
    """
    check_window(window, stride)
    out, prev_end, begin = [], 1, 0
    while prev_end < n_tokens:
        end = min(begin + window, n_tokens)
        if end - max(prev_end, begin + 1) > 0:
            out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        begin += stride
    return out


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, window: int = 512, stride: int = 256,
               batch_size: int = 8, progress: bool = False, amp: bool = True) -> dict:
    """Sliding-window perplexity of a causal LM on a token stream (see the module docstring).

    `amp`: on a GPU, run under bf16 autocast (False: fp32, as on CPU)."""
    ids = ids.flatten()
    if ids.numel() < 2:
        raise LMDataError("perplexity needs at least 2 tokens")
    was_training = model.training
    model.eval()
    device = _device_of(model)
    spans = windows(ids.numel(), window, stride)
    nll, count = 0.0, 0
    groups = _same_length_batches(spans, batch_size)
    for group in tqdm(groups, desc="perplexity", leave=False, disable=not progress):
        x = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
        with autocast(device, amp):
            logits = model(input_ids=x, use_cache=False).logits
        for row, (b, e, s) in enumerate(group):
            # logits at position t predict token t+1: positions s..e-1 from logits s-1..e-2
            pred = logits[row, s - 1 - b: e - 1 - b].float()
            nll += F.cross_entropy(pred, x[row, s - b: e - b], reduction="sum").item()
            count += e - s
    model.train(was_training)
    mean = nll / count
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count, "window": window, "stride": stride}


def _same_length_batches(spans, batch_size: int):
    groups, cur = [], []
    for span in spans:
        if cur and (len(cur) == batch_size or span[1] - span[0] != cur[0][1] - cur[0][0]):
            groups.append(cur)
            cur = []
        cur.append(span)
    return groups + [cur] if cur else groups
