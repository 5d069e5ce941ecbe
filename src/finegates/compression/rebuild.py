"""Rebuilding a compressed model at its saved shapes: the `finegates` key of config.json -> modules.

    model = AutoModelForSequenceClassification.from_config(config)   # stock, dense shapes
    rebuild(model, config.finegates)                                   # cut to the saved shapes
    model.load_state_dict(load_file("model.safetensors"), strict=True)

This module needs only torch, transformers and the core `arch` table and `compact` modules, so a
compressed folder can be rebuilt outside finegates too (a `trust_remote_code` modeling file).

Saved format (config.json, key `finegates`; SliceGPT-style: weights + per-layer shapes):
  format_version  2 (format 1 folders, where every attention was a CompactAttention, still load)
  task_class      the transformers class of the model, e.g. "MPNetForSequenceClassification"
  layers          one plan per block, in order:
    attn          `AttnLayout` (compact.py), original indices: head_dim, rope, heads (kept query
                  heads), groups (kept kv heads), head_group (per kept head, its group's position
                  in `groups`), q_dims/o_dims (per kept head: kept Q rows / O columns within the
                  head), k_dims/v_dims (per kept kv head: kept K / V rows)
    attn_module   "stock" or "compact" (below)
    mlp           kept MLP units (original indices, sorted)
    bias          roles ("q", "k", "v", "o", "up", "gate", "down") whose linear has a bias
config.json's `finegates_pooling` ("cls", "mean", "last") records the pooling (pooling.py).
model.safetensors holds the stock tensor names at the compact shapes: q/k/v keep exactly their
kept rows, o its kept columns, up/gate their kept units' rows, down their columns.

Attention, per layer:
  "stock"    the family's own attention module stays (MPNet's relative position bias, RoPE,
             sliding windows, q/k norms, scaling: all the stock code). Q/K/V/O become
             `PaddedLinear`s storing the kept rows/columns and computing at (kept heads x the
             original head dim), deleted dims as zero slots, so every score is exact. The head
             counts its forward reads are set from the table (`ArchSpec.head_attrs`), and a hook
             keeps the kept heads of per-head inputs (`ArchSpec.head_inputs`).
  "compact"  `CompactAttention` (compact.py), only where the stock module cannot hold the layer:
             no head left (O outputs its bias), or a GQA layer whose kept kv heads keep different
             numbers of query heads (the stock `repeat_kv` needs equal numbers).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from ..core.arch import ArchSpec, blocks, get_submodule, head_counts, spec_for
from ..core.compact import AttnLayout, CompactAttention, Constant, padded_linear, spread_indices

FORMAT_VERSION = 2
READS = (1, 2)  # format versions `rebuild` reads


class CompressedModelError(ValueError):
    """A compressed-model folder that does not match its own recorded shapes."""


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_submodule(root, parent), name, module)


def linear(n_in: int, n_out: int, bias: bool, dtype: torch.dtype) -> nn.Linear:
    """An uninitialised linear layer (its weights are copied or loaded right after)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Initializing zero-element tensors is a no-op"
        return torch.nn.utils.skip_init(nn.Linear, n_in, n_out, bias=bias, dtype=dtype)


def attention_module(lay: AttnLayout, spec: ArchSpec) -> str:
    """'stock' where the family's own module can compute the layer, else 'compact' (module doc)."""
    if not lay.heads:
        return "compact"
    counts = torch.bincount(torch.tensor(lay.head_group), minlength=len(lay.groups))
    if bool((counts == counts[0]).all()):  # heads are sorted, so equal counts are contiguous groups
        return "stock"
    if spec.head_inputs:
        raise ValueError(f"compress: a {spec.family} layer keeps different numbers of query heads per kv head, "
                         "which its stock attention cannot compute and CompactAttention lacks its per-head inputs")
    return "compact"


