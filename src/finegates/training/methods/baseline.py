"""What the baselines share: `--opt key=value` parsing, learning-rate defaults, the saved state.

Run directories of the dense-weight baselines (full, bitfit, lora, pst, gmp) hold in
`trainable.safetensors` every tensor that differs from the pretrained model (trained weights,
LoRA/PST updates merged in, masks applied, the new head), under the plain Hugging Face names.
`config.json`'s `method_config` says `"rebuild": "dense"`: load the pretrained classifier, then
overwrite those tensors (`load_trained`). `magnitude` is a gated model (`"rebuild": "gates"`),
saved like `gates` runs, so `compress` treats it the same.
"""

from __future__ import annotations

import typing
from dataclasses import asdict

import torch
import torch.nn as nn

from ...core.arch import blocks, get_submodule, spec_for
from ...core.model import head_parameters
from .registry import Method, NoOptions, parse_options

if typing.TYPE_CHECKING:
    from ..config import TrainConfig


# ---- shared Method plumbing ---------------------------------------------------------------------
class Baseline(Method):
    """A baseline: options from `--opt`, its own default learning rates, a dense saved state.

    Subclasses set `Options`, `default_lr` and `default_head_lr` (None: same as the main lr), and
    implement `setup(model, cfg, total_steps) -> list[param groups]`.
    """

    Options: type = NoOptions
    default_lr: float = 1e-3
    default_head_lr: float | None = None
    distills: bool = False  # whether --distill squarehead is supported
    graphable: bool = False  # whether a step may be replayed as a CUDA graph (no host work in it)

    def __init__(self) -> None:
        self.opts = None
        self.lr = self.default_lr
        self.head_lr = self.default_head_lr
        self.distiller = None
        self.sparsity = 0.0

    def prepare(self, model: nn.Module, cfg: "TrainConfig", total_steps: int) -> list[dict]:
        self.opts = parse_options(self.Options, cfg.method_options, self.name)
        self.lr = cfg.lr if cfg.lr is not None else self.default_lr
        head_default = self.default_head_lr if self.default_head_lr is not None else self.lr
        self.head_lr = cfg.head_lr if cfg.head_lr is not None else head_default
        self.sparsity = cfg.sparsity
        distill = self.default_distill() if cfg.distill is None else cfg.distill
        if distill != "none" and not self.distills:
            raise ValueError(f"--distill {distill}: method {self.name} does not support distillation")
        if distill != "none":
            from ..distill import make_distiller

            self.distiller = make_distiller(distill, model, getattr(self.opts, "distill_weight", 1.0))
        self.distill_kind = distill
        groups = [g for g in self.setup(model, cfg, total_steps) if g["params"]]
        if not groups:
            raise ValueError(f"method {self.name}: nothing to train in this model")
        return groups

    def default_distill(self) -> str:
        return "none"

    def setup(self, model: nn.Module, cfg: "TrainConfig", total_steps: int) -> list[dict]:
        raise NotImplementedError

    def extra_loss(self, model, step, batch, outputs):
        if self.distiller is None:
            return None, {}
        loss = self.distiller.loss(batch)
        return loss, {"distill": loss.detach()}  # read back only when a trace line is written

    def graph_key(self, step):
        return () if self.graphable and self.distiller is None else None

    def config(self) -> dict:
        return {"name": self.name, "rebuild": "dense", "lr": self.lr, "head_lr": self.head_lr,
                "distill": getattr(self, "distill_kind", "none"), "options": asdict(self.opts) if self.opts else {}}

    def finish(self, model: nn.Module) -> None:
        if self.distiller is not None:
            self.distiller.remove()
            self.distiller = None  # frees the teacher


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def head_group(model: nn.Module, lr: float) -> dict:
    params = head_parameters(model)
    for p in params:
        p.requires_grad_(True)
    return {"params": params, "lr": lr, "name": "head"}


def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(full module name, layer) of every role linear layer of every transformer block."""
    spec = spec_for(model)
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for block in blocks(model, spec):
        for role in spec.roles:
            m = get_submodule(block, spec.modules[role])
            out.append((names[id(m)], m))
    return out


def requires_grad_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def smallest_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """0/1 mask (scores' dtype) zeroing exactly `int(numel * sparsity)` lowest scores."""
    mask = torch.ones_like(scores)
    k = int(scores.numel() * sparsity)
    if k > 0:
        idx = torch.topk(scores.detach().flatten(), k, largest=False, sorted=False).indices
        mask.view(-1)[idx] = 0.0
    return mask
