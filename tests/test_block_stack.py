"""The regularizer's counts over stacked blocks equal the per-block, per-gate computation they replace
(core/block_stack.py): the same numbers from a fraction of the kernels."""

import pytest
import torch

from compress_models import tiny
from finegates import GateConfig, apply_gates
from finegates.core.coupling import DELETABLE_SIDE, keep, kept_params
from finegates.core.gates import GatedLinear, GateParam
from finegates.training.regularizer import RegConfig, Regularizer


def _random_gates(family: str):
    model = apply_gates(tiny(family), GateConfig(param=GateParam(mean_fn="identity", init_mean=0.0, init_std=0.0)))
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GatedLinear):
                for g in m.gates().values():
                    g.theta.uniform_(-0.8, 0.8)  # about a third closed (value clamp(theta + 0.5) == 0)
    return model


def _reference_kept(reg: Regularizer, hard: bool) -> torch.Tensor:
    total = 0.0
    for lay, gated in reg.blocks:
        sides = {role: m.gates().get(DELETABLE_SIDE[role]) for role, m in gated.items()}
        open_ = {role: ((g.values() > 0).float() if hard else g.open_prob()) for role, g in sides.items() if g}
        total = total + kept_params(keep(open_, lay), lay)
    return total / reg.dense


@pytest.mark.parametrize("family", ["bert", "llama", "qwen2"])
def test_stacked_kept_fraction_is_the_per_block_one(family):
    model = _random_gates(family)
    reg = Regularizer(model, RegConfig(kind="budget"))
    assert len(reg.stacks) == 1 and reg.stacks[0].n_blocks == len(reg.blocks)
    for hard in (True, False):
        assert float(reg.kept_fraction(hard)) == pytest.approx(float(_reference_kept(reg, hard)), rel=1e-6)
    assert 0.05 < reg.removed_fraction() < 0.95  # the random gates really close something


def test_stacked_paper_and_stg_penalties_are_the_per_gate_ones():
    model = _random_gates("bert")
    gates = [[g for g in m.gates().values()] for m in model.modules() if isinstance(m, GatedLinear)]
    keep_frac = 1 - 0.4
    paper = torch.stack([torch.stack([(g.open_prob().mean() - keep_frac).abs() for g in layer]).mean()
                         for layer in gates]).mean()
    stg = torch.cat([g.open_prob() for layer in gates for g in layer]).mean()
    assert float(Regularizer(model, RegConfig(kind="layer", sparsity=0.4)).penalty()) == pytest.approx(float(paper), rel=1e-6)
    assert float(Regularizer(model, RegConfig(kind="stg")).penalty()) == pytest.approx(float(stg), rel=1e-6)


def test_paper_penalty_gradient_reaches_every_gate():
    model = _random_gates("bert")
    Regularizer(model, RegConfig(kind="layer", sparsity=0.4)).penalty().backward()
    grads = [g.theta.grad for m in model.modules() if isinstance(m, GatedLinear) for g in m.gates().values()]
    assert all(gr is not None and gr.abs().sum() > 0 for gr in grads)


def test_stacked_closing_closes_the_chosen_units_in_every_mlp_gate():
    model = _random_gates("llama")
    reg = Regularizer(model, RegConfig(kind="budget"))
    st = reg.stacks[0]
    mask = torch.zeros(st.n_units, dtype=torch.bool)
    mask[::7] = True
    before = {id(g): g.theta.clone() for gates in st.unit_gates.values() for g in gates}
    st.close_units(mask)
    for gates in st.unit_gates.values():
        for b, g in enumerate(gates):
            m = mask.view(st.n_blocks, -1)[b]
            assert torch.all(g.values()[m] == 0)
            assert torch.equal(g.theta[~m], before[id(g)][~m])  # the others untouched, bit for bit
