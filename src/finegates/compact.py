"""The modules a compressed model is built from: attention with per-layer shapes, and stand-ins.

After compression every layer can have its own number of query heads, kv heads, Q/K dims and
V dims, and heads of one layer can keep different dims. Fused attention (SDPA) wants one head
dim per tensor, so each layer keeps its compact weights (exactly the kept rows/columns: the
parameter count is the coupling rules' count) and, at run time, spreads the compact Q/K/V
projections into a per-layer padded layout with a single gather from `[y, 0]` (closed slots
read the zero), runs SDPA, and gathers the kept V dims back for O. Padding is zeros, so every
score and output is exact.

Layout of a kv group (query heads read their group's layout):
  Q/K slots   the group's kept K dims, in order, padded to the layer's widest group; with RoPE
              the kept pairs (j, j + D/2) go to slots (i, M + i), M = the widest group's pair
              count, so `rotate_half` pairs them correctly, and each slot reads the cos/sin of
              its original dim: kept pairs keep their original rotary frequencies.
  V slots     the group's kept V dims, padded to the widest group.
Attention scaling stays 1/sqrt(original head dim).

`AttnLayout` is plain data (lists of original indices) so it can be saved in config.json and
the same modules rebuilt before the weights are read.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class AttnLayout:
    """Which parts of one layer's attention survive (original indices, all sorted)."""

    head_dim: int  # original head dim: scaling, RoPE half
    rope: bool
    heads: list[int]  # kept query heads
    groups: list[int]  # kept kv heads
    head_group: list[int]  # per kept head: its kv head's position in `groups`
    q_dims: list[list[int]]  # per kept head: kept Q rows (dims within the head)
    k_dims: list[list[int]]  # per kept kv head: kept K rows
    v_dims: list[list[int]]  # per kept kv head: kept V rows
    o_dims: list[list[int]]  # per kept head: kept O columns

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AttnLayout":
        return cls(**d)

    @property
    def n_q(self) -> int:
        return sum(map(len, self.q_dims))

    @property
    def n_k(self) -> int:
        return sum(map(len, self.k_dims))

    @property
    def n_v(self) -> int:
        return sum(map(len, self.v_dims))

    @property
    def n_o(self) -> int:
        return sum(map(len, self.o_dims))

    # ---- slot layout ------------------------------------------------------------------
    def _pairs(self, dims: list[int]) -> list[int]:
        return [j for j in dims if j < self.head_dim // 2]

    def qk_width(self) -> int:
        if self.rope:
            return max(1, max((len(self._pairs(d)) for d in self.k_dims), default=0)) * 2
        return max(1, max((len(d) for d in self.k_dims), default=0))

    def v_width(self) -> int:
        return max(1, max((len(d) for d in self.v_dims), default=0))

    def qk_slots(self, g: int) -> dict[int, int]:
        """Original K dim -> slot, for kept kv head `g` (a position in `groups`)."""
        dims = self.k_dims[g]
        if not self.rope:
            return {j: s for s, j in enumerate(dims)}
        half, m = self.head_dim // 2, self.qk_width() // 2
        pairs = self._pairs(dims)
        return {**{j: s for s, j in enumerate(pairs)}, **{j + half: m + s for s, j in enumerate(pairs)}}

    def v_slots(self, g: int) -> dict[int, int]:
        return {j: s for s, j in enumerate(self.v_dims[g])}


def _spread_index(rows: list[tuple[int, int]], width: int, n_blocks: int) -> torch.Tensor:
    """Gather index that places compact rows at (block, slot); other slots read index len(rows)."""
    idx = torch.full((n_blocks * width,), len(rows), dtype=torch.long)
    for r, (b, s) in enumerate(rows):
        idx[b * width + s] = r
    return idx


class CompactAttention(nn.Module):
    """Self-attention at the shapes of an `AttnLayout`; takes the stock module's call signature.

    Projections keep their stock attribute names (`query`, `q_lin`, `q_proj`, ...) so saved
    tensor names read like the original model's. `o_name` is set when O lives inside the stock
    attention module (DistilBERT, Llama); BERT's O lives in the block and is replaced there.
    """

    def __init__(
        self,
        layout: AttnLayout,
        config,
        names: dict[str, str],
        hidden: int,
        bias: set[str],
        layer_idx: int,
        causal: bool = False,
        o_name: str | None = None,
        dropout: float = 0.0,
        sliding_window: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = causal
        self.dropout = dropout
        self.sliding_window = sliding_window
        self.scaling = layout.head_dim**-0.5
        self.names = dict(names)
        self.o_name = o_name
        self.n_heads, self.n_groups = len(layout.heads), len(layout.groups)
        self.qk_width, self.v_width = layout.qk_width(), layout.v_width()
        def linear(n_in: int, n_out: int, role: str) -> nn.Linear:  # filled by compress or load
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # zero-element layers
                return torch.nn.utils.skip_init(nn.Linear, n_in, n_out, bias=role in bias, dtype=dtype)

        if self.n_heads:
            setattr(self, names["q"], linear(hidden, layout.n_q, "q"))
            setattr(self, names["k"], linear(hidden, layout.n_k, "k"))
            setattr(self, names["v"], linear(hidden, layout.n_v, "v"))
        if o_name is not None:
            o = linear(layout.n_o, hidden, "o") if self.n_heads else Constant(hidden, "o" in bias, dtype)
            setattr(self, o_name, o)
        self._build_indices()

    def _build_indices(self) -> None:
        lay = self.layout
        qk = [lay.qk_slots(g) for g in range(self.n_groups)]
        vs = [lay.v_slots(g) for g in range(self.n_groups)]
        q_rows = [(h, qk[lay.head_group[h]][j]) for h in range(self.n_heads) for j in lay.q_dims[h]]
        k_rows = [(g, qk[g][j]) for g in range(self.n_groups) for j in lay.k_dims[g]]
        v_rows = [(g, vs[g][j]) for g in range(self.n_groups) for j in lay.v_dims[g]]
        o_pos = [h * self.v_width + vs[lay.head_group[h]][j] for h in range(self.n_heads) for j in lay.o_dims[h]]
        self._index("q_idx", _spread_index(q_rows, self.qk_width, self.n_heads))
        self._index("k_idx", _spread_index(k_rows, self.qk_width, self.n_groups))
        self._index("v_idx", _spread_index(v_rows, self.v_width, self.n_groups))
        self._index("o_idx", torch.tensor(o_pos, dtype=torch.long))
        head_group = torch.tensor(lay.head_group, dtype=torch.long)
        # query heads per kv head, if equal and contiguous, let SDPA/repeat_kv share K/V (GQA)
        counts = torch.bincount(head_group, minlength=self.n_groups) if self.n_heads else head_group
        uniform = self.n_heads > 0 and bool((counts == counts[0]).all()) and bool((head_group.diff() >= 0).all())
        self.num_key_value_groups = int(counts[0]) if uniform else 1
        self._index("kv_idx", None if uniform else head_group)
        if lay.rope:  # original dim read by each Q/K slot, for cos/sin
            table = torch.zeros(self.n_groups, self.qk_width, dtype=torch.long)
            for g in range(self.n_groups):
                for j, s in qk[g].items():
                    table[g, s] = j
            self.register_buffer("rope_k", table.flatten(), persistent=False)
            self.register_buffer("rope_q", table[head_group].flatten(), persistent=False)

    def _index(self, name: str, idx: torch.Tensor | None) -> None:
        """Register a gather index, or None where it would be the identity (no copy at run time)."""
        if idx is not None and idx.numel() and torch.equal(idx, torch.arange(idx.numel())):
            idx = None
        self.register_buffer(name, idx, persistent=False)

    def proj(self, role: str) -> nn.Module:
        return getattr(self, self.names[role])

    @staticmethod
    def _spread(y: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        if idx is None:
            return y
        return F.pad(y, (0, 1)).index_select(-1, idx)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
        shape = (*cos.shape[:-1], n, self.qk_width)
        c = cos.index_select(-1, idx).view(shape).transpose(1, 2).to(x.dtype)
        s = sin.index_select(-1, idx).view(shape).transpose(1, 2).to(x.dtype)
        half = self.qk_width // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * c + rotated * s

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, past_key_values=None, **kwargs):
        if self.n_heads == 0:  # O is a Constant: its input is ignored
            ctx = hidden_states
            return (getattr(self, self.o_name)(ctx) if self.o_name else ctx), None
        lead = hidden_states.shape[:-1]
        q = self._spread(self.proj("q")(hidden_states), self.q_idx)
        k = self._spread(self.proj("k")(hidden_states), self.k_idx)
        v = self._spread(self.proj("v")(hidden_states), self.v_idx)
        q = q.view(*lead, self.n_heads, self.qk_width).transpose(1, 2)
        k = k.view(*lead, self.n_groups, self.qk_width).transpose(1, 2)
        v = v.view(*lead, self.n_groups, self.v_width).transpose(1, 2)
        if self.layout.rope:
            cos, sin = position_embeddings
            q = self._rope(q, cos, sin, self.rope_q, self.n_heads)
            k = self._rope(k, cos, sin, self.rope_k, self.n_groups)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        if self.kv_idx is not None:
            k, v = k.index_select(1, self.kv_idx), v.index_select(1, self.kv_idx)
        ctx, _ = attention_function(self.config)(
            self, q, k, v, attention_mask,
            dropout=self.dropout if self.training else 0.0, scaling=self.scaling,
            sliding_window=self.sliding_window, **kwargs,
        )
        ctx = ctx.reshape(*lead, self.n_heads * self.v_width)
        if self.o_idx is not None:
            ctx = ctx.index_select(-1, self.o_idx)
        return (getattr(self, self.o_name)(ctx) if self.o_name else ctx), None

    def extra_repr(self) -> str:
        return (f"heads={self.n_heads}, kv_heads={self.n_groups}, qk_width={self.qk_width}, "
                f"v_width={self.v_width}, rope={self.layout.rope}")


def attention_function(config):
    """The attention kernel the model's config asks for (sdpa by default; eager as fallback)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    if impl == "eager":
        return eager_attention
    return ALL_ATTENTION_FUNCTIONS[impl]


def eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """softmax(q k^T * scaling + mask) v; K/V already have one head per query head here."""
    if module.num_key_value_groups > 1:
        key = key.repeat_interleave(module.num_key_value_groups, dim=1)
        value = value.repeat_interleave(module.num_key_value_groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[-2]]
    probs = F.dropout(torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype), p=dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class Constant(nn.Module):
    """Stands in for a linear layer all of whose inputs were deleted: outputs its bias (or 0)."""

    def __init__(self, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.out_features = out_features
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.out_features)
        if self.bias is None:
            return x.new_zeros(shape)
        return self.bias.to(x.dtype).expand(shape)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, bias={self.bias is not None}"
