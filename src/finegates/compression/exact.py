"""Exact compression: bake the evaluation gates into the weights, then delete what they closed.

    compressed = finegates.compression.compress(gated_model)   # in place; same logits (fp32 ~1e-6)
    finegates.compression.save_compressed(compressed, tokenizer, "model-dir", report)   # saved.py
    model = finegates.load("model-dir")                        # rebuilt at the saved shapes, strict

Per block, `coupling.keep` (fed 0/1 open masks) decides what goes, so the count training
steers and the count compression delivers are the same numbers (METHOD.md section 2). The
residual stream (hidden size) is not cut: its gates stay as scaling baked into the weights
(docs/compression.md has the measurement behind that choice).

A layer keeps its stock block and, wherever it can, its stock attention module, so what the
family computes beyond the projections (relative position biases, RoPE, sliding windows, q/k
norms) stays the stock code: Q/K/V/O and MLP linears are cut to their kept rows/columns and the
module's head counts set from the table. rebuild.py says when the padded `CompactAttention` is
used instead, and documents the saved format. A layer whose whole attention or MLP is closed
keeps only a `Constant` (its output bias). `pipeline.compress_run` checks the result against the
gated model on real examples and refuses to write one that differs beyond a tolerance.
"""

from __future__ import annotations


import torch
import torch.nn as nn

from ..core.arch import ArchSpec, blocks, spec_for
from ..core.compact import AttnLayout
from ..core.coupling import DELETABLE_SIDE, BlockLayout, keep, kept_params
from ..core.gates import GatedLinear
from ..core.model import count_params
from .rebuild import FORMAT_VERSION, attention_module, build_block, set_module


# ---- what survives ----------------------------------------------------------------------
def _baked(block: nn.Module, spec: ArchSpec) -> dict[str, nn.Linear]:
    """Every role's linear layer with its evaluation gates baked in (`W <- z_r W z_c`)."""
    out = {}
    for role in spec.roles:
        m = block.get_submodule(spec.modules[role])
        out[role] = m.merged() if isinstance(m, GatedLinear) else m
    return out


def _open_masks(block: nn.Module, spec: ArchSpec) -> dict[str, torch.Tensor]:
    """0/1 open indicator of each role's deletable side (roles without that gate: all open)."""
    out = {}
    for role in spec.roles:
        m = block.get_submodule(spec.modules[role])
        gate = m.gates().get(DELETABLE_SIDE[role]) if isinstance(m, GatedLinear) else None
        if gate is not None:
            out[role] = (~gate.closed()).float().detach().cpu()
    return out


def block_layout(config, spec: ArchSpec, linears: dict[str, nn.Linear]) -> BlockLayout:
    bias = frozenset(r for r, m in linears.items() if getattr(m, "bias", None) is not None)
    return BlockLayout.from_config(config, spec, bias)


