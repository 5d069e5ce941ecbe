"""The gated linear map `y = z_r * (W (z_c * x) + b)` as one autograd node that does the minimum.

Written as the composition `x * z_c -> linear -> * z_r`, autograd records three nodes that save
the scaled input, the pre-gate output and the bf16 weight copy autocast makes, and scales two
activation-sized tensors forward and four backward. This node folds the gates into the weight
instead (`W_g = Diag(z_r) W Diag(z_c)`, weight-sized: cheaper than any activation-sized product at
a training batch's token count) and computes exactly the gradients that are asked for
(`ctx.needs_input_grad`):

    dL/dx   = dy W_g                                         the one input-gradient matmul
    dL/dz_r = sum_tokens dy * y / z_r                        y: the output, saved
    dL/dz_c = sum_tokens x * dL/dx / z_c                     x: saved by reference (no copy)
    dL/dW   = Diag(z_r) (dy^T x) Diag(z_c),  dL/db = z_r * sum_tokens dy   only when the weights train

Why y and not the pre-gate output: y's reader may keep it anyway (the MLP's activation keeps the up
projection's output; attention keeps q, k, v or copies of them, depending on its kernel), and where
it does, the node's own memory is x alone; the backward needs no activation-sized product for dL/dx. Why the divisions are safe: a gate at exactly 0 (its unit closed) gets gradient
0 here, and every gate parameterisation reaches 0 only through a clamp or a closing mask, whose own
gradient is 0 there, so the gate's parameters receive what they did before; the Taylor hooks
multiply by z, which is 0. Elsewhere y / z_r is the pre-gate output to the rounding of y's dtype,
the precision the composition kept it in (tests/test_gated_linear.py compares both with float64).

A low-rank update of the frozen weight (`W' = W + s B A`, GatedLinear's adapter) runs inside the same
node with the gates folded into its factors (`A Diag(z_c)`, `Diag(z_r) B`): its rank-r product is
the only extra tensor kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmul runs in: autocast's where it is on (as `F.linear` would), else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _sum_tokens(t: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the last (batch and sequence): a per-feature vector."""
    return t.sum(dim=tuple(range(t.dim() - 1)))


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`, with no dispatch at all when it already is: an eager GPU step is bound by the
    host's per-operation cost, no-op conversions included (issue 19)."""
    return t if t.dtype == dtype else t.to(dtype)


def _fold(m: torch.Tensor | None, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor | None:
    """Diag(rows) m Diag(cols), in m's dtype; a None side is all ones."""
    if m is None:
        return None
    if rows is not None and cols is not None and m.dim() == 2:  # one weight-sized product, not two
        return m * torch.outer(_as(rows, m.dtype), _as(cols, m.dtype))
    if rows is not None:
        m = m * _as(rows, m.dtype)[:, None] if m.dim() == 2 else m * _as(rows, m.dtype)
    if cols is not None:
        m = m * _as(cols, m.dtype)
    return m


def _over_gate(total: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """total / z, and 0 where the gate is exactly 0 (see the module docstring): there `total` is an
    exact 0 (a zero row of the folded weight gives exact zeros), so dividing by the smallest normal
    number instead of z gives exactly 0. Two kernels (division promotes to z's float32)."""
    return _as(total / z.clamp_min(torch.finfo(z.dtype).tiny), z.dtype)


class _GatedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, z_r, z_c, lora_a, lora_b, scale):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):  # casts are explicit: the ones autocast makes
            xc = _as(x, dtype)
            y = F.linear(xc, _as(_fold(weight, z_r, z_c), dtype), None if bias is None else _as(_fold(bias, z_r, None), dtype))
            h = None
            if lora_a is not None:  # s Diag(z_r) B (A Diag(z_c) x), rank r in between
                h = F.linear(xc, _as(_fold(lora_a, None, z_c), dtype))
                y = y + scale * F.linear(h, _as(_fold(lora_b, z_r, None), dtype))
        _, need_w, _, need_zr, need_zc, need_a, need_b, _ = ctx.needs_input_grad
        ctx.dtype, ctx.scale = dtype, scale
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(
            x if (need_zc or need_w or need_a) else None,  # the caller's tensor: kept alive, not copied
            weight,  # a parameter: saving it costs nothing (its folded copy is made again in backward)
            y if need_zr else None,
            z_r, z_c, lora_a, lora_b,
            h if need_b else None,  # rank r per token: small
        )
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, y, z_r, z_c, lora_a, lora_b, h = ctx.saved_tensors
        need_x, need_w, need_b, need_zr, need_zc, need_la, need_lb, _ = ctx.needs_input_grad
        dtype, scale = ctx.dtype, ctx.scale
        gx = gw = gb = gzr = gzc = gla = glb = None
        with torch.autocast(gy.device.type, enabled=False):
            gy = _as(gy, dtype)
            if need_zr:
                gzr = _over_gate(_sum_tokens(gy * y), z_r)
            if need_b:
                gb = _fold(_as(_sum_tokens(gy), ctx.bias_dtype), z_r, None)
            gh = None if lora_a is None else scale * gy.matmul(_as(_fold(lora_b, z_r, None), dtype))  # dL/dh, rank r
            if need_lb:
                glb = _fold(scale * _as(_token_outer(gy, h), lora_b.dtype), z_r, None)
            if need_x or need_zc:
                gx = gy.matmul(_as(_fold(weight, z_r, z_c), dtype))
                if gh is not None:
                    gx = gx + gh.matmul(_as(_fold(lora_a, None, z_c), dtype))
                gx = _as(gx, weight.dtype if x is None else x.dtype)
                if need_zc:
                    gzc = _over_gate(_sum_tokens(gx * x), z_c)
            if need_w or need_la:
                xc = _as(x, dtype)
                if need_w:
                    gw = _fold(_as(_token_outer(gy, xc), weight.dtype), z_r, z_c)
                if need_la:
                    gla = _fold(_as(_token_outer(gh, xc), lora_a.dtype), None, z_c)
        return (gx if need_x else None), gw, gb, gzr, gzc, gla, glb, None


def _token_outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over tokens of a_t b_t^T: a weight-shaped gradient."""
    return a.flatten(0, -2).t().matmul(b.flatten(0, -2))


def gated_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z_r: torch.Tensor | None,
    z_c: torch.Tensor | None,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """`z_r * ((W + scale B A) (z_c * x) + b)`; a gate that is None is all ones (that side is not
    gated), no `lora_a`/`lora_b` means no low-rank update."""
    return _GatedLinear.apply(x, weight, bias, z_r, z_c, lora_a, lora_b, scale)
