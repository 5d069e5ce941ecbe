"""Schedules, one home for each: how much to remove by a step (the cubic ramp of gradual pruning,
used by the regularizer and the pruning baselines) and the learning-rate factor at a step."""

from __future__ import annotations

import math


def cubic(t: float, target: float) -> float:
    """`target * (1 - (1 - t)^3)`: the fraction removed when a fraction `t` of the ramp is done."""
    return target * (1.0 - (1.0 - t) ** 3)


def cubic_sparsity(step: int, total: int, target: float, start: float = 0.0, end: float = 1.0) -> float:
    """Gradual-pruning schedule (Zhu & Gupta, 2017): 0 until `start * total`, `target` from
    `end * total` on, `target * (1 - (1 - t)^3)` in between (t the fraction of the ramp done)."""
    t0, t1 = start * total, end * total
    if step <= t0:
        return 0.0
    if step >= t1:
        return target
    return cubic((step - t0) / (t1 - t0), target)


def lr_lambda(schedule: str, total: int, warmup: int):
    """The learning-rate factor at a step: linear warm-up, then cosine decay to 0 (or constant)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return f
