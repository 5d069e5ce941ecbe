"""The sparsity penalty: paper per-layer target, the schedules, and reaching the target."""

import pytest
import torch

from compress_models import tiny
from finegates import GateConfig, apply_gates
from finegates.core.gates import GateParam
from finegates.training.recipes import get_recipe
from finegates.training.regularizer import RegConfig, Regularizer


def test_paper_layer_penalty_by_hand():
    model = apply_gates(tiny("bert"), GateConfig(param=GateParam(mean_fn="identity", init_mean=0.0, init_std=0.0)))
    reg = Regularizer(model, RegConfig(kind="layer", sparsity=0.4, lam=50))
    # every gate at mu = 0: P(open) = Phi(0.5 / 0.5) = 0.8413; |0.8413 - 0.6| on rows and cols alike
    penalty, lam = reg(step=0)
    assert lam == 50
    assert float(penalty) == pytest.approx(50 * (0.8413447 - 0.6), abs=1e-5)


def test_start_step_and_zero_sparsity_switch_the_penalty_off():
    model = apply_gates(tiny("bert"), GateConfig())
    assert float(Regularizer(model, RegConfig(start_step=10))(step=3)[0]) == 0.0
    assert float(Regularizer(model, RegConfig(sparsity=0.0))(step=3)[0]) == 0.0


def test_penalty_before_start_step_is_computed_with_lambda_zero():
    """One computation for every step (so a CUDA graph is captured once): before `start_step` the
    penalty is there, times a device lambda of exactly 0, and gives the gates no gradient."""
    model = apply_gates(tiny("bert"), GateConfig())
    reg = Regularizer(model, RegConfig(kind="budget", schedule="topk", sparsity=0.4, lam=5.0, start_step=10))
    thetas = [p for n, p in model.named_parameters() if n.endswith("theta")]
    for step, lam in ((3, 0.0), (12, 5.0)):
        reg.set_step(step)
        assert float(reg.scalars()[0]) == lam
        term = reg.term(step)
        assert term.requires_grad  # computed, not a constant zero
        grads = torch.autograd.grad(term, thetas, allow_unused=True)
        total = sum(float(g.abs().sum()) for g in grads if g is not None)
        assert (total == 0.0) == (lam == 0.0)


def test_hard_removed_fraction_counts_what_compression_deletes():
    model = apply_gates(tiny("bert"), GateConfig(param=GateParam(mean_fn="identity", init_mean=0.5, init_std=0.0)))
    reg = Regularizer(model, RegConfig(kind="budget"))
    assert reg.removed_fraction() == 0.0
    for m in model.modules():
        if getattr(m, "role", "") == "up":
            with torch.no_grad():
                m.row_gate.theta.fill_(-1.0)  # every MLP unit closed
    d, i, n, h = 32, 48, 3, 32
    mlp = n * (2 * d * i + i)  # up weight + up bias + down weight (down bias stays)
    dense = n * (4 * d * h + 4 * h + 2 * d * i + i + d)
    assert reg.removed_fraction() == pytest.approx(mlp / dense)


def test_invalid_configs_are_refused():
    with pytest.raises(ValueError, match="sparsity"):
        RegConfig(sparsity=1.0)
    with pytest.raises(ValueError, match="kind"):
        RegConfig(kind="l1")
    with pytest.raises(ValueError, match="budget"):
        RegConfig(kind="layer", schedule="topk")


def _train(model, reg, steps, lr=1e-2):
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    x = torch.randint(1, 100, (16, 10))
    y = (x[:, 0] % 3)
    for step in range(steps):
        model.train()
        out = model(input_ids=x, labels=y)
        penalty, _ = reg(step)
        (out.loss + penalty).backward()
        opt.step()
        opt.zero_grad()
    return out.loss.item()


@pytest.mark.parametrize("target", [0.3, 0.5])
def test_topk_schedule_reaches_the_target_without_overshoot(target):
    recipe = get_recipe("fast")
    model = apply_gates(tiny("bert"), recipe.gate)
    reg = Regularizer(model, RegConfig(kind="budget", schedule="topk", lam=1.0, sparsity=target, ramp_steps=100))
    _train(model, reg, 260)
    assert target - 0.03 <= reg.removed_fraction() <= target + 0.05


def test_paper_recipe_barely_closes_at_its_learning_rate():
    """The failure mode METHOD.md section 5 reports: saturated clamp, lr 1e-3, few steps."""
    recipe = get_recipe("paper")
    model = apply_gates(tiny("bert"), recipe.gate)
    reg = Regularizer(model, recipe.reg)
    _train(model, reg, 100, lr=recipe.gate_lr)
    assert reg.removed_fraction() < 0.05


def test_topk_on_mlp_units_only_closes_mlp_units_and_reaches_the_target():
    """The default recipe's `units=("mlp",)`: the budget is still a fraction of all layer params."""
    from finegates.core.arch import blocks, spec_for

    recipe = get_recipe("fast")
    assert recipe.reg.units == ("mlp",)
    model = apply_gates(tiny("bert"), recipe.gate)
    reg = Regularizer(model, RegConfig(kind="budget", schedule="topk", lam=1.0, sparsity=0.3, ramp_steps=100,
                                       units=("mlp",)))
    _train(model, reg, 260)
    assert 0.27 <= reg.removed_fraction() <= 0.35
    spec = spec_for(model)
    for block in blocks(model, spec):
        up_closed = block.get_submodule(spec.modules["up"]).row_gate.closed().float().mean()
        v_closed = block.get_submodule(spec.modules["v"]).row_gate.closed().float().mean()
        assert up_closed > 0.2 and v_closed < 0.05  # MLP units went; the attention was not pushed


def test_units_must_be_known():
    with pytest.raises(ValueError, match="units must be a non-empty subset of mlp, vo, qk"):
        RegConfig(kind="budget", schedule="topk", units=("heads",))
