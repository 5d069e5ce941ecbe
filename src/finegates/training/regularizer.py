"""The sparsity penalty `R` of `loss = task_loss + lambda * R`, and the lambda controller.

Kinds:
  layer   (paper)  per gated layer, pull mean P(open) of rows and of columns to 1 - s; every
                   layer ends with the same sparsity.
  stg     (Yamada) mean P(open) over all gates (no target; lambda sets the sparsity).
  budget  (ours)   expected fraction of the blocks' linear parameters that compression would
                   delete, from the coupling rules (so residual-side gates, which delete nothing,
                   are not pushed), pulled to the target globally: layers may differ.

With `schedule="topk"` (ours, the default recipe) the penalty is the mean keep probability of the
*selected* units only: at each step the deletable units (MLP units, V/O dims, Q/K dims) are ranked
by their current gate values and the lowest-ranked ones, up to the scheduled target's parameter
cost, are pushed closed; the others feel no penalty and may reopen. Closed units rank lowest and
stay selected, so the hard removed count follows the cubic schedule without overshoot, and the
units that close are the ones the task gradient itself has been lowering (movement-pruning-like).

With `schedule="taylor"` (ours) nothing is penalised: gates close by decision, not by drift. Each
step, every MLP unit's first-order Taylor score (the loss change of scaling the unit's gates to 0,
Molchanov et al., 2019) is read from its gates' gradients, and an exponential average of its square
is its importance; then the least important open units are closed outright (gates.Gate.close), up
to the cubic schedule's target. So the gate learning rate no longer decides *when* gates close: the
gates (and weights) may train slowly while the schedule removes what the task gradient uses least.

With `schedule="controller"` (tried, overshoots; kept for the study) the penalty is `lambda_t * E[kept fraction]` and lambda_t is
adapted every step from the *hard* removed fraction (what compression would delete now) against
a target that ramps to `sparsity` over `ramp_steps`: lambda grows while the model lags the
schedule and shrinks once it is ahead. It is the importance threshold below which gates close,
so gates close in order of how little the task needs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..core.arch import blocks, spec_for
from ..core.block_stack import stack_blocks
from ..core.coupling import BlockLayout, keep
from ..core.distributed import all_mean
from ..core.gates import GatedLinear, open_prob
from .schedules import cubic


TOPK_UNITS = ("mlp", "vo", "qk")


@dataclass
class RegConfig:
    """Sparsity penalty settings."""

    kind: str = field(default="layer", metadata={"help": "layer (paper), stg, or budget (ours)."})
    sparsity: float = field(default=0.4, metadata={"help": "Target fraction of parameters removed, in [0, 1)."})
    lam: float = field(default=50.0, metadata={"help": "Penalty weight (initial value with the controller)."})
    start_step: int = field(default=0, metadata={"help": "Step from which the penalty applies."})
    schedule: str = field(default="none", metadata={
        "help": "none, topk (ours), taylor (ours: close by importance), or controller (budget only)."})
    ramp_steps: int = field(default=0, metadata={"help": "Steps over which the controller's target ramps to `sparsity`."})
    controller_rate: float = field(default=0.05, metadata={"help": "log-lambda step per update at full error."})
    lam_max: float = field(default=1e4, metadata={"help": "Upper bound on the controlled lambda."})
    importance_decay: float = field(default=0.99, metadata={
        "help": "With schedule taylor: decay of the exponential average of the units' squared Taylor scores."})
    units: tuple[str, ...] = field(default=TOPK_UNITS, metadata={
        "help": "Top-k candidates: mlp (MLP units), vo (V/O dims), qk (Q/K dims or RoPE pairs). Attention dims "
        "save less CPU time than their parameter count says (compressed heads are padded to one width)."})

    def __post_init__(self) -> None:
        self.units = tuple(self.units)
        if not self.units or set(self.units) - set(TOPK_UNITS):
            raise ValueError(f"units must be a non-empty subset of {', '.join(TOPK_UNITS)}, got {self.units!r}")
        if self.kind not in ("layer", "stg", "budget"):
            raise ValueError(f"regularizer kind must be layer, stg or budget, got {self.kind!r}")
        if not (0.0 <= self.sparsity < 1.0) or math.isnan(self.sparsity):
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.lam < 0:
            raise ValueError(f"lambda must be >= 0, got {self.lam}")
        if self.schedule not in ("none", "topk", "taylor", "controller"):
            raise ValueError(f"schedule must be none, topk, taylor or controller, got {self.schedule!r}")
        if self.schedule != "none" and self.kind != "budget":
            raise ValueError(f"schedule {self.schedule!r} works on the 'budget' regularizer only")
        if self.schedule == "taylor" and self.units != ("mlp",):
            raise ValueError(f"schedule 'taylor' closes MLP units only: units must be ('mlp',), got {self.units!r}")
        if not (0.0 <= self.importance_decay < 1.0):
            raise ValueError(f"importance_decay must be in [0, 1), got {self.importance_decay}")

    @property
    def controller(self) -> bool:
        return self.schedule == "controller"


class Regularizer(nn.Module):
    """Computes the penalty and tracks the removed fraction of a gated model."""

    def __init__(self, model: nn.Module, cfg: RegConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = [m for m in model.modules() if isinstance(m, GatedLinear)]
        self.blocks = self._collect_blocks(model)
        self.stacks = stack_blocks(self.blocks)  # identical blocks counted together (core/block_stack.py)
        self.dense = sum(lay.dense_params() for lay, _ in self.blocks)
        self.lam = cfg.lam
        self.target = cfg.sparsity
        self._scalars: torch.Tensor | None = None  # [lambda, target] on the device, refilled by `set_step`
        self._closed_to: float | None = None  # schedule taylor: the target units were last closed to
        self.importance: torch.Tensor | None = None  # schedule taylor: one score per MLP unit, all blocks
        # schedule taylor: the stacks whose MLP units have gates
        self.unit_stacks = [st for st in self.stacks if st.unit_gates]
        self._segments: tuple[torch.Tensor, ...] | None = None  # kind layer: which gate and layer each entry is
        if cfg.schedule == "taylor":
            if not self.unit_stacks:
                raise ValueError("schedule 'taylor' needs gated MLP layers (roles up/down): none are gated")
            for st in self.unit_stacks:
                for gates in st.unit_gates.values():
                    for g in gates:
                        g.track_taylor = True

    @staticmethod
    def _collect_blocks(model: nn.Module) -> list[tuple[BlockLayout, dict[str, GatedLinear]]]:
        spec = spec_for(model)
        out = []
        for block in blocks(model, spec):
            gated = {}
            bias = set()
            for role in spec.roles:
                m = block.get_submodule(spec.modules[role])
                if isinstance(m, GatedLinear):
                    gated[role] = m
                base = m.base if isinstance(m, GatedLinear) else m
                if getattr(base, "bias", None) is not None:
                    bias.add(role)
            out.append((BlockLayout.from_config(model.config, spec, frozenset(bias)), gated))
        return out

    # ---- counts -------------------------------------------------------------------------
    def kept_fraction(self, hard: bool = False) -> torch.Tensor:
        """Fraction of the blocks' linear parameters kept (expected, or hard with `hard=True`)."""
        return sum(st.kept_params(hard) for st in self.stacks) / self.dense

    @torch.no_grad()
    def removed_fraction(self) -> float:
        """What compression would delete from the blocks' linear layers right now."""
        return 1.0 - float(self.kept_fraction(hard=True))

    # ---- penalty ------------------------------------------------------------------------
    def penalty(self) -> torch.Tensor:
        keep_frac = 1.0 - self.cfg.sparsity
        if self.cfg.kind == "stg":
            return self._all_open_probs().mean()
        if self.cfg.kind == "layer":
            return self._layer_penalty(keep_frac)
        if self.cfg.schedule == "topk":
            return self._topk_penalty()
        expected_kept = self.kept_fraction()
        if self.cfg.controller:
            return expected_kept
        return (expected_kept - keep_frac).abs()

    def _gates(self) -> list:
        return [g for m in self.layers for g in m.gates().values()]

    def _all_open_probs(self) -> torch.Tensor:
        """P(open) of every gate of every gated layer, concatenated in layer order: one pass per
        run of gates that share a parameterisation (usually one for the whole model)."""
        gates, parts, run = self._gates(), [], []
        for g in gates:
            if run and g.param != run[0].param:
                parts.append(open_prob(torch.cat([x.theta for x in run]), run[0].param))
                run = []
            run.append(g)
        parts.append(open_prob(torch.cat([x.theta for x in run]), run[0].param))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _layer_penalty(self, keep_frac: float) -> torch.Tensor:
        """The paper's: mean over gated layers of the mean over their gate vectors of
        |mean P(open) - (1 - s)|, as segment sums (index_add) instead of a loop over gates."""
        probs = self._all_open_probs()
        gate_of, size, layer_of, sides = self._segment_index(probs.device)
        per_gate = torch.zeros(size.numel(), device=probs.device, dtype=probs.dtype).index_add(0, gate_of, probs) / size
        dev = (per_gate - keep_frac).abs()
        per_layer = torch.zeros(sides.numel(), device=probs.device, dtype=dev.dtype).index_add(0, layer_of, dev) / sides
        return per_layer.mean()

    def _segment_index(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(gate of each entry, size of each gate, layer of each gate, gate vectors of each layer), on
        `device`, made once (by `set_step`, before the step that uses them)."""
        if self._segments is None or self._segments[0].device != device:
            sizes, layer_of, sides = [], [], []
            for i, m in enumerate(self.layers):
                gates = list(m.gates().values())
                sizes += [g.theta.numel() for g in gates]
                layer_of += [i] * len(gates)
                sides.append(len(gates))
            gate_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
            self._segments = tuple(t.to(device) for t in (gate_of, torch.tensor(sizes, dtype=torch.float32),
                                                           torch.tensor(layer_of), torch.tensor(sides, dtype=torch.float32)))
        return self._segments

    def _topk_penalty(self) -> torch.Tensor:
        """Mean keep probability of the lowest-ranked units covering the scheduled target."""
        soft, score, cost, total = [], [], [], 0.0
        for st in self.stacks:
            lay = st.layout
            d, share, dims = lay.hidden, lay.hidden / lay.group, lay.n_heads * lay.head_dim
            units = (("mlp", d * (3 if lay.swiglu else 2), lay.intermediate), ("vo", d + share, dims), ("qk", d + share, dims))
            total += st.n_blocks * sum(c * n for _, c, n in units)  # the budget is a fraction of every unit's parameters
            if not st.gates:
                continue  # nothing gated here: nothing to push
            p = keep(st.open(hard=False), lay)
            with torch.no_grad():
                v = keep(st.values(), lay)
            names = [name for name, _, _ in units if name in self.cfg.units]
            costs = [torch.full_like(v[name].flatten(1), c) for name, c, _ in units if name in self.cfg.units]  # exact in fp32
            # block by block, each block's units in the order mlp, vo, qk (ties rank by this position)
            soft.append(torch.cat([p[n].flatten(1) for n in names], dim=1).flatten())
            score.append(torch.cat([v[n].flatten(1) for n in names], dim=1).flatten())
            cost.append(torch.cat(costs, dim=1).flatten())
        soft, score, cost = torch.cat(soft), torch.cat(score), torch.cat(cost)
        order = torch.argsort(score, stable=True)
        soft, cost = soft[order], cost[order].double()  # float64: integer costs summed exactly
        chosen = _first_covering(cost, self._device_scalars()[1] * total)
        chosen[:1] = True  # at least the lowest-ranked unit (a slice: no host-to-device copy)
        cost = cost.to(soft.dtype) * chosen
        return (soft * cost).sum() / cost.sum()

    # ---- taylor: close by importance ---------------------------------------------------------
    def after_step(self, step: int) -> None:
        """With schedule taylor: update the units' importance, then close the least important
        open units until the hard removed fraction reaches this step's scheduled target."""
        if self.cfg.schedule != "taylor":
            return
        scores = torch.cat([st.taylor_scores() for st in self.unit_stacks])
        self.discard_taylor()
        sq = all_mean(scores) ** 2  # every process closes the same units
        decay = self.cfg.importance_decay
        self.importance = sq if self.importance is None else decay * self.importance + (1.0 - decay) * sq
        if step >= self.cfg.start_step and self.cfg.sparsity > 0.0 and self.target != self._closed_to:
            self._close_to_target()  # closed units stay closed: at an unchanged target there is nothing to close
            self._closed_to = self.target

    def discard_taylor(self) -> None:
        """Drop the Taylor terms of a skipped (non-finite) batch: one multi-tensor kernel."""
        sums = [g.taylor for st in self.unit_stacks for gates in st.unit_gates.values() for g in gates
                if g.taylor is not None]
        if sums:
            torch._foreach_zero_(sums)

    @torch.no_grad()
    def _close_to_target(self) -> None:
        """Without reading anything back from the device: the units to close are a mask."""
        need = (self.target - (1.0 - self.kept_fraction(hard=True).double())) * self.dense  # parameters to delete
        open_, cost = [], []
        for st in self.unit_stacks:
            units = (keep(st.open(hard=True), st.layout)["mlp"] > 0).flatten()
            open_.append(units)
            cost.append(torch.full(units.shape, float(st.unit_cost()), device=units.device, dtype=torch.float64))
        open_, cost = torch.cat(open_), torch.cat(cost)
        # open units by importance (ties by position), closed ones last and free
        order = torch.argsort(self.importance.masked_fill(~open_, math.inf), stable=True)
        ranked = _first_covering(cost[order] * open_[order], need) & open_[order]
        chosen = torch.zeros_like(open_).scatter(0, order, ranked)
        start = 0
        for st in self.unit_stacks:
            st.close_units(chosen[start:start + st.n_units])
            start += st.n_units

    def scheduled_target(self, step: int) -> float:
        ramp = self.cfg.ramp_steps
        if ramp <= 0:
            return self.cfg.sparsity
        t = min(1.0, max(0, step - self.cfg.start_step) / ramp)
        return cubic(t, self.cfg.sparsity)  # like gradual pruning

    def forward(self, step: int) -> tuple[torch.Tensor, float]:
        """(lambda * R, lambda) for this step; zero before `start_step`."""
        self.set_step(step)
        return self.term(step), self.lam if self.penalised(step) else 0.0

    def set_step(self, step: int) -> None:
        """The host's part of a step, before its forward pass: this step's target and lambda, also
        written to the device scalars the penalty reads (so a step replayed as a CUDA graph sees them)."""
        if self.cfg.schedule != "none":
            self.target = self.scheduled_target(step)  # 0 until start_step: the bar shows the warm-up
        if self.penalised(step) and self.cfg.controller:
            self._update_lambda(step)
        scalars = self._device_scalars()
        scalars[0].fill_(self.lam if self.penalised(step) else 0.0)  # fills with a host value: no read-back
        scalars[1].fill_(self.target)
        if self.cfg.kind == "layer":
            self._segment_index(scalars.device)  # made here, on the host, never inside a captured step

    def penalises(self) -> bool:
        """Whether any step is penalised. If so, every step computes the penalty, scaled by a device
        lambda that is 0 before `start_step`: a step replayed as a CUDA graph then has one computation
        for the whole run and is captured once, not again at `start_step` (two eager warm-up passes
        and a capture, issue 19)."""
        return self.cfg.sparsity > 0.0 and self.cfg.schedule != "taylor"

    def penalised(self, step: int) -> bool:
        """Whether the penalty applies at `step` (lambda > 0)."""
        return step >= self.cfg.start_step and self.penalises()

    def term(self, step: int) -> torch.Tensor:
        """lambda * R on the device, with the lambda (0 before `start_step`) and target `set_step` wrote;
        zero when no step is penalised."""
        if not self.penalises():
            return torch.zeros((), device=self.layers[0].base.weight.device)
        penalty = self.penalty()
        return self._device_scalars()[0].to(penalty.dtype) * penalty

    def scalars(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lambda, target) as device tensors: what this step's penalty used."""
        scalars = self._device_scalars()
        return scalars[0], scalars[1]

    def _device_scalars(self) -> torch.Tensor:
        device = self.layers[0].base.weight.device
        if self._scalars is None or self._scalars.device != device:
            self._scalars = torch.tensor([self.lam, self.target], device=device, dtype=torch.float64)  # target: exact
        return self._scalars

    def _update_lambda(self, step: int) -> None:
        error = (self.target - self.removed_fraction()) / max(self.cfg.sparsity, 1e-6)
        error = max(-1.0, min(1.0, error * 10.0))  # full speed once 10% of the target away
        self.lam = min(self.cfg.lam_max, max(1e-6, self.lam * math.exp(self.cfg.controller_rate * error)))

    def state(self) -> dict:
        out = {"lam": self.lam, "target": self.target}
        if self.importance is not None:
            out["importance"] = self.importance.detach().cpu()
        return out

    def load_state(self, state: dict) -> None:
        self.lam = float(state["lam"])
        self.target = float(state["target"])
        if "importance" in state:
            self.importance = state["importance"].to(self.layers[0].base.weight.device)


def _first_covering(cost: torch.Tensor, need) -> torch.Tensor:
    """Mask of the shortest prefix of `cost` whose sum reaches `need` (all of it if none does; none
    if need <= 0): the units before which less than `need` was covered."""
    return (torch.cumsum(cost, 0) - cost) < need
