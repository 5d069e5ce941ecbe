"""Structured magnitude pruning: the gates' structure and sparsity, chosen by weight norm, no gate training.

The ablation that shows what the gates learn. Gates go on the same layers as `gates` runs, then
every deletable unit of a block is scored by weight norm:
  MLP unit j      ||up row j|| * ||down col j|| (* ||gate row j|| with SwiGLU)
  V/O dim (h, j)  ||v row (g(h), j)|| * ||o col (h, j)||
  Q/K dim (h, j)  ||q row (h, j)|| * ||k row (g(h), j)||   (with RoPE: dims j and j + D/2 as one pair)
and the lowest units are closed (an O column closes a V/O dim, Q rows close a Q/K dim or pair,
up rows close an MLP unit) until the parameters that compression removes, counted by the same
coupling rules as the gates' regulariser (`coupling.keep`/`kept_params`), reach `--sparsity` of
the blocks' linear parameters. Gate values are exactly 0 (closed) or 1 (open); the gates are then
frozen and only the task head trains. The run directory is a gated run: `compress` reads it as it
reads a `gates` run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from ...core.coupling import DELETABLE_SIDE, BlockLayout, keep, kept_params
from ...core.gates import GatedLinear, GateParam
from ...core.model import (
    GateConfig, apply_gates, count_gate_params, gate_parameters, gated_off_fraction, head_parameters, open_fractions,
)
from ..recipes import Recipe, get_recipe
from ..regularizer import RegConfig, Regularizer
from .baseline import Baseline, head_group
from .registry import register

# identity mean, no noise: theta = +1 -> value clamp(1.5) = 1, theta = -1 -> clamp(-0.5) = 0 (closed)
FIXED_GATES = GateParam(mean_fn="identity", init_mean=1.0, init_std=0.0, noise_std=0.0, reg_sigma=0.5)
OPEN, CLOSED = 1.0, -1.0


@dataclass
class MagnitudeOptions:
    allocation: str = field(default="uniform", metadata={
        "help": "uniform: every block and unit type loses the same fraction of units (the paper's per-layer "
                "target); global: one ranking of all units by norm / mean norm of their block and type."})

    def __post_init__(self) -> None:
        if self.allocation not in ("uniform", "global"):
            raise ValueError(f"magnitude: allocation must be uniform or global, got {self.allocation!r}")


@dataclass
class _Units:
    """The deletable units of one block: kind, index within its kind, and priority (lowest goes first)."""

    block: int
    kind: str  # "mlp", "vo", "qk"
    priority: torch.Tensor  # (n,)


@register
class MagnitudeMethod(Baseline):
    """One-shot structured magnitude pruning to `--sparsity` (uniform allocation by default), frozen
    0/1 gates, task head trained at lr 1e-3 (the gates' head lr)."""

    name = "magnitude"
    Options = MagnitudeOptions
    default_lr = 1e-3

    def __init__(self) -> None:
        super().__init__()
        self.recipe: Recipe | None = None
        self.reg: Regularizer | None = None

    def setup(self, model, cfg, total_steps):
        base = get_recipe(cfg.recipe)
        roles = tuple(cfg.gate_roles) if cfg.gate_roles is not None else base.gate.roles
        gate = GateConfig(roles=roles, param=FIXED_GATES, train_bias=False, train_head=True)
        self.recipe = replace(base, name="magnitude", gate=gate,
                              reg=RegConfig(kind="budget", sparsity=cfg.sparsity, lam=0.0),
                              gate_lr=0.0, head_lr=self.head_lr, bias_lr=0.0, ramp_fraction=0.0,
                              description="structured magnitude pruning: fixed 0/1 gates, head trained")
        apply_gates(model, gate)
        self.reg = Regularizer(model, self.recipe.reg)
        prune_structured(model, cfg.sparsity, self.opts.allocation)
        for p in gate_parameters(model):
            p.requires_grad_(False)
        return [head_group(model, self.head_lr)]

    def extra_loss(self, model, step, batch, outputs):
        return None, {}

    def config(self):
        from dataclasses import asdict

        return {**asdict(self.recipe), "rebuild": "gates", "allocation": self.opts.allocation}

    def trainable_state(self, model):
        """Gates + head, exactly what a `gates` run saves (so compress loads it the same way)."""
        ids = {id(p) for p in gate_parameters(model)} | {id(p) for p in head_parameters(model)}
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if id(p) in ids}

    def progress(self):
        return {"removed": f"{self.reg.removed_fraction():.2f}"}

    def summary(self, model):
        return {"recipe": "magnitude", "gate_params": count_gate_params(model),
                "gated_off_fraction": gated_off_fraction(model), "removable_fraction": self.reg.removed_fraction(),
                "target_sparsity": self.sparsity, "open_fractions": open_fractions(model)}


