"""Architecture knowledge, as data.

Everything finegates needs to know about a model family lives in one `ArchSpec` row of
`ARCHS`: where the transformer blocks are, which linear layer plays which role, how heads are
laid out, whether Q/K are rotated (RoPE), and which modules form the task head. The gate,
compression and baseline algorithms read these rows; adding a family is adding a row.

Roles (the names used everywhere else):
  q, k, v, o       attention projections (o = attention output)
  up, gate, down   MLP matrices (gate only for SwiGLU families; `up` is BERT's `intermediate.dense`)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

ATTENTION_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("up", "gate", "down")
ROLES = ATTENTION_ROLES + MLP_ROLES


@dataclass(frozen=True)
class ArchSpec:
    """How one model family is built (paths are dotted attribute paths)."""

    family: str
    model_types: tuple[str, ...]
    layers: str  # ModuleList of blocks, relative to `model.base_model`
    modules: dict[str, str]  # role -> linear layer path, relative to a block
    attention: str  # the attention module (the one holding head counts), relative to a block
    head: tuple[str, ...]  # task-head modules, relative to the task model (trained with the gates)
    decoder: bool = False
    rope: bool = False
    mlp_act: str = "gelu"  # "gelu": act(up x); "swiglu": act(gate x) * (up x)
    # config attribute names (defaults follow the HF convention)
    num_heads_attr: str = "num_attention_heads"
    num_kv_heads_attr: str | None = None  # None -> same as num_heads (no GQA)
    hidden_attr: str = "hidden_size"
    intermediate_attr: str = "intermediate_size"
    # Compression keeps the stock attention module and cuts it in place (compression/rebuild.py). These say
    # what to update on it: `head_attrs` maps an attribute of the attention module to the count it
    # holds ("heads", "kv_heads", "heads_per_kv" or "width" = heads * head dim); only attributes
    # its forward reads must be listed. `head_inputs` names per-head tensors the module receives
    # (keyword name, positional index after the hidden states), head axis 1, such as MPNet's
    # relative position bias: a hook keeps their kept heads' slices.
    head_attrs: dict[str, str] = field(default_factory=dict)
    head_inputs: tuple[tuple[str, int], ...] = ()

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(r for r in ROLES if r in self.modules)


_BERT_MODULES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "o": "attention.output.dense",
    "up": "intermediate.dense",
    "down": "output.dense",
}

_LLAMA_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}

_BERT_HEAD_ATTRS = {"num_attention_heads": "heads", "all_head_size": "width"}

ARCHS: dict[str, ArchSpec] = {
    spec.family: spec
    for spec in (
        ArchSpec(
            family="bert",
            model_types=("bert",),
            layers="encoder.layer",
            modules=_BERT_MODULES,
            attention="attention.self",
            head=("bert.pooler", "classifier"),
            head_attrs=_BERT_HEAD_ATTRS,
        ),
        ArchSpec(
            family="roberta",
            model_types=("roberta", "xlm-roberta"),
            layers="encoder.layer",
            modules=_BERT_MODULES,
            attention="attention.self",
            head=("classifier",),
            head_attrs=_BERT_HEAD_ATTRS,
        ),
        ArchSpec(
            family="mpnet",
            model_types=("mpnet",),
            layers="encoder.layer",
            modules={
                "q": "attention.attn.q",
                "k": "attention.attn.k",
                "v": "attention.attn.v",
                "o": "attention.attn.o",
                "up": "intermediate.dense",
                "down": "output.dense",
            },
            attention="attention.attn",
            head=("classifier",),
            head_attrs=_BERT_HEAD_ATTRS,  # MPNet reshapes its context to `all_head_size`
            head_inputs=(("position_bias", 2),),  # (batch, heads, q, k), shared by all layers
        ),
        ArchSpec(
            family="distilbert",
            model_types=("distilbert",),
            layers="transformer.layer",
            modules={
                "q": "attention.q_lin",
                "k": "attention.k_lin",
                "v": "attention.v_lin",
                "o": "attention.out_lin",
                "up": "ffn.lin1",
                "down": "ffn.lin2",
            },
            attention="attention",
            head=("pre_classifier", "classifier"),
            num_heads_attr="n_heads",
            hidden_attr="dim",
            intermediate_attr="hidden_dim",
            head_attrs={"n_heads": "heads"},
        ),
        *(
            ArchSpec(
                family=name,
                model_types=(name,),
                layers="layers",
                modules=_LLAMA_MODULES,
                attention="self_attn",
                head=("score",),
                decoder=True,
                rope=True,
                mlp_act="swiglu",
                num_kv_heads_attr="num_key_value_heads",
                head_attrs={"num_key_value_groups": "heads_per_kv"},  # read by repeat_kv
            )
            for name in ("llama", "qwen2", "mistral")
        ),
    )
}


class UnsupportedModelError(ValueError):
    """The model's family is not in `ARCHS`."""


def spec_for_model_type(model_type: str) -> ArchSpec:
    for spec in ARCHS.values():
        if model_type in spec.model_types:
            return spec
    known = sorted(t for s in ARCHS.values() for t in s.model_types)
    raise UnsupportedModelError(
        f"unsupported model type {model_type!r}: finegates knows {', '.join(known)}"
    )


def spec_for(model: nn.Module) -> ArchSpec:
    """The ArchSpec of a Hugging Face model (task model or base model)."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "model_type", None):
        raise UnsupportedModelError(f"{type(model).__name__} has no Hugging Face config.model_type")
    return spec_for_model_type(config.model_type)


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def blocks(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    """The transformer blocks of a task model or base model."""
    spec = spec or spec_for(model)
    return get_submodule(model.base_model, spec.layers)


def head_counts(config, spec: ArchSpec) -> tuple[int, int, int]:
    """(num query heads, num kv heads, head dim) from a HF config."""
    n_heads = getattr(config, spec.num_heads_attr)
    n_kv = getattr(config, spec.num_kv_heads_attr, None) if spec.num_kv_heads_attr else None
    n_kv = n_kv or n_heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, spec.hidden_attr) // n_heads
    return n_heads, n_kv, head_dim
