"""The gated linear's own autograd node (gated_linear.py) against the composition it replaces.

gradcheck in float64, and every gradient (input, gates, weight, bias) equal to autograd's through
`z_r * linear(z_c * x)` to fp64 round-off in float64; in fp32 and under bf16 autocast no less
accurate than the composition (both against float64). On CPU, and on CUDA where there is one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finegates.core.gated_linear import gated_linear

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# which of (x, weight, bias, z_r, z_c) need a gradient: fast (frozen weights, bias trains), finetune, gates only
NEEDS = {
    "fast": (True, False, True, True, True),
    "finetune": (True, True, True, True, True),
    "gates_only": (False, False, False, True, True),
}


def _reference(x, w, b, z_r, z_c):
    """The composition GatedLinear.forward used to be."""
    if z_c is not None:
        x = x * z_c.to(x.dtype)
    y = F.linear(x, w, b)
    return y if z_r is None else y * z_r.to(y.dtype)


def _inputs(device, dtype, needs, bias=True, rows=True, cols=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 5, 7), (6, 7), (6,), (6,), (7,)]
    made = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    made[3] = made[3].sigmoid()  # gate values in (0, 1)
    made[4] = made[4].sigmoid()
    keep = (True, True, bias, rows, cols)
    return [t.to(device, dtype).requires_grad_(n) if k else None for t, n, k in zip(made, needs, keep)]


def _grads(fn, inputs, dy):
    for t in inputs:
        if t is not None:
            t.grad = None
    y = fn(*inputs)
    y.backward(dy)
    return y.detach(), [None if t is None or t.grad is None else t.grad.clone() for t in inputs]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("needs", NEEDS.values(), ids=NEEDS.keys())
def test_gradcheck_float64(device, needs):
    inputs = _inputs(device, torch.float64, needs)
    assert torch.autograd.gradcheck(gated_linear, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("needs", NEEDS.values(), ids=NEEDS.keys())
@pytest.mark.parametrize("sides", [(True, True, True), (False, True, False), (True, False, True)],
                         ids=["bias-rows-cols", "rows", "bias-cols"])
def test_same_gradients_as_the_composition_float64(device, needs, sides):
    bias, rows, cols = sides
    inputs = _inputs(device, torch.float64, needs, bias, rows, cols)
    dy = torch.randn(2, 5, 6, dtype=torch.float64, device=device)
    y_ref, g_ref = _grads(_reference, inputs, dy)
    y, g = _grads(gated_linear, inputs, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(("x", "weight", "bias", "z_r", "z_c"), g, g_ref):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def _truth(fn, inputs, dy):
    """The same computation in float64, autocast off: what both implementations approximate."""
    exact = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    return _grads(fn, exact, dy.double())


def _no_less_accurate(name, got, ref, truth, autocast):
    """`got` within twice the composition's own error of the float64 truth, plus the dtype's rounding."""
    err, ref_err = (got.double() - truth).abs().max(), (ref.double() - truth).abs().max()
    floor = (4e-3 if autocast else 1e-6) * (1 + truth.abs().max())
    assert err <= 2 * ref_err + floor, f"{name}: error {err:.3g} vs the composition's {ref_err:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("needs", NEEDS.values(), ids=NEEDS.keys())
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_as_accurate_as_the_composition_fp32_and_autocast(device, needs, autocast):
    """The node rounds differently (the gates are folded into the weight, y / z_r stands for the
    pre-gate output) but no worse: same dtypes, and every value within twice the composition's own
    error of the float64 result."""
    inputs = _inputs(device, torch.float32, needs)
    dy_dtype = torch.bfloat16 if autocast else torch.float32
    dy = torch.randn(2, 5, 6, device=device).to(dy_dtype)
    results = []
    for fn in (_reference, gated_linear):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            results.append(_grads(fn, inputs, dy))
    (y_ref, g_ref), (y, g) = results
    y_true, g_true = _truth(_reference, inputs, dy)
    assert y.dtype == y_ref.dtype == dy_dtype
    _no_less_accurate("y", y, y_ref, y_true, autocast)
    for name, a, b, t in zip(("x", "weight", "bias", "z_r", "z_c"), g, g_ref, g_true):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype, name
            _no_less_accurate(name, a, b, t, autocast)


def test_a_closed_gate_gets_gradient_zero_and_the_others_are_exact():
    """z = 0 (a closed unit): its gradient is 0 by definition here (clamps and masks pass none
    through there); the open gates' gradients are unchanged by the division."""
    x, w, b, z_r, z_c = _inputs("cpu", torch.float64, NEEDS["fast"])
    with torch.no_grad():
        z_r[2] = 0.0
        z_c[4] = 0.0
    dy = torch.randn(2, 5, 6, dtype=torch.float64)
    _, g = _grads(gated_linear, [x, w, b, z_r, z_c], dy)
    _, g_ref = _grads(_reference, [x, w, b, z_r, z_c], dy)
    assert g[3][2] == 0 and g[4][4] == 0
    keep_r, keep_c = torch.arange(6) != 2, torch.arange(7) != 4
    torch.testing.assert_close(g[3][keep_r], g_ref[3][keep_r], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g[4][keep_c], g_ref[4][keep_c], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g[0], g_ref[0], rtol=1e-12, atol=1e-12)


