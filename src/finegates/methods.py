"""Training methods share one loop; a method decides what trains and what extra loss applies.

`gates` is FineGates. The baselines of the seed papers (full finetuning, LoRA, BitFit, PST, GMP +
SquareHead, structured magnitude pruning) register here too, so every method writes the same
run directory and is measured by the same code.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from .model import apply_gates, count_gate_params, gate_parameters, head_parameters, open_fractions, gated_off_fraction
from .recipes import Recipe, get_recipe
from .regularizer import Regularizer

if TYPE_CHECKING:
    from .train import TrainConfig


class Method:
    """Base class: subclasses set up trainable parameters and may add a loss term."""

    name = "base"

    def prepare(self, model: nn.Module, cfg: "TrainConfig", total_steps: int) -> list[dict]:
        """Modify `model` in place; return optimizer parameter groups."""
        raise NotImplementedError

    def extra_loss(self, model: nn.Module, step: int, batch: dict, outputs) -> tuple[torch.Tensor | None, dict]:
        """An extra loss term and scalars to log for this step (`outputs` of the model on `batch`)."""
        return None, {}

    def after_step(self, model: nn.Module, step: int) -> None:
        """Hook after the optimizer step (masks, schedules)."""

    def summary(self, model: nn.Module) -> dict:
        """Method-specific entries for metrics.json."""
        return {}

    def progress(self) -> dict:
        """Short values for the progress bar."""
        return {}

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass


class GatesMethod(Method):
    """FineGates: frozen weights, trainable row/column gates (+ head, + biases per recipe)."""

    name = "gates"

    def __init__(self) -> None:
        self.reg: Regularizer | None = None
        self.recipe: Recipe | None = None
        self._last: dict = {}

    def resolve_recipe(self, cfg: "TrainConfig", total_steps: int) -> Recipe:
        r = get_recipe(cfg.recipe)
        reg = replace(
            r.reg,
            sparsity=cfg.sparsity,
            lam=cfg.lam if cfg.lam is not None else r.reg.lam,
            start_step=cfg.reg_start_step if cfg.reg_start_step is not None else r.reg.start_step,
            ramp_steps=r.reg.ramp_steps or int(r.ramp_fraction * total_steps),
        )
        if cfg.regularizer is not None:
            reg = replace(reg, kind=cfg.regularizer, controller=cfg.regularizer == "budget" and reg.controller)
        gate = r.gate
        if cfg.train_bias is not None:
            gate = replace(gate, train_bias=cfg.train_bias)
        if cfg.gate_roles is not None:
            gate = replace(gate, roles=tuple(cfg.gate_roles))
        return replace(
            r,
            reg=reg,
            gate=gate,
            gate_lr=cfg.lr if cfg.lr is not None else r.gate_lr,
            head_lr=cfg.head_lr if cfg.head_lr is not None else r.head_lr,
        )

    def prepare(self, model, cfg, total_steps):
        self.recipe = self.resolve_recipe(cfg, total_steps)
        apply_gates(model, self.recipe.gate)
        self.reg = Regularizer(model, self.recipe.reg)
        gate_ids = {id(p) for p in gate_parameters(model)}
        head_ids = {id(p) for p in head_parameters(model)}
        gates = [p for p in model.parameters() if id(p) in gate_ids]
        head = [p for p in model.parameters() if p.requires_grad and id(p) in head_ids]
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids | head_ids]
        groups = [{"params": gates, "lr": self.recipe.gate_lr, "name": "gates"}]
        if head:
            groups.append({"params": head, "lr": self.recipe.head_lr, "name": "head"})
        if rest:
            groups.append({"params": rest, "lr": self.recipe.bias_lr, "name": "biases"})
        return groups

    def extra_loss(self, model, step, batch, outputs):
        penalty, lam = self.reg(step)
        self._last = {"lambda": lam, "target": self.reg.target}
        return penalty, self._last

    def progress(self) -> dict:
        return {"removed": f"{self.reg.removed_fraction():.2f}", "lam": f"{self.reg.lam:.2g}"}

    def summary(self, model) -> dict:
        return {
            "recipe": self.recipe.name,
            "gate_params": count_gate_params(model),
            "gated_off_fraction": gated_off_fraction(model),
            "removable_fraction": self.reg.removed_fraction(),
            "expected_kept_fraction": float(self.reg.kept_fraction().detach()),
            "open_fractions": open_fractions(model),
            "lambda": self.reg.lam,
        }

    def state(self) -> dict:
        return self.reg.state()

    def load_state(self, state: dict) -> None:
        self.reg.load_state(state)


METHODS: dict[str, type[Method]] = {"gates": GatesMethod}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]()