def attn_layout(kp: dict[str, torch.Tensor], lay: BlockLayout) -> AttnLayout:
    """Turn `keep`'s masks into lists of kept heads, kv heads and dims."""
    on = {k: v > 0.5 for k, v in kp.items()}
    heads = torch.nonzero(on["head"]).flatten().tolist()
    to_group = [h // lay.group for h in heads]
    groups = sorted(set(to_group))
    dims = lambda row: torch.nonzero(row).flatten().tolist()  # noqa: E731
    return AttnLayout(
        head_dim=lay.head_dim, rope=lay.rope, heads=heads, groups=groups,
        head_group=[groups.index(g) for g in to_group],
        q_dims=[dims(on["qk"][h]) for h in heads], o_dims=[dims(on["vo"][h]) for h in heads],
        k_dims=[dims(on["k"][g]) for g in groups], v_dims=[dims(on["v"][g]) for g in groups],
    )


def _rows(lay: AttnLayout, which: str) -> list[int]:
    """Original row (q/k/v) or column (o) indices kept, in the compact order."""
    D = lay.head_dim
    owners = lay.heads if which in ("q", "o") else lay.groups
    per = {"q": lay.q_dims, "k": lay.k_dims, "v": lay.v_dims, "o": lay.o_dims}[which]
    return [o * D + j for o, ds in zip(owners, per) for j in ds]


# ---- constants that deletion must keep ------------------------------------------------------
def _activation(config):
    from transformers.activations import ACT2FN

    name = getattr(config, "hidden_act", None) or getattr(config, "activation", "gelu")
    return ACT2FN[name] if isinstance(name, str) else name


def _mlp_fold(lin: dict[str, nn.Linear], removed: torch.Tensor, swiglu: bool, act) -> torch.Tensor | None:
    """The constant a deleted MLP unit still adds to `down`'s output (None if all zero).

    A deleted unit's up (or gate) row is closed, or its down column is. A closed row with an
    ungated bias outputs the constant act(b_j) (SwiGLU: act(b_gate_j) * b_up_j), which is folded
    into down's bias as act(b_j) * W_down[:, j]. Row gates scale the bias, so with GatedLinear
    this is zero; it matters for models gated on columns only.
    """
    if removed.numel() == 0:
        return None
    up, down = lin["up"], lin["down"]
    w_down = down.weight[:, removed]
    up_dead = (up.weight[removed] == 0).all(1)
    b_up = up.bias[removed] if up.bias is not None else torch.zeros(len(removed), dtype=up.weight.dtype)
    if swiglu:
        gate = lin["gate"]
        gate_dead = (gate.weight[removed] == 0).all(1)
        b_gate = gate.bias[removed] if gate.bias is not None else torch.zeros_like(b_up)
        g_const, u_const = act(b_gate), b_up
        const = torch.where(gate_dead & up_dead, g_const * u_const, torch.zeros_like(b_up))
        live = (w_down != 0).any(0) & ~((gate_dead & (g_const == 0)) | (up_dead & (u_const == 0)) | (gate_dead & up_dead))
    else:
        const = torch.where(up_dead, act(b_up), torch.zeros_like(b_up))
        live = (w_down != 0).any(0) & ~up_dead
    if bool(live.any()):
        raise ValueError("compress: an MLP unit marked removable still depends on its input "
                         "(ungated bias on a closed SwiGLU row?); deleting it would not be exact")
    fold = w_down @ const
    return fold if bool((fold != 0).any()) else None


def _v_fold(lin: dict[str, nn.Linear], lay: BlockLayout, kept_vo: torch.Tensor) -> torch.Tensor | None:
    """Deleted V/O dims whose V row is weightless but has a bias: attention passes b_v through."""
    v, o, D = lin["v"], lin["o"], lay.head_dim
    if v.bias is None:
        return None
    fold = torch.zeros(o.weight.shape[0], dtype=o.weight.dtype)
    for h in range(lay.n_heads):
        g = h // lay.group
        for j in torch.nonzero(kept_vo[h] < 0.5).flatten().tolist():
            b = v.bias[g * D + j]
            if b != 0 and bool((v.weight[g * D + j] == 0).all()):
                fold += b * o.weight[:, h * D + j]
    return fold if bool((fold != 0).any()) else None


# ---- cutting ------------------------------------------------------------------------------
def _copy(module: nn.Module, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    with torch.no_grad():
        if weight is not None and isinstance(module, nn.Linear):
            module.weight.copy_(weight)
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(bias)


def _add_bias(b: torch.Tensor | None, fold: torch.Tensor | None, n: int, dtype) -> torch.Tensor | None:
    if fold is None:
        return b
    return (b if b is not None else torch.zeros(n, dtype=dtype)) + fold


@torch.no_grad()
def compress_block(block: nn.Module, spec: ArchSpec, config, layer_idx: int) -> dict:
    """Compress one block in place; return its plan (layout + which roles have a bias)."""
    lin = _baked(block, spec)
    lay = block_layout(config, spec, lin)
    kp = keep(_open_masks(block, spec), lay)
    layout = attn_layout(kp, lay)
    units = torch.nonzero(kp["mlp"] > 0.5).flatten()
    removed = torch.nonzero(kp["mlp"] < 0.5).flatten()
    mlp_fold = _mlp_fold(lin, removed, lay.swiglu, _activation(config))
    v_fold = _v_fold(lin, lay, kp["vo"])
    d = lay.hidden
    o_bias = _add_bias(lin["o"].bias, v_fold, d, lin["o"].weight.dtype)
    down_bias = _add_bias(lin["down"].bias, mlp_fold, d, lin["down"].weight.dtype)
    bias = sorted(r for r, m in lin.items() if m.bias is not None)
    bias = sorted(set(bias) | ({"o"} if o_bias is not None else set()) | ({"down"} if down_bias is not None else set()))
    plan = {"attn": layout.to_dict(), "attn_module": attention_module(layout, spec), "mlp": units.tolist(), "bias": bias}
    dtype = lin["q"].weight.dtype
    build_block(block, spec, config, plan, layer_idx, dtype)
    device = lin["q"].weight.device
    for role in ("q", "k", "v", "o"):
        idx = torch.tensor(_rows(layout, role), dtype=torch.long, device=device)
        m = lin[role]
        target = block.get_submodule(spec.modules[role]) if layout.heads or role == "o" else None
        if target is None:
            continue
        if role == "o":
            _copy(target, m.weight[:, idx] if layout.heads else None, o_bias)
        else:
            _copy(target, m.weight[idx], None if m.bias is None else m.bias[idx])
    for role in ("up", "gate"):
        if role in lin:
            m = lin[role]
            _copy(block.get_submodule(spec.modules[role]), m.weight[units], None if m.bias is None else m.bias[units])
    _copy(block.get_submodule(spec.modules["down"]), lin["down"].weight[:, units] if len(units) else None, down_bias)
    block.to(device)
    return plan


def compress(model: nn.Module) -> nn.Module:
    """Bake the gates and delete every row/column the coupling rules allow, in place.

    Returns the same model in eval mode, with `model.config.finegates` recording every layer's
    shapes (what `save_compressed` writes and `load` rebuilds).
    """
    spec = spec_for(model)
    model.eval()
    plans = [compress_block(b, spec, model.config, i) for i, b in enumerate(blocks(model, spec))]
    for name, m in list(model.named_modules()):  # gated layers outside the blocks, if any
        if isinstance(m, GatedLinear):
            set_module(model, name, m.merged())
    model.config.finegates = {"format_version": FORMAT_VERSION, "task_class": type(model).__name__, "layers": plans}
    if hasattr(model, "finegates_config"):
        del model.finegates_config
    bank = model.__dict__.pop("finegates_bank", None)  # its gates are gone
    if bank is not None:
        bank.remove()
    return model.eval()  # the new modules start in training mode


def layer_params(model: nn.Module) -> int:
    """Parameters inside the transformer blocks (all of them: linears and norms)."""
    return sum(count_params(b) for b in blocks(model))


def predicted_kept(model: nn.Module) -> int:
    """What `compress` will leave in the blocks' linear layers (coupling count, gated model)."""
    spec = spec_for(model)
    total = 0
    for block in blocks(model, spec):
        lay = block_layout(model.config, spec, _baked(block, spec))
        total += int(kept_params(keep(_open_masks(block, spec), lay), lay))
    return total


def linear_params(model: nn.Module) -> int:
    """Parameters of the blocks' role linears (what coupling counts), on a dense or compressed model."""
    spec = spec_for(model)
    total = 0
    for block in blocks(model, spec):
        for role in spec.roles:
            try:
                m = block.get_submodule(spec.modules[role])
            except AttributeError:  # a compressed layer without attention has no q/k/v
                continue
            m = m.base if isinstance(m, GatedLinear) else m
            total += sum(p.numel() for p in m.parameters())
    return total
