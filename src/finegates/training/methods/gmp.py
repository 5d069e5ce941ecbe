"""Gradual magnitude pruning + SquareHead distillation (Kurtic et al., 2023).

Every weight trains (as full finetuning). The weights of the transformer blocks' linear layers
are pruned by magnitude, unstructured, on the cubic schedule of Zhu & Gupta (2017) up to
`--sparsity`: every `freq` steps the mask zeroes the smallest |w|, and after every optimizer step
the pruned weights are set back to 0. The loss adds the SquareHead feature distillation from the
dense teacher (the model before training, `training/distill.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...core.model import head_parameters
from ..schedules import cubic_sparsity
from .baseline import Baseline, block_linears, smallest_mask
from .registry import register


@dataclass
class GMPOptions:
    start: float = field(default=0.0, metadata={"help": "Fraction of steps before pruning starts."})
    end: float = field(default=0.7, metadata={"help": "Fraction of steps at which the target sparsity is reached."})
    freq: int = field(default=0, metadata={"help": "Steps between mask updates (0: 20 updates over the ramp)."})
    scope: str = field(default="layer", metadata={"help": "layer: each matrix at the same sparsity; global: one threshold."})
    distill_weight: float = field(default=1.0, metadata={"help": "Weight of the SquareHead loss."})

    def __post_init__(self) -> None:
        if not (0.0 <= self.start < self.end <= 1.0):
            raise ValueError(f"gmp: need 0 <= start < end <= 1, got start={self.start} end={self.end}")
        if self.scope not in ("layer", "global"):
            raise ValueError(f"gmp: scope must be layer or global, got {self.scope!r}")
        if self.freq < 0 or self.distill_weight < 0:
            raise ValueError("gmp: freq and distill_weight must be >= 0")


@register
class GMPMethod(Baseline):
    """GMP + SquareHead: all weights trainable at lr 5e-5 *(ours; oBERT-style downstream pruning
    uses 5e-5 to 1e-4)*, cubic schedule from 0% to 70% of the steps (the rest finetunes at the
    target), 20 mask updates over the ramp, per-matrix sparsity, SquareHead weight 1 added to the
    task loss (`--distill none` turns it off)."""

    name = "gmp"
    Options = GMPOptions
    default_lr = 5e-5
    distills = True

    def __init__(self) -> None:
        super().__init__()
        self.weights: dict[str, torch.nn.Parameter] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.total_steps = 1
        self.current = 0.0

    def default_distill(self) -> str:
        return "squarehead"

    def setup(self, model, cfg, total_steps):
        self.total_steps = total_steps
        self.weights = {f"{n}.weight": lin.weight for n, lin in block_linears(model)}
        head_ids = {id(p) for p in head_parameters(model)}
        for p in model.parameters():
            p.requires_grad_(True)
        body = [p for p in model.parameters() if id(p) not in head_ids]
        head = [p for p in model.parameters() if id(p) in head_ids]
        return [{"params": body, "lr": self.lr, "name": "weights"}, {"params": head, "lr": self.head_lr, "name": "head"}]

    @property
    def freq(self) -> int:
        ramp = (self.opts.end - self.opts.start) * self.total_steps
        return self.opts.freq or max(1, int(ramp // 20))

    def schedule(self, step: int) -> float:
        return cubic_sparsity(step, self.total_steps, self.sparsity, self.opts.start, self.opts.end)

    def after_step(self, model, step):
        done = step + 1
        target = self.schedule(done)
        due = done % self.freq == 0 or done >= self.opts.end * self.total_steps
        if target > self.current and (due or done == self.total_steps):
            self.update_masks(target)
        self.apply_masks()

    @torch.no_grad()
    def update_masks(self, sparsity: float) -> None:
        if self.opts.scope == "layer":
            self.masks = {n: smallest_mask(w.abs(), sparsity).bool() for n, w in self.weights.items()}
        else:
            flat = torch.cat([w.detach().abs().flatten().float() for w in self.weights.values()])
            keep = smallest_mask(flat, sparsity).bool()
            self.masks, start = {}, 0
            for n, w in self.weights.items():
                self.masks[n] = keep[start:start + w.numel()].view_as(w)
                start += w.numel()
        self.current = sparsity

    @torch.no_grad()
    def apply_masks(self) -> None:
        for n, mask in self.masks.items():
            self.weights[n].mul_(mask.to(self.weights[n].dtype))

    @torch.no_grad()
    def achieved_sparsity(self) -> float:
        zeros = sum(int((w == 0).sum()) for w in self.weights.values())
        return zeros / max(sum(w.numel() for w in self.weights.values()), 1)

    def progress(self):
        return {"sparsity": f"{self.current:.2f}"}

    def state(self) -> dict:
        """For --resume: the sparsity reached and the masks (pruned weights must stay pruned)."""
        return {"current": self.current, "masks": {n: m.cpu() for n, m in self.masks.items()}}

    def load_state(self, state: dict) -> None:
        self.current = float(state["current"])
        self.masks = {n: m.to(self.weights[n].device).bool() for n, m in state["masks"].items()}

    def trainable_state(self, model):
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}

    def summary(self, model):
        return {"target_sparsity": self.sparsity, "unstructured_sparsity": self.achieved_sparsity(),
                "sparsity_scope": "weights of the transformer blocks' linear layers (unstructured: no dense speed-up)"}
