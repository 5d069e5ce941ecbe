"""Putting gates on a Hugging Face model, PEFT-style.

    model = finegates.apply_gates(hf_model, GateConfig())
    ... train ...
    state = finegates.gate_state_dict(model)        # small: gates (+ head, + biases if trained)
    finegates.load_gate_state_dict(fresh_gated, state)

Which linear layers get gates comes from the model family's row in `arch.ARCHS` (by role), or
from PEFT-like `target_modules` name suffixes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .arch import ArchSpec, blocks, get_submodule, spec_for
from .gates import TRAINING_ONLY, Gate, GateBank, GatedLinear, GateParam


@dataclass
class GateConfig:
    """Where gates go and how they are parameterised."""

    roles: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "Roles to gate (q,k,v,o,up,gate,down). None: every linear layer of every block."},
    )
    target_modules: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "PEFT-style module-name suffixes; overrides `roles` when given."},
    )
    layers: tuple[int, ...] | None = field(
        default=None, metadata={"help": "Block indices to gate. None: all blocks."}
    )
    rows: bool = field(default=True, metadata={"help": "Gate output rows."})
    cols: bool = field(default=True, metadata={"help": "Gate input columns."})
    param: GateParam = field(default_factory=GateParam, metadata={"help": "Gate parameterisation."})
    train_bias: bool = field(
        default=False, metadata={"help": "Also train the biases of gated layers (paper code option)."}
    )
    train_weights: bool = field(
        default=False, metadata={"help": "Also finetune the weights of gated layers (ours: gates over finetuned weights)."}
    )
    train_norm: bool = field(
        default=False, metadata={"help": "Also train the LayerNorm/RMSNorm parameters inside the blocks (ours)."}
    )
    train_head: bool = field(default=True, metadata={"help": "Train the task head (classifier)."})
    adapter_rank: int = field(default=0, metadata={
        "help": "Rank of a low-rank update of the frozen weight inside the gates (0: none); merged before compression."})
    adapter_alpha: float = field(default=16.0, metadata={"help": "Scale numerator of the low-rank update (alpha / rank)."})
    adapter_roles: tuple[str, ...] = field(default=("q", "v"), metadata={"help": "Roles that get the low-rank update."})

    def __post_init__(self) -> None:
        if not (self.rows or self.cols):
            raise ValueError("GateConfig: at least one of rows/cols must be gated")
        if self.roles is not None:
            self.roles = tuple(self.roles)
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)
        self.adapter_roles = tuple(self.adapter_roles)
        if self.adapter_rank < 0:
            raise ValueError(f"GateConfig: adapter_rank must be >= 0, got {self.adapter_rank}")


def _targets(model: nn.Module, spec: ArchSpec, cfg: GateConfig) -> list[tuple[int, str, str]]:
    """(layer index, role, path relative to the block) of every linear layer to gate."""
    found = []
    for i, _ in enumerate(blocks(model, spec)):
        if cfg.layers is not None and i not in cfg.layers:
            continue
        for role in spec.roles:
            path = spec.modules[role]
            if cfg.target_modules is not None:
                if not any(path == t or path.endswith("." + t) or t == role for t in cfg.target_modules):
                    continue
            elif cfg.roles is not None and role not in cfg.roles:
                continue
            found.append((i, role, path))
    return found


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(get_submodule(root, parent_path), name, module)


def apply_gates(model: nn.Module, cfg: GateConfig | None = None) -> nn.Module:
    """Freeze `model` and wrap its target linear layers in `GatedLinear`, in place.

    Trainable afterwards: the gates, the task head (if `cfg.train_head`), the biases and weights of
    the gated layers (if `cfg.train_bias`, `cfg.train_weights`). Returns the same model object.
    """
    cfg = cfg or GateConfig()
    spec = spec_for(model)
    targets = _targets(model, spec, cfg)
    if not targets:
        raise ValueError(f"GateConfig matched no linear layer of this {spec.family} model")
    for p in model.parameters():
        p.requires_grad_(False)
    layer_list = blocks(model, spec)
    for i, role, path in targets:
        block = layer_list[i]
        base = get_submodule(block, path)
        if isinstance(base, GatedLinear):
            raise ValueError(f"layer {i} {path} already has gates")
        if not isinstance(base, nn.Linear):
            raise TypeError(f"layer {i} {path} is {type(base).__name__}, not nn.Linear")
        rank = cfg.adapter_rank if role in cfg.adapter_roles else 0
        gated = GatedLinear(base, cfg.param, rows=cfg.rows, cols=cfg.cols, role=role, layer=i,
                            adapter_rank=rank, adapter_alpha=cfg.adapter_alpha)
        gated.to(dtype=torch.float32)  # gates always fp32, whatever the frozen weights are
        gated.base.to(base.weight.dtype)
        _set_submodule(block, path, gated)
        if cfg.train_bias and base.bias is not None:
            base.bias.requires_grad_(True)
        if cfg.train_weights:
            base.weight.requires_grad_(True)
    if cfg.train_norm:
        for p in norm_parameters(model, spec):
            p.requires_grad_(True)
    if cfg.train_head:
        for p in head_parameters(model, spec):
            p.requires_grad_(True)
    model.finegates_config = cfg
    model.finegates_bank = GateBank(model)  # every gate sampled in one pass per training forward
    return model


def head_parameters(model: nn.Module, spec: ArchSpec | None = None) -> list[nn.Parameter]:
    """Parameters of the task head (modules named in the family's `head`, where present)."""
    spec = spec or spec_for(model)
    params = []
    for path in spec.head:
        try:
            params.extend(get_submodule(model, path).parameters())
        except AttributeError:
            continue  # e.g. a base model without a classifier
    return params


def norm_parameters(model: nn.Module, spec: ArchSpec | None = None) -> list[nn.Parameter]:
    """Parameters of the normalisation layers inside the blocks (LayerNorm, RMSNorm)."""
    spec = spec or spec_for(model)
    return [
        p
        for m in blocks(model, spec).modules()
        if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")
        for p in m.parameters(recurse=False)
    ]


def gated_layers(model: nn.Module) -> list[GatedLinear]:
    return [m for m in model.modules() if isinstance(m, GatedLinear)]


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [m.theta for m in model.modules() if isinstance(m, Gate)]


def count_gate_params(model: nn.Module) -> int:
    """Trainable parameters counted the paper's way: the gate vectors alone."""
    return sum(p.numel() for p in gate_parameters(model))


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_params(model: nn.Module) -> int:
    """Parameters of the model as a user would deploy it (gates and low-rank updates excluded)."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.endswith(TRAINING_ONLY))


def gate_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor of a gated model (gates, head, trained biases): a run's small file."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_gate_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a `gate_state_dict` into a gated model of the same shape; refuse anything else."""
    own = dict(model.named_parameters())
    missing = sorted(n for n in own if own[n].requires_grad and n not in state)
    unknown = sorted(n for n in state if n not in own)
    if unknown or missing:
        raise ValueError(
            "gate state does not match this model: "
            + (f"unknown tensors {unknown[:3]}{'...' if len(unknown) > 3 else ''} " if unknown else "")
            + (f"missing tensors {missing[:3]}{'...' if len(missing) > 3 else ''}" if missing else "")
        )
    with torch.no_grad():
        for name, tensor in state.items():
            if own[name].shape != tensor.shape:
                raise ValueError(
                    f"gate state tensor {name} has shape {tuple(tensor.shape)}, "
                    f"model expects {tuple(own[name].shape)}"
                )
            own[name].copy_(tensor.to(own[name].dtype))


def merge_gates(model: nn.Module) -> nn.Module:
    """Bake evaluation gates into plain `nn.Linear` layers (PEFT's merge_and_unload), in place."""
    bank = model.__dict__.pop("finegates_bank", None)
    if bank is not None:
        bank.remove()
    for name, module in list(model.named_modules()):
        if isinstance(module, GatedLinear):
            _set_submodule(model, name, module.merged())
    return model


def gated_off_fraction(model: nn.Module) -> float:
    """Paper-style count over the gated layers: sum(numel - open_rows*open_cols) / sum(numel)."""
    layers = gated_layers(model)
    total = sum(m.base.weight.numel() for m in layers)
    return sum(m.gated_off_params() for m in layers) / max(total, 1)


def open_fractions(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per gated layer: expected open fraction (mean P(open)) and hard open fraction, rows and cols."""
    out: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for m in gated_layers(model):
            key = f"{m.layer}.{m.role}"
            out[key] = {}
            for side, g in m.gates().items():
                out[key][f"{side}_expected_open"] = float(g.open_prob().mean())
                out[key][f"{side}_open"] = float((~g.closed()).float().mean())
    return out


def gate_trace(model: nn.Module) -> dict:
    """Gate-value quantiles and gradient norm: the internals the recipe study plots."""
    thetas = gate_parameters(model)
    if not thetas:
        return {}
    with torch.no_grad():
        vals = torch.cat([g.values().flatten() for m in gated_layers(model) for g in m.gates().values()]).float().cpu()
        grads = [p.grad for p in thetas if p.grad is not None]
        gnorm = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads))) if grads else 0.0
    q = torch.quantile(vals, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])).tolist()
    return {"gate_q": [round(x, 4) for x in q], "gate_closed": float((vals <= 0).float().mean()),
            "gate_grad_norm": gnorm,
            "gate_hist": torch.histc(vals, bins=20, min=0.0, max=1.0).int().tolist()}
