"""Which dimensions of a block can be deleted, given which gates are open.

The rules (METHOD.md, section 2) are written once, in "soft boolean" algebra, so the same code
gives both
  * the exact keep masks and parameter count of compression, when fed 0/1 open masks, and
  * a differentiable expected parameter count for training, when fed open probabilities
    (independent gates: AND = product, OR = 1 - (1-a)(1-b), ANY = 1 - prod(1 - x)).

Only the per-layer side of each matrix is deletable: rows of q/k/v/up/gate and columns of o/down.
The other side touches the residual stream and stays (as learned scaling baked into weights).

Per block, with H query heads, G kv heads (GQA groups of H/G), head dim D, hidden size d:
  MLP unit j      kept iff up row j, gate row j (SwiGLU) and down col j are all open
  V/O dim (h, j)  kept iff v row (g(h), j) and o col (h, j) are open
  head h          kept iff any of its V/O dims is kept
  Q/K dim (h, j)  kept iff head h is kept and q row (h, j) and k row (g(h), j) are open;
                  with RoPE, dims j and j + D/2 are one pair: the pair is kept unless both q
                  rows or both k rows are closed
  K/V row (g, j)  kept iff any query head of group g keeps dim j
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .arch import ArchSpec, head_counts

# role -> the deletable side's vector length attribute: rows (out) for these, cols (in) for o/down
DELETABLE_SIDE = {"q": "rows", "k": "rows", "v": "rows", "o": "cols", "up": "rows", "gate": "rows", "down": "cols"}
MLP_ROLES = ("up", "gate", "down")  # the gates of one MLP unit: up/gate rows j and down column j


@dataclass(frozen=True)
class BlockLayout:
    """Shapes of one transformer block, enough to count what deletions remove."""

    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    rope: bool = False
    swiglu: bool = False
    bias: frozenset[str] = frozenset()  # roles whose linear layer has a bias

    @classmethod
    def from_config(cls, config, spec: ArchSpec, bias_roles: frozenset[str] = frozenset()) -> "BlockLayout":
        n_heads, n_kv, head_dim = head_counts(config, spec)
        return cls(
            hidden=getattr(config, spec.hidden_attr),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            intermediate=getattr(config, spec.intermediate_attr),
            rope=spec.rope,
            swiglu=spec.mlp_act == "swiglu",
            bias=bias_roles,
        )

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads

    def dense_params(self) -> int:
        """Weights + biases of the block's linear layers."""
        d, hd, kvd, i = self.hidden, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.intermediate
        n = d * hd * 2 + d * kvd * 2 + d * i * (3 if self.swiglu else 2)
        sizes = {"q": hd, "k": kvd, "v": kvd, "o": d, "up": i, "gate": i, "down": d}
        return n + sum(sizes[r] for r in self.bias if r in sizes and (r != "gate" or self.swiglu))


def _any(x: torch.Tensor, dim: int) -> torch.Tensor:
    return 1.0 - torch.prod(1.0 - x, dim=dim)


def _or(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1.0 - (1.0 - a) * (1.0 - b)


def keep(open_: dict[str, torch.Tensor], lay: BlockLayout) -> dict[str, torch.Tensor]:
    """Keep indicators (or probabilities) for every deletable dimension of a block.

    `open_` maps a role to the open indicator/probability of its deletable side (see
    DELETABLE_SIDE); a missing role counts as all open. Returns:
      mlp (I,), vo (H, D), head (H,), qk (H, D), k (G, D), v (G, D)
    Every input may carry leading dimensions, the same for all (one per block of a stack of
    identical blocks): the outputs then carry them too, and the whole stack costs the kernels of one
    block.
    """
    H, G, D = lay.n_heads, lay.n_kv_heads, lay.head_dim
    ref = next(iter(open_.values()), None)
    kw = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    lead = () if ref is None else tuple(ref.shape[:-1])

    def get(role: str, *shape: int) -> torch.Tensor:
        x = open_[role] if role in open_ else torch.ones(*lead, math.prod(shape), **kw)
        return x.view(*lead, *shape)

    mlp = get("up", lay.intermediate) * get("down", lay.intermediate)
    if lay.swiglu:
        mlp = mlp * get("gate", lay.intermediate)

    to_group = torch.arange(H, device=kw.get("device")) // lay.group
    vo = get("v", G, D)[..., to_group, :] * get("o", H, D)
    head = _any(vo, dim=-1)

    q = get("q", H, D)
    k = get("k", G, D)[..., to_group, :]
    if lay.rope:
        half = D // 2
        q_pair = _or(q[..., :half], q[..., half:])  # pair survives q unless both rows closed
        k_pair = _or(k[..., :half], k[..., half:])
        pair = q_pair * k_pair * head[..., None]
        qk = torch.cat([pair, pair], dim=-1)
    else:
        qk = q * k * head[..., None]

    k_keep = _any(qk.view(*lead, G, lay.group, D), dim=-2)
    v_keep = _any(vo.view(*lead, G, lay.group, D), dim=-2)
    return {"mlp": mlp, "vo": vo, "head": head, "qk": qk, "k": k_keep, "v": v_keep}


def mlp_unit_cost(lay: BlockLayout) -> int:
    """Parameters one MLP unit holds: its up (and gate) row, its down column, their biases."""
    return lay.hidden * (3 if lay.swiglu else 2) + ("up" in lay.bias) + ("gate" in lay.bias and lay.swiglu)


def kept_params(kp: dict[str, torch.Tensor], lay: BlockLayout, n_blocks: int = 1) -> torch.Tensor:
    """Parameters of the block's linear layers that survive, from `keep`'s output (summed over its
    `n_blocks` leading entries when it describes a stack of identical blocks).

    Q rows and O columns are counted per query head; K/V rows per kv head. With 0/1 inputs this
    is the compressed block's exact linear-parameter count.
    """
    d, b = lay.hidden, lay.bias
    n = kp["mlp"].sum() * mlp_unit_cost(lay)
    n = n + kp["qk"].sum() * (d + ("q" in b))
    n = n + kp["k"].sum() * (d + ("k" in b))
    n = n + kp["v"].sum() * (d + ("v" in b))
    n = n + kp["vo"].sum() * d  # o columns
    # o and down biases live on the residual stream: never deleted
    n = n + n_blocks * d * (("o" in b) + ("down" in b))
    return n