def test_frozen_weights_run_no_weight_gradient_matmul():
    """With frozen weights the backward runs one matmul (the input gradient), and none at all when
    the input needs no gradient either (the first gated layer over frozen embeddings)."""
    from torch.profiler import ProfilerActivity, profile

    def matmuls(needs) -> int:
        inputs = _inputs("cpu", torch.float32, needs)
        y = gated_linear(*inputs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y.sum().backward()
        return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::bmm", "aten::addmm"))

    assert matmuls(NEEDS["fast"]) == 1
    assert matmuls(NEEDS["gates_only"]) == 1  # dL/dz_c needs W^T(z_r dy); no dx, no dW
    assert matmuls((False, False, True, True, False)) == 0  # rows and bias only: no matmul
    assert matmuls(NEEDS["finetune"]) == 2


def test_saves_no_copy_of_the_input():
    """The input and the output are saved by reference: the node keeps the caller's tensors, no
    scaled copy and no pre-gate output (the output's reader usually keeps it anyway)."""
    x, w, b, z_r, z_c = _inputs("cpu", torch.float32, NEEDS["fast"])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = gated_linear(x, w, b, z_r, z_c)
    big = sorted(t.data_ptr() for t in saved if t.dim() == 3)
    assert big == sorted([x.data_ptr(), y.data_ptr()])  # x itself and the output the caller gets: no copies
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gated_linear(x, w, b, z_r.detach(), z_c)  # fixed row gates: their gradient's operand is not kept
    assert [t.data_ptr() for t in saved if t.dim() == 3] == [x.data_ptr()]


def _adapter_reference(x, w, b, z_r, z_c, a, bb, scale=0.5):
    """The composition GatedLinear used for `W' = z_r (W + s B A) z_c` before the update moved into the node."""
    xs = x * z_c.to(x.dtype)
    u = scale * F.linear(F.linear(xs, a.to(xs.dtype)), bb.to(xs.dtype))
    return _reference(x, w, b, z_r, z_c) + u * z_r.to(u.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("needs", [NEEDS["fast"], NEEDS["gates_only"]], ids=["fast", "gates_only"])
@pytest.mark.parametrize("autocast", [False, True], ids=["float64", "bf16-autocast"])
def test_the_low_rank_update_inside_the_node(device, needs, autocast):
    """dL/dA, dL/dB and every other gradient as the composition gives them (the frozen recipe's layer):
    to fp64 round-off in float64, no less accurately under bf16 autocast."""
    dtype = torch.float32 if autocast else torch.float64
    inputs = _inputs(device, dtype, needs)
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 7, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_(True)
    bb = torch.randn(6, 3, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_(True)
    dy = torch.randn(2, 5, 6, dtype=torch.float64, device=device).to(torch.bfloat16 if autocast else dtype)
    if not autocast:
        assert torch.autograd.gradcheck(lambda *t: gated_linear(*t, scale=0.5), (*inputs, a, bb))
    results = []
    for fn in (_adapter_reference, lambda *t: gated_linear(*t, scale=0.5)):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            results.append(_grads(fn, [*inputs, a, bb], dy))
    (y_ref, g_ref), (y, grads) = results
    y_true, g_true = _truth(_adapter_reference, [*inputs, a, bb], dy)
    for name, u, v, t in zip(("y", "x", "weight", "bias", "z_r", "z_c", "A", "B"), [y, *grads], [y_ref, *g_ref],
                             [y_true, *g_true]):
        assert (u is None) == (v is None), name
        if u is not None:
            assert u.dtype == v.dtype, name
            if autocast:
                _no_less_accurate(name, u, v, t, autocast)
            else:
                torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12, msg=name)
