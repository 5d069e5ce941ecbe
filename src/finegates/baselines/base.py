"""What the baselines share: `--opt key=value` parsing, learning-rate defaults, the saved state.

Run directories of the dense-weight baselines (full, bitfit, lora, pst, gmp) hold in
`trainable.safetensors` every tensor that differs from the pretrained model (trained weights,
LoRA/PST updates merged in, masks applied, the new head), under the plain Hugging Face names.
`config.json`'s `method_config` says `"rebuild": "dense"`: load the pretrained classifier, then
overwrite those tensors (`load_trained`). `magnitude` is a gated model (`"rebuild": "gates"`),
saved like `gates` runs, so `compress` treats it the same.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn

from ..arch import blocks, get_submodule, spec_for
from ..methods import Method
from ..model import head_parameters

if typing.TYPE_CHECKING:
    from ..train import TrainConfig


# ---- options ----------------------------------------------------------------------------------
def _convert(key: str, raw, kind):
    if not isinstance(raw, str):
        return raw
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if raw.lower() in ("none", "") and type(None) in args:
            return None
        return _convert(key, raw, non_none[0])
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if origin is tuple:
            return tuple(v.strip() for v in raw.split(",") if v.strip())
        return kind(raw)
    except ValueError:
        raise ValueError(f"--opt {key}={raw}: expected a {getattr(kind, '__name__', kind)}") from None


def parse_options(cls, options: dict, method: str):
    """Build the options dataclass `cls` from `--opt key=value` strings; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"method {method} has no option {unknown[0]!r}: it takes "
            + (", ".join(sorted(known)) if known else "no --opt options")
        )
    return cls(**{k: _convert(k, v, hints[k]) for k, v in options.items()})


def options_help(cls) -> str:
    """`key=default (help)` for every option: the text `finegates train --help` shows."""
    return "; ".join(f"{f.name}={_fmt(f.default)}" for f in fields(cls))


def _fmt(v) -> str:
    return ",".join(v) if isinstance(v, tuple) else str(v)


# ---- shared Method plumbing ---------------------------------------------------------------------
@dataclass
class NoOptions:
    """This method takes no --opt options."""


class Baseline(Method):
    """A baseline: options from `--opt`, its own default learning rates, a dense saved state.

    Subclasses set `Options`, `default_lr` and `default_head_lr` (None: same as the main lr), and
    implement `setup(model, cfg, total_steps) -> list[param groups]`.
    """

    Options: type = NoOptions
    default_lr: float = 1e-3
    default_head_lr: float | None = None
    distills: bool = False  # whether --distill squarehead is supported

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
        return loss, {"distill": float(loss.detach())}

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


# ---- rebuilding a trained model from a run directory ---------------------------------------------
def load_trained(run_dir: str | Path) -> nn.Module:
    """The trained model of a dense-baseline run (`rebuild: dense`), ready for inference."""
    from safetensors.torch import load_file

    from ..runs import run_classifier

    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    mc = cfg.get("method_config") or {}
    if mc.get("rebuild") != "dense":
        raise ValueError(f"{run_dir}: not a dense-baseline run (method {cfg['train']['method']}); use the gates loader")
    model = run_classifier(cfg)
    state = load_file(str(run_dir / "trainable.safetensors"))
    own = model.state_dict()
    unknown = sorted(k for k in state if k not in own)
    if unknown:
        raise ValueError(f"{run_dir}: trainable.safetensors has tensors this model lacks: {unknown[:3]}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise ValueError(f"{run_dir}: tensor {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)
    return model.eval()


# ---- sparsity schedule -------------------------------------------------------------------------
def cubic_sparsity(step: int, total: int, target: float, start: float = 0.0, end: float = 1.0) -> float:
    """Gradual-pruning schedule (Zhu & Gupta, 2017): 0 until `start * total`, `target` from
    `end * total` on, `target * (1 - (1 - t)^3)` in between (t the fraction of the ramp done)."""
    t0, t1 = start * total, end * total
    if step <= t0:
        return 0.0
    if step >= t1:
        return target
    t = (step - t0) / (t1 - t0)
    return target * (1.0 - (1.0 - t) ** 3)


def smallest_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """0/1 mask (scores' dtype) zeroing exactly `int(numel * sparsity)` lowest scores."""
    mask = torch.ones_like(scores)
    k = int(scores.numel() * sparsity)
    if k > 0:
        idx = torch.topk(scores.detach().flatten(), k, largest=False, sorted=False).indices
        mask.view(-1)[idx] = 0.0
    return mask
