"""Gate maths: the paper parameterisation exactly, the gated linear layer, merging."""

import math

import pytest
import torch
import torch.nn as nn

from finegates.core.gates import Gate, GatedLinear, GateParam

PAPER = GateParam(mean_fn="tanh", init_mean=1.0, init_std=0.1, noise_std=0.1, reg_sigma=0.5)


def test_paper_init_opens_every_gate():
    torch.manual_seed(0)
    g = Gate(10_000, PAPER).eval()
    assert abs(float(g.mu.mean()) - math.tanh(1.0)) < 0.01  # mu ~ 0.76
    assert torch.all(g() == 1.0)  # mu + 0.5 ~ 1.26: clamped open


def test_eval_is_deterministic_training_is_noisy():
    torch.manual_seed(0)
    g = Gate(64, GateParam(mean_fn="identity", init_mean=0.0, init_std=0.1, noise_std=0.1))
    g.eval()
    assert torch.equal(g(), g())
    assert torch.allclose(g(), (g.theta + 0.5).clamp(0, 1))
    g.train()
    a, b = g(), g()
    assert not torch.equal(a, b)
    assert (a - (g.theta + 0.5)).abs().max() < 0.6  # noise of std 0.1 around mu + 0.5
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_open_prob_is_phi_of_shifted_mean():
    g = Gate(3, PAPER)
    with torch.no_grad():
        g.theta.copy_(torch.tensor([math.atanh(-0.5), 0.0, math.atanh(0.5)]))
    # Phi((mu + 0.5) / 0.5) for mu = -0.5, 0, 0.5 -> Phi(0), Phi(1), Phi(2)
    expected = torch.tensor([0.5, 0.8413447, 0.9772499])
    assert torch.allclose(g.open_prob(), expected, atol=1e-6)


def test_closed_means_eval_value_zero():
    g = Gate(4, GateParam(mean_fn="identity", init_std=0.0))
    with torch.no_grad():
        g.theta.copy_(torch.tensor([-0.6, -0.5, -0.4, 0.7]))
    assert g.closed().tolist() == [True, True, False, False]
    assert g.values().tolist() == pytest.approx([0.0, 0.0, 0.1, 1.0])


def _gated(bias=True, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(6, 5, bias=bias)
    gl = GatedLinear(base, GateParam(mean_fn="identity", init_mean=0.0, init_std=0.4, noise_std=0.1))
    return base, gl


def test_gated_linear_formula_and_frozen_base():
    base, gl = _gated()
    gl.eval()
    x = torch.randn(3, 6)
    zr, zc = gl.row_gate.values(), gl.col_gate.values()
    expected = zr * (x * zc @ base.weight.T + base.bias)
    assert torch.allclose(gl(x), expected, atol=1e-6)
    assert not base.weight.requires_grad and not base.bias.requires_grad


def test_gradient_reaches_only_gate_means():
    _, gl = _gated()
    gl.train()
    gl(torch.randn(4, 6)).sum().backward()
    assert gl.row_gate.theta.grad is not None and gl.col_gate.theta.grad is not None
    assert gl.base.weight.grad is None and gl.base.bias.grad is None


def test_closed_row_outputs_exact_zero_even_with_bias():
    _, gl = _gated()
    with torch.no_grad():
        gl.row_gate.theta[2] = -1.0
    gl.eval()
    assert torch.all(gl(torch.randn(7, 6))[:, 2] == 0)


@pytest.mark.parametrize("bias", [True, False])
def test_merged_equals_gated_eval(bias):
    _, gl = _gated(bias)
    gl.eval()
    x = torch.randn(5, 6)
    assert torch.allclose(gl.merged()(x), gl(x), atol=1e-6)


def test_paper_gated_off_count():
    _, gl = _gated()
    with torch.no_grad():
        gl.row_gate.theta.fill_(0.5)
        gl.col_gate.theta.fill_(0.5)
        gl.row_gate.theta[:2] = -1.0  # 2 of 5 rows closed
        gl.col_gate.theta[:3] = -1.0  # 3 of 6 columns closed
    assert gl.gated_off_params() == 30 - 3 * 3


def test_bad_param_values_are_refused():
    with pytest.raises(ValueError, match="mean_fn"):
        GateParam(mean_fn="sigmoid")
    with pytest.raises(ValueError):
        GateParam(reg_sigma=0.0)
