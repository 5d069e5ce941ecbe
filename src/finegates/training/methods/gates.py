"""`gates`, FineGates as a method of the one training loop: gates (+ head, biases, weights per
recipe) train, the regularizer closes them to the sparsity target."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ...core.model import (
    apply_gates, count_gate_params, gate_parameters, gated_layers, gated_off_fraction, head_parameters,
    open_fractions,
)
from ..recipes import Recipe, get_recipe
from ..regularizer import Regularizer
from .registry import Method, parse_options, register

if TYPE_CHECKING:
    from ..config import TrainConfig


@dataclass
class GatesOptions:
    distill_weight: float = field(default=1.0, metadata={"help": "Weight of the SquareHead loss (with --distill squarehead)."})


@register
class GatesMethod(Method):
    """FineGates: frozen weights, trainable row/column gates (+ head, + biases per recipe)."""

    name = "gates"

    def __init__(self) -> None:
        self.reg: Regularizer | None = None
        self.recipe: Recipe | None = None
        self.distiller = None  # SquareHead from the dense model (--distill squarehead)

    def resolve_recipe(self, cfg: "TrainConfig", total_steps: int) -> Recipe:
        r = get_recipe(cfg.recipe, cfg.recipe_options)
        reg = replace(
            r.reg,
            sparsity=cfg.sparsity,
            lam=cfg.lam if cfg.lam is not None else r.reg.lam,
            start_step=cfg.reg_start_step if cfg.reg_start_step is not None
            else r.reg.start_step or int(r.warmup_fraction * total_steps),
            ramp_steps=r.reg.ramp_steps or int(r.ramp_fraction * total_steps),
        )
        if cfg.regularizer is not None:
            reg = replace(reg, kind=cfg.regularizer, schedule=reg.schedule if cfg.regularizer == "budget" else "none")
        gate = r.gate
        if cfg.train_bias is not None:
            gate = replace(gate, train_bias=cfg.train_bias)
        if cfg.train_weights is not None:
            gate = replace(gate, train_weights=cfg.train_weights)
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
        from ..distill import make_distiller

        opts = parse_options(GatesOptions, cfg.method_options, self.name)
        self.recipe = self.resolve_recipe(cfg, total_steps)
        self.distiller = make_distiller(cfg.distill or "none", model, opts.distill_weight)  # before gating: dense teacher
        apply_gates(model, self.recipe.gate)
        self.reg = Regularizer(model, self.recipe.reg)
        gate_ids = {id(p) for p in gate_parameters(model)}
        head_ids = {id(p) for p in head_parameters(model)}
        weight_ids = {id(m.base.weight) for m in gated_layers(model) if m.base.weight.requires_grad}
        adapter_ids = {id(p) for m in gated_layers(model) if m.lora_A is not None for p in (m.lora_A, m.lora_B)}
        gates = [p for p in model.parameters() if id(p) in gate_ids]
        head = [p for p in model.parameters() if p.requires_grad and id(p) in head_ids]
        weights = [p for p in model.parameters() if id(p) in weight_ids]
        adapters = [p for p in model.parameters() if id(p) in adapter_ids]
        rest = [p for p in model.parameters()
                if p.requires_grad and id(p) not in gate_ids | head_ids | weight_ids | adapter_ids]
        groups = [{"params": gates, "lr": self.recipe.gate_lr, "name": "gates"}]
        for params, lr, name in ((head, self.recipe.head_lr, "head"), (rest, self.recipe.bias_lr, "biases"),
                                 (weights, self.recipe.weight_lr, "weights"), (adapters, self.recipe.adapter_lr, "adapters")):
            if params:
                groups.append({"params": params, "lr": lr, "name": name})
        return groups

    def before_step(self, model, step) -> None:
        self.reg.set_step(step)  # this step's target and lambda, on the host and in device scalars

    def extra_loss(self, model, step, batch, outputs):
        penalty = self.reg.term(step)
        lam, target = self.reg.scalars()  # device tensors, read back only when a trace line is written
        logs = {"lambda": lam, "target": target}  # lambda: 0 before the penalty starts
        if self.distiller is not None:
            feat = self.distiller.loss(batch)
            logs["distill"] = feat.detach()
            penalty = penalty + feat
        return penalty, logs

    def graph_key(self, step):
        return None if self.distiller is not None else "gates"  # one computation for every step (reg.penalises)

    def after_step(self, model, step) -> None:
        self.reg.after_step(step)  # schedule taylor closes units here

    def discard_step(self, model) -> None:
        self.reg.discard_taylor()

    def finish(self, model) -> None:
        if self.distiller is not None:
            self.distiller.remove()
            self.distiller = None

    def progress(self) -> dict:
        return {"removed": f"{self.reg.removed_fraction():.2f}", "target": f"{self.reg.target:.2f}"}

    def summary(self, model) -> dict:
        return {
            "recipe": self.recipe.name,
            "gate_params": count_gate_params(model),
            "gated_off_fraction": gated_off_fraction(model),
            "removable_fraction": self.reg.removed_fraction(),
            "sparsity_target": self.reg.cfg.sparsity,
            "expected_kept_fraction": float(self.reg.kept_fraction().detach()),
            "open_fractions": open_fractions(model),
            "lambda": self.reg.lam,
        }

    def state(self) -> dict:
        return self.reg.state()

    def load_state(self, state: dict) -> None:
        self.reg.load_state(state)

