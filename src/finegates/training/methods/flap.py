"""FLAP-style structured pruning (An et al., AAAI 2024): no training, a fluctuation criterion, one
adaptive ranking across layers and modules, and bias compensation.

The criterion reads the inputs of the two layers that write back to the residual stream, `o`
(one channel per attention head dim) and `down` (one channel per MLP unit), over calibration tokens:

    metric_j = Var_n(x_nj) * ||W[:, j]||^2       (weighted input-feature variance, FLAP's WIFV)

A channel whose input hardly fluctuates can be replaced by its mean: that is what bias compensation
does, so the variance, not the magnitude, says what removing it costs. The metrics are standardised
within each block and kind (attention, MLP); a head scores the mean over its channels, since FLAP
removes whole heads; then heads and MLP units of every block are ranked together (FLAP's AL-AM
structure: the allocation adapts across layers and modules) and the lowest are closed until
`sparsity` of the blocks' linear parameters would be removed, counted by the coupling rules
compression uses (`coupling.keep`/`kept_params`), as for the magnitude and Wanda-style baselines.

Bias compensation: a removed channel j still contributed W[:, j] x_j, on average W[:, j] mean(x_j);
that constant goes into the layer's bias. Llama's o_proj and down_proj have no bias: `add_bias`
gives them one (zeros, then the compensation), `compress` keeps it (the plan's per-layer `bias`
list, rebuild.py) and `load` and the folder's remote code rebuild it.

    stats = fluctuation_stats(model, batches)      # gated with FLAP_GATES, all open
    removed = prune_flap(model, 0.3, stats)        # closes heads/units, adds the compensation biases
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ...core.coupling import BlockLayout, keep, kept_params
from ...core.gates import GatedLinear
from ...core.model import GateConfig
from ..regularizer import Regularizer
from .magnitude import FIXED_GATES, fewest_reaching

# FLAP reads and closes only the inputs (columns) of o and down
FLAP_GATES = GateConfig(roles=("o", "down"), rows=False, cols=True, param=FIXED_GATES, train_head=False)
ROLES = ("o", "down")


@torch.no_grad()
def fluctuation_stats(model: nn.Module, batches) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """Per gated `o`/`down` layer (block, role): the mean and the (unbiased) variance of each input
    channel over every calibration token, accumulated in float64. `batches`: model inputs (dicts)."""
    acc: dict[tuple[int, str], list] = {}
    handles = []

    def hook(key):
        def f(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            n, s, sq = acc.get(key, (0, 0.0, 0.0))
            acc[key] = (n + x.shape[0], s + x.sum(0), sq + (x * x).sum(0))
        return f

    for m in model.modules():
        if isinstance(m, GatedLinear) and m.role in ROLES:
            handles.append(m.register_forward_hook(hook((m.layer, m.role))))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for b in batches:
            model(**{k: v.to(device) for k, v in b.items()}, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for key, (n, s, sq) in acc.items():
        mean = s / n
        var = ((sq - n * mean * mean) / max(n - 1, 1)).clamp_min(0.0)
        out[key] = {"mean": mean.float().cpu(), "var": var.float().cpu()}
    return out


def _standardise(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-12)


def _scores(layout, stats, heads: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per block: (head scores (H,), MLP unit scores (I,)), standardised within the block and kind;
    without `heads`, every head scores +inf (never chosen)."""
    out = []
    for i, (lay, gated) in enumerate(layout):
        metric = {}
        for role in ROLES:
            w = gated[role].base.weight.detach().float().cpu()
            metric[role] = stats[(i, role)]["var"] * w.pow(2).sum(0)
        head = _standardise(metric["o"]).view(lay.n_heads, lay.head_dim).mean(1)
        out.append((head if heads else torch.full_like(head, math.inf), _standardise(metric["down"])))
    return out


def _open_masks(closed_heads: torch.Tensor, closed_units: torch.Tensor, lay: BlockLayout) -> dict[str, torch.Tensor]:
    """0/1 open vectors of o's columns (a closed head closes all its channels) and down's columns."""
    o = (~closed_heads).float().repeat_interleave(lay.head_dim)
    return {"o": o, "down": (~closed_units).float()}


def prune_flap(model: nn.Module, sparsity: float, stats: dict, heads: bool = True) -> float:
    """Close the lowest-ranked heads and MLP units of a model gated with `FLAP_GATES` (all open)
    until `sparsity` of the blocks' linear parameters would be removed (the fewest that get there),
    then add the compensation biases. Returns the removed fraction reached. `heads=False`: MLP
    units only (on SmolLM2 the better choice at 20% removed, the worse at 30%: docs/decoders.md)."""
    layout = Regularizer._collect_blocks(model)
    missing = [(i, r) for i, (_, gated) in enumerate(layout) for r in ROLES if r not in gated or (i, r) not in stats]
    if missing:
        raise ValueError(f"flap: no gated layer or no statistics for block/role {missing[0]}: gate with FLAP_GATES "
                         "and run fluctuation_stats first")
    scores = _scores(layout, stats, heads)
    flat = torch.cat([torch.cat([h, u]) for h, u in scores])
    order = torch.argsort(flat, stable=True)  # lowest first
    sizes = [len(h) + len(u) for h, u in scores]
    dense = sum(lay.dense_params() for lay, _ in layout)

    def closed_flags(k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        chosen = torch.zeros(len(flat), dtype=torch.bool)
        chosen[order[:k]] = True
        parts = torch.split(chosen, sizes)
        return [(c[: len(h)], c[len(h):]) for c, (h, _) in zip(parts, scores)]

    def removed(k: int) -> float:
        kept = sum(float(kept_params(keep(_open_masks(*c, lay), lay), lay))
                   for c, (lay, _) in zip(closed_flags(k), layout))
        return 1.0 - kept / dense

    candidates = len(flat) if heads else len(flat) - sum(len(h) for h, _ in scores)  # +inf heads sort last
    lo = fewest_reaching(removed, candidates, sparsity, "flap: closing every candidate head and unit")
    reached = removed(lo)
    with torch.no_grad():
        for i, ((lay, gated), flags) in enumerate(zip(layout, closed_flags(lo))):
            masks = _open_masks(*flags, lay)
            for role in ROLES:
                m = gated[role]
                shut = masks[role] < 0.5
                m.col_gate.close(shut.to(m.col_gate.theta.device))
                compensation = m.base.weight.detach().float().cpu()[:, shut] @ stats[(i, role)]["mean"][shut]
                add_bias(m, compensation)
    return reached


def add_bias(m: GatedLinear, value: torch.Tensor | None = None) -> None:
    """Give a gated layer's frozen linear a bias if it has none (zeros), and add `value` to it."""
    base = m.base
    if base.bias is None:
        base.bias = nn.Parameter(torch.zeros(base.out_features, dtype=base.weight.dtype, device=base.weight.device),
                                 requires_grad=False)
    if value is not None:
        with torch.no_grad():
            base.bias += value.to(base.bias)


def add_biases(model: nn.Module, roles=ROLES) -> None:
    """Zero biases on every gated layer of `roles` that lacks one: a FLAP model's shape, before its
    saved tensors (thetas + biases) are loaded into a freshly gated copy."""
    for m in model.modules():
        if isinstance(m, GatedLinear) and m.role in roles:
            add_bias(m)