# ---- scoring and selection ------------------------------------------------------------------------
def _row_norms(m: GatedLinear | None, side: str) -> torch.Tensor | None:
    if m is None:
        return None
    w = m.base.weight.detach().float()
    return (w.norm(dim=1) if side == "rows" else w.norm(dim=0)).cpu()  # selection runs on CPU


def _block_units(i: int, gated: dict[str, GatedLinear], lay: BlockLayout) -> list[_Units]:
    """Norm scores of the block's units that its gates can close (a role without gates can't close)."""
    H, G, D, group = lay.n_heads, lay.n_kv_heads, lay.head_dim, lay.group
    norm = {r: _row_norms(gated.get(r), DELETABLE_SIDE[r]) for r in ("q", "k", "v", "o", "up", "gate", "down")}
    ones = lambda n: torch.ones(n)  # noqa: E731 - a missing role counts as norm 1
    units = []
    if "up" in gated:
        s = norm["up"] * (norm["down"] if norm["down"] is not None else 1.0)
        if lay.swiglu and norm["gate"] is not None:
            s = s * norm["gate"]
        units.append(_Units(i, "mlp", s))
    to_group = torch.arange(H) // group
    if "o" in gated:
        v = (norm["v"] if norm["v"] is not None else ones(G * D)).view(G, D)[to_group]
        units.append(_Units(i, "vo", (v * norm["o"].view(H, D)).flatten()))
    if "q" in gated:
        q = norm["q"].view(H, D)
        k = (norm["k"] if norm["k"] is not None else ones(G * D)).view(G, D)[to_group]
        if lay.rope:
            half = D // 2
            pair = lambda x: (x[:, :half] ** 2 + x[:, half:] ** 2).sqrt()  # noqa: E731
            units.append(_Units(i, "qk", (pair(q) * pair(k)).flatten()))
        else:
            units.append(_Units(i, "qk", (q * k).flatten()))
    return units


def _open_masks(closed: dict[str, torch.Tensor], lay: BlockLayout, gated: dict[str, GatedLinear]) -> dict[str, torch.Tensor]:
    """0/1 open vectors of the deletable sides (up rows, o cols, q rows) from closed-unit flags."""
    out = {}
    if "mlp" in closed:
        out["up"] = 1.0 - closed["mlp"].float()
    if "vo" in closed:
        out["o"] = 1.0 - closed["vo"].float()
    if "qk" in closed:
        c = closed["qk"].float().view(lay.n_heads, -1)
        if lay.rope:
            c = torch.cat([c, c], dim=1)  # a closed pair closes both q rows
        out["q"] = 1.0 - c.flatten()
    return out


# ---- Wanda-style structured criterion (weight norm x input activation norm) -----------------------
@torch.no_grad()
def activation_norms(model: nn.Module, batches, autocast: bool = False) -> dict[tuple[int, str], torch.Tensor]:
    """Per gated layer (block, role), the L2 norm over calibration tokens of what the Wanda
    criterion reads: the *inputs* of `o` and `down` (per column) and the *outputs* of `q` and `k`
    (per row). `batches`: model inputs (dicts); the model must be gated with all gates open."""
    sums: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def hook(key, side):
        def f(module, args, output):
            x = (args[0] if side == "in" else output).detach().float()
            sq = x.pow(2).reshape(-1, x.shape[-1]).sum(0)
            sums[key] = sums[key] + sq if key in sums else sq
        return f

    for m in model.modules():
        if isinstance(m, GatedLinear) and m.role in ("o", "down", "q", "k"):
            handles.append(m.register_forward_hook(hook((m.layer, m.role), "in" if m.role in ("o", "down") else "out")))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for b in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast and device.type == "cuda"):
                model(**{k: v.to(device) for k, v in b.items()}, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: v.sqrt().cpu() for k, v in sums.items()}


