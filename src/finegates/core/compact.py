"""The modules a compressed model is built from: attention with per-layer shapes, and stand-ins.

After compression every layer can have its own number of query heads, kv heads, Q/K dims and
V dims, and heads of one layer can keep different dims. Fused attention (SDPA) wants one head
dim per tensor, so each layer stores compact weights (exactly the kept rows/columns: the
parameter count is the coupling rules' count) and computes in a per-layer padded layout:
`PaddedLinear` spreads Q/K/V rows (and O columns) to their slots with zeros in between, builds
that padded weight once and caches it for inference. Padding is zeros, so every score and
output is exact. (A first version spread the activations with a gather per projection at run
time instead: ~10% of CPU time went into those gathers, so the weights are padded instead; the
cache costs the padded attention weights' memory once more.)

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


def _identity_or(idx: torch.Tensor, n_rows: int) -> torch.Tensor | None:
    """None where the spread is the identity. The pad index is `n_rows`, so an index that reads
    0..n-1 with n_rows == n - 1 pads its last slot (e.g. only the last V dim deleted): not identity."""
    return None if idx.numel() == n_rows and torch.equal(idx, torch.arange(idx.numel())) else idx


def spread_indices(lay: AttnLayout, stock: bool = False) -> dict[str, torch.Tensor | None]:
    """Per projection, the padded slot -> compact row (q/k/v) or column (o) gather index.

    `stock`: every kept head keeps its original `head_dim` slots (dim j in slot j), the layout the
    stock attention module computes in (compression/rebuild.py); otherwise the narrower per-layer layout above.
    """
    H, G = len(lay.heads), len(lay.groups)
    if stock:
        qkw = vw = lay.head_dim
        qk = vs = [{j: j for j in range(lay.head_dim)}] * G
    else:
        qkw, vw = lay.qk_width(), lay.v_width()
        qk = [lay.qk_slots(g) for g in range(G)]
        vs = [lay.v_slots(g) for g in range(G)]
    q = [(h, qk[lay.head_group[h]][j]) for h in range(H) for j in lay.q_dims[h]]
    k = [(g, qk[g][j]) for g in range(G) for j in lay.k_dims[g]]
    v = [(g, vs[g][j]) for g in range(G) for j in lay.v_dims[g]]
    o = [(h, vs[lay.head_group[h]][j]) for h in range(H) for j in lay.o_dims[h]]
    return {"q": _identity_or(_spread_index(q, qkw, H), len(q)), "k": _identity_or(_spread_index(k, qkw, G), len(k)),
            "v": _identity_or(_spread_index(v, vw, G), len(v)), "o": _identity_or(_spread_index(o, vw, H), len(o))}


class PaddedLinear(nn.Linear):
    """A linear layer stored compact (its parameters are exactly the kept rows/columns) that
    computes in the padded layout: zero rows (`rows` spread) or zero columns (`cols` spread).

    The padded weight is built once and cached in eval mode (rebuilt when a parameter changes),
    so inference pays no gather; under training or export it is built in the graph.
    """

    def set_spread(self, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> "PaddedLinear":
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self._cache, self._cache_key = None, None
        return self

    def _build(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = self.weight, self.bias
        if self.rows is not None:
            w = F.pad(w, (0, 0, 0, 1)).index_select(0, self.rows)
            b = None if b is None else F.pad(b, (0, 1)).index_select(0, self.rows)
        if self.cols is not None:
            w = F.pad(w, (0, 1)).index_select(1, self.cols)
        return w, b

    def padded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.training or torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return self._build()
        key = tuple((p.data_ptr(), p._version, p.device) for p in self.parameters())
        if self._cache_key != key:
            with torch.no_grad():
                self._cache, self._cache_key = tuple(t.contiguous() if t is not None else None for t in self._build()), key
        return self._cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is None and self.cols is None:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, *self.padded())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", padded_out={None if self.rows is None else self.rows.numel()}" \
            f", padded_in={None if self.cols is None else self.cols.numel()}"


def padded_linear(n_in: int, n_out: int, bias: bool, dtype: torch.dtype, rows=None, cols=None) -> PaddedLinear:
    """An uninitialised PaddedLinear (weights are copied or loaded right after)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-element layers
        layer = torch.nn.utils.skip_init(PaddedLinear, n_in, n_out, bias=bias, dtype=dtype)
    return layer.set_spread(rows, cols)


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
        spread = spread_indices(layout) if self.n_heads else {}
        if self.n_heads:
            for role, n in (("q", layout.n_q), ("k", layout.n_k), ("v", layout.n_v)):
                setattr(self, names[role], padded_linear(hidden, n, role in bias, dtype, rows=spread[role]))
        if o_name is not None:
            o = padded_linear(layout.n_o, hidden, "o" in bias, dtype, cols=spread["o"]) if self.n_heads \
                else Constant(hidden, "o" in bias, dtype)
            setattr(self, o_name, o)
        self._build_indices()

    def _build_indices(self) -> None:
        lay = self.layout
        qk = [lay.qk_slots(g) for g in range(self.n_groups)]
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
        q, k, v = (self.proj(r)(hidden_states) for r in ("q", "k", "v"))  # padded layout
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
        ctx = ctx.reshape(*lead, self.n_heads * self.v_width)  # O reads the padded layout
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
