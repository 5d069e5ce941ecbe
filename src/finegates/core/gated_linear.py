"""The gated linear map `y = z_r * (W (z_c * x) + b)` as one autograd node that does the minimum.

Written as the composition `x * z_c -> linear -> * z_r`, autograd records three nodes that save
the scaled input and the bf16 weight copy autocast makes, and runs their backward ops whether or not
anything needs them. This node computes exactly the gradients that are asked for
(`ctx.needs_input_grad`):

    dL/dz_r = sum_tokens dy * (W (z_c x) + b)            needs the pre-gate output, saved
    dL/dz_c = sum_tokens x * W^T (z_r dy)                needs x, saved by reference (no copy)
    dL/dx   = z_c * W^T (z_r dy)                         the one input-gradient matmul
    dL/dW   = (z_r dy)^T (z_c x),  dL/db = sum_tokens z_r dy   only when the weights train

With frozen weights (the `fast` recipe) the only matmuls are the forward and the input gradient,
and the weight (fp32, a parameter) is re-cast in backward rather than its bf16 copy being kept
alive from forward to backward. Under autocast the arithmetic, its dtypes and its order are those of
the composition, so the gradients are the composition's (tests/test_gated_linear.py). The gate
vectors are inputs, so hooks on them (the Taylor scores, `Gate.track_taylor`) see dL/dz as before.

A low-rank update of the frozen weight (`W' = W + s B A`, GatedLinear's adapter) runs inside the same
node: its rank-r product A (z_c x) is the only extra tensor kept, where the composition would keep a
scaled copy of the input and the update's full-width output.
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


class _GatedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, z_r, z_c, lora_a, lora_b, scale):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):  # casts are explicit: the ones autocast makes
            xs = (x if z_c is None else x * z_c.to(x.dtype)).to(dtype)
            y = F.linear(xs, weight.to(dtype), None if bias is None else bias.to(dtype))
            h = None
            if lora_a is not None:  # W' = W + s B A, without forming it: s B (A xs), rank r in between
                h = F.linear(xs, lora_a.to(dtype))
                y = y + scale * F.linear(h, lora_b.to(dtype))
            ypre = y
            if z_r is not None:
                y = ypre * z_r.to(dtype)
        _, need_w, _, need_zr, need_zc, need_a, need_b, _ = ctx.needs_input_grad
        ctx.dtype, ctx.scale = dtype, scale
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(
            x if (need_zc or need_w or need_a) else None,  # the caller's tensor: kept alive, not copied
            weight,  # a parameter: saving it costs nothing (its bf16 copy is made again in backward)
            ypre if need_zr else None,
            z_r, z_c, lora_a, lora_b,
            h if need_b else None,  # rank r per token: small
        )
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, ypre, z_r, z_c, lora_a, lora_b, h = ctx.saved_tensors
        need_x, need_w, need_b, need_zr, need_zc, need_la, need_lb, _ = ctx.needs_input_grad
        dtype, scale = ctx.dtype, ctx.scale
        gx = gw = gb = gzr = gzc = gla = glb = None
        with torch.autocast(gy.device.type, enabled=False):
            gy = gy.to(dtype)
            if need_zr:
                gzr = _sum_tokens(gy * ypre).to(z_r.dtype)
            g = gy if z_r is None else gy * z_r.to(dtype)  # dL/d(pre-gate output)
            if need_b:
                gb = _sum_tokens(g).to(ctx.bias_dtype)
            gh = None if lora_a is None else scale * g.matmul(lora_b.to(dtype))  # dL/dh, rank r
            if need_lb:
                glb = scale * _token_outer(g, h).to(lora_b.dtype)
            if need_x or need_zc:
                gxs = g.matmul(weight.to(dtype))  # dL/d(z_c x)
                if gh is not None:
                    gxs = gxs + gh.matmul(lora_a.to(dtype))
                gxs = gxs.to(weight.dtype if x is None else x.dtype)
                if need_zc:
                    gzc = _sum_tokens(gxs * x).to(z_c.dtype)
                if need_x:
                    gx = gxs if z_c is None else gxs * z_c.to(gxs.dtype)
            if need_w or need_la:
                xs = (x if z_c is None else x * z_c.to(x.dtype)).to(dtype)
                if need_w:
                    gw = _token_outer(g, xs).to(weight.dtype)
                if need_la:
                    gla = _token_outer(gh, xs).to(lora_a.dtype)
        return gx, gw, gb, gzr, gzc, gla, glb, None


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
