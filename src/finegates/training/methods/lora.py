"""LoRA (Hu et al., 2022) through peft: low-rank updates on chosen projections, head trained.

At the end of training the adapters are merged into the weights (`merge_and_unload`), so the
model the run saves and measures is a plain dense model of the original shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ...core.arch import get_submodule, spec_for
from ...core.model import head_parameters
from .baseline import Baseline
from .registry import register


@dataclass
class LoraOptions:
    r: int = field(default=8, metadata={"help": "LoRA rank."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA input."})
    targets: tuple[str, ...] = field(default=("q", "v"), metadata={"help": "Roles (q,k,v,o,up,gate,down) or module-name suffixes."})

    def __post_init__(self) -> None:
        if self.r <= 0 or self.alpha <= 0 or not (0.0 <= self.dropout < 1.0):
            raise ValueError("lora: r and alpha must be positive, dropout in [0, 1)")
        if not self.targets:
            raise ValueError("lora: --opt targets needs at least one role or module name")


@register
class LoraMethod(Baseline):
    """peft LoRA, default r=8, alpha=16, dropout 0.1 on the attention query and value projections
    (the LoRA paper's GLUE setting; module names come from the family's `arch.ARCHS` row), task
    head trained in full (peft `modules_to_save`), lr 5e-4 for adapters and head (the LoRA paper's
    RoBERTa-base GLUE range is 4e-4 to 5e-4)."""

    name = "lora"
    graphable = True
    Options = LoraOptions
    default_lr = 5e-4

    def __init__(self) -> None:
        super().__init__()
        self.peft_model = None
        self.targets: list[str] = []  # full module names carrying an adapter
        self.merged = False

    def target_modules(self, model: nn.Module) -> list[str]:
        spec = spec_for(model)
        return [spec.modules.get(t, t) for t in self.opts.targets]

    def setup(self, model, cfg, total_steps):
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer

        spec = spec_for(model)
        heads = [p for p in spec.head if _has(model, p)]
        lcfg = LoraConfig(
            r=self.opts.r, lora_alpha=self.opts.alpha, lora_dropout=self.opts.dropout,
            target_modules=self.target_modules(model), modules_to_save=heads or None, bias="none",
        )
        try:
            self.peft_model = get_peft_model(model, lcfg)  # injects adapters into `model` in place
        except ValueError as e:
            raise ValueError(f"lora: {str(e).splitlines()[0]}") from None
        self.targets = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
        adapters = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
        head = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
        return [{"params": adapters, "lr": self.lr, "name": "lora"}, {"params": head, "lr": self.head_lr, "name": "head"}]

    @torch.no_grad()
    def trainable_state(self, model):
        """Merged weights of the adapted layers + the trained head, under the plain HF names."""
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper

        out = {}
        if self.merged:
            for name in self.targets:
                lin = model.get_submodule(name)
                out[f"{name}.weight"] = lin.weight.detach().cpu().clone()
            head_ids = {id(p) for p in head_parameters(model)}
            out.update({n: p.detach().cpu().clone() for n, p in model.named_parameters() if id(p) in head_ids})
            return out
        for name, m in model.named_modules():
            if isinstance(m, LoraLayer):
                w = m.get_base_layer().weight.detach()
                for a in m.active_adapters:
                    if a in m.lora_A:
                        w = w + m.get_delta_weight(a).to(w.dtype)
                out[f"{name}.weight"] = w.cpu().clone()
            elif isinstance(m, ModulesToSaveWrapper):
                inner = m.modules_to_save["default"]
                out.update({f"{name}.{pn}": p.detach().cpu().clone() for pn, p in inner.named_parameters()})
        return out

    def finish(self, model):
        super().finish(model)
        if self.peft_model is not None and not self.merged:
            self.peft_model.merge_and_unload()  # replaces the LoRA layers of `model` in place
            self.merged = True

    def config(self):
        return {**super().config(), "target_modules": self.targets, "merged": True}


def _has(model: nn.Module, path: str) -> bool:
    try:
        get_submodule(model, path)
        return True
    except AttributeError:
        return False