def _wanda_units(i: int, gated: dict[str, GatedLinear], lay: BlockLayout,
                 norms: dict[tuple[int, str], torch.Tensor]) -> list[_Units]:
    """Wanda-style scores of a block's units (structured: one score per deletable unit):
      MLP unit j      ||down col j|| * ||input of down at j||
      V/O dim (h, j)  ||o col (h, j)|| * ||input of o at (h, j)||
      Q/K dim (h, j)  ||q output at (h, j)|| * ||k output at (g(h), j)||  (RoPE: per pair)
    """
    H, G, D = lay.n_heads, lay.n_kv_heads, lay.head_dim
    col = lambda role: gated[role].base.weight.detach().float().norm(dim=0).cpu()
    units = []
    if "up" in gated and "down" in gated and (i, "down") in norms:
        units.append(_Units(i, "mlp", col("down") * norms[(i, "down")]))
    if "o" in gated and (i, "o") in norms:
        units.append(_Units(i, "vo", col("o") * norms[(i, "o")]))
    if "q" in gated and (i, "q") in norms and (i, "k") in norms:
        to_group = torch.arange(H) // lay.group
        q, k = norms[(i, "q")].view(H, D), norms[(i, "k")].view(G, D)[to_group]
        if lay.rope:
            half = D // 2
            pair = lambda x: (x[:, :half] ** 2 + x[:, half:] ** 2).sqrt()
            units.append(_Units(i, "qk", (pair(q) * pair(k)).flatten()))
        else:
            units.append(_Units(i, "qk", (q * k).flatten()))
    return units


def prune_structured(model: nn.Module, sparsity: float, allocation: str = "uniform",
                     act_norms: dict[tuple[int, str], torch.Tensor] | None = None) -> float:
    """Close the lowest-scoring units of a gated model until `sparsity` of the blocks' linear
    parameters would be removed; returns the removed fraction reached (>= sparsity, the least
    number of units that gets there). Scores: weight norms (magnitude), or with `act_norms`
    (from `activation_norms`) the Wanda-style weight x activation criterion."""
    layout = Regularizer._collect_blocks(model)
    if act_norms is None:
        units = [u for i, (lay, gated) in enumerate(layout) for u in _block_units(i, gated, lay)]
    else:
        units = [u for i, (lay, gated) in enumerate(layout) for u in _wanda_units(i, gated, lay, act_norms)]
    if not units:
        raise ValueError("magnitude: no closable units (gate q, o or up layers)")
    order = _priority_order(units, allocation)  # (unit list index, position) lowest first
    dense = sum(lay.dense_params() for lay, _ in layout)

    def removed(k: int) -> float:
        closed = _closed_flags(units, order[:k])
        kept = 0.0
        for i, (lay, gated) in enumerate(layout):
            kept += float(kept_params(keep(_open_masks(closed.get(i, {}), lay, gated), lay), lay))
        return 1.0 - kept / dense

    lo = fewest_reaching(removed, len(order), sparsity, "magnitude: closing every unit")
    closed = _closed_flags(units, order[:lo])
    with torch.no_grad():
        for i, (lay, gated) in enumerate(layout):
            opened = _open_masks(closed.get(i, {}), lay, gated)
            for m in gated.values():
                for side, g in m.gates().items():
                    g.theta.fill_(OPEN)
                    if side == DELETABLE_SIDE[m.role] and m.role in opened:
                        g.theta.copy_(torch.where(opened[m.role] > 0, OPEN, CLOSED).to(g.theta))
    return removed(lo)


def _priority_order(units: list[_Units], allocation: str) -> list[tuple[int, int]]:
    keys = []
    for ui, u in enumerate(units):
        if allocation == "uniform":  # rank within (block, kind) as a fraction: every group goes at the same pace
            rank = torch.empty_like(u.priority)
            rank[torch.argsort(u.priority)] = torch.arange(len(u.priority), dtype=rank.dtype)
            key = (rank + 1) / len(u.priority)
        else:  # norm relative to its group's mean: comparable across blocks and kinds
            key = u.priority / u.priority.mean().clamp_min(1e-12)
        keys.append(key)
    flat = torch.cat(keys)
    owner = torch.cat([torch.full((len(k),), ui) for ui, k in enumerate(keys)])
    pos = torch.cat([torch.arange(len(k)) for k in keys])
    idx = torch.argsort(flat, stable=True)
    return list(zip(owner[idx].tolist(), pos[idx].tolist()))


def _closed_flags(units: list[_Units], chosen: list[tuple[int, int]]) -> dict[int, dict[str, torch.Tensor]]:
    flags = {}
    for ui, u in enumerate(units):
        flags.setdefault(u.block, {})[u.kind] = torch.zeros(len(u.priority), dtype=torch.bool)
    for ui, pos in chosen:
        flags[units[ui].block][units[ui].kind][pos] = True
    return flags


def fewest_reaching(removed, n: int, sparsity: float, what: str) -> int:
    """The smallest k in [0, n] with `removed(k) >= sparsity`, by bisection (`removed`, the fraction
    removed by closing the k lowest-ranked units, grows with k); `what` names the n units."""
    if sparsity > 0 and removed(n) < sparsity:
        raise ValueError(f"{what} removes only {removed(n):.3f} < --sparsity {sparsity}")
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if removed(mid) >= sparsity:
            hi = mid
        else:
            lo = mid + 1
    return lo