def _slice_head_inputs(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: keep the kept heads of the per-head inputs the table names (axis 1)."""
    args = list(args)
    for name, pos in module.finegates_head_inputs:
        if kwargs.get(name) is not None:
            kwargs[name] = kwargs[name].index_select(1, module.finegates_heads)
        elif len(args) > pos and args[pos] is not None:
            args[pos] = args[pos].index_select(1, module.finegates_heads)
    return tuple(args), kwargs


def _cut_stock(block: nn.Module, spec: ArchSpec, config, lay: AttnLayout, bias: set[str], dtype) -> None:
    """Cut the stock attention in place: padded Q/K/V/O at (kept heads x head dim), head counts, hook."""
    hidden = getattr(config, spec.hidden_attr)
    spread = spread_indices(lay, stock=True)
    sizes = {"q": lay.n_q, "k": lay.n_k, "v": lay.n_v}
    for role, n in sizes.items():
        set_module(block, spec.modules[role], padded_linear(hidden, n, role in bias, dtype, rows=spread[role]))
    set_module(block, spec.modules["o"], padded_linear(lay.n_o, hidden, "o" in bias, dtype, cols=spread["o"]))
    attn = block.get_submodule(spec.attention)
    heads, kv = len(lay.heads), len(lay.groups)
    counts = {"heads": heads, "kv_heads": kv, "heads_per_kv": heads // kv, "width": heads * lay.head_dim}
    for attr, count in spec.head_attrs.items():
        setattr(attn, attr, counts[count])
    n_heads = head_counts(config, spec)[0]
    if spec.head_inputs and lay.heads != list(range(n_heads)):
        attn.register_buffer("finegates_heads", torch.tensor(lay.heads, dtype=torch.long), persistent=False)
        attn.finegates_head_inputs = spec.head_inputs
        attn.register_forward_pre_hook(_slice_head_inputs, with_kwargs=True)


def _compact(block: nn.Module, spec: ArchSpec, config, lay: AttnLayout, bias: set[str], layer_idx: int, dtype) -> None:
    """Replace the attention module by a CompactAttention of the layer's shapes."""
    attn_path = spec.attention
    stock = block.get_submodule(attn_path)
    hidden = getattr(config, spec.hidden_attr)
    rel = {r: spec.modules[r][len(attn_path) + 1:] for r in ("q", "k", "v")}
    o_inside = spec.modules["o"].startswith(attn_path + ".")
    dropout = getattr(stock, "attention_dropout", None)
    if dropout is None:
        dropout = getattr(getattr(stock, "dropout", None), "p", 0.0)
    compact = CompactAttention(
        lay, config, rel, hidden, bias, layer_idx, causal=spec.decoder,
        o_name=spec.modules["o"][len(attn_path) + 1:] if o_inside else None,
        dropout=float(dropout), sliding_window=getattr(stock, "sliding_window", None), dtype=dtype,
    )
    set_module(block, attn_path, compact)
    if not o_inside:
        o = padded_linear(lay.n_o, hidden, "o" in bias, dtype, cols=spread_indices(lay)["o"]) if lay.heads \
            else Constant(hidden, "o" in bias, dtype)
        set_module(block, spec.modules["o"], o)


def build_block(block: nn.Module, spec: ArchSpec, config, plan: dict, layer_idx: int, dtype: torch.dtype) -> None:
    """Give a stock block `plan`'s shapes (new linears are uninitialised: weights come next)."""
    lay = AttnLayout.from_dict(plan["attn"])
    bias = set(plan["bias"])
    if plan.get("attn_module", "compact") == "stock":  # format 1 plans have no key: compact
        _cut_stock(block, spec, config, lay, bias, dtype)
    else:
        _compact(block, spec, config, lay, bias, layer_idx, dtype)
    hidden = getattr(config, spec.hidden_attr)
    units = len(plan["mlp"])
    for role in ("up", "gate"):
        if role in spec.modules:
            set_module(block, spec.modules[role], linear(hidden, units, role in bias, dtype) if units else nn.Identity())
    down = linear(units, hidden, "down" in bias, dtype) if units else Constant(hidden, "down" in bias, dtype)
    set_module(block, spec.modules["down"], down)


def rebuild(model: nn.Module, finegates: dict) -> nn.Module:
    """Give a freshly built stock model (of `finegates["task_class"]`) the saved per-layer shapes."""
    if finegates.get("format_version") not in READS:
        raise CompressedModelError(f"finegates format {finegates.get('format_version')}, this version reads {READS}")
    spec = spec_for(model)
    layer_list = blocks(model, spec)
    if len(layer_list) != len(finegates["layers"]):
        raise CompressedModelError(f"config records {len(finegates['layers'])} layers, the model has {len(layer_list)}")
    dtype = next(model.parameters()).dtype
    for i, (block, plan) in enumerate(zip(layer_list, finegates["layers"])):
        build_block(block, spec, model.config, plan, i, dtype)
    model.config.finegates = finegates
    return model
