"""The deletion rules of coupling.keep on hand-made masks, and the parameter counts."""

import torch

from compress_models import FAMILIES, tiny
from finegates.core.arch import blocks, spec_for
from finegates.core.coupling import BlockLayout, keep, kept_params

ENC = BlockLayout(hidden=8, n_heads=2, n_kv_heads=2, head_dim=4, intermediate=6)
ROPE_GQA = BlockLayout(hidden=8, n_heads=4, n_kv_heads=2, head_dim=4, intermediate=6, rope=True, swiglu=True)


def ones(n):
    return torch.ones(n)


def test_all_open_keeps_everything_and_counts_dense():
    for lay in (ENC, ROPE_GQA):
        kp = keep({}, lay)
        assert all(bool(v.all()) for v in kp.values())
        assert int(kept_params(kp, lay)) == lay.dense_params()


def test_mlp_unit_goes_if_any_member_closed():
    up, down = ones(6), ones(6)
    up[1], down[4] = 0, 0
    kp = keep({"up": up, "down": down}, ENC)
    assert kp["mlp"].tolist() == [1, 0, 1, 1, 0, 1]
    gate = ones(6)
    gate[0] = 0
    assert keep({"gate": gate}, ROPE_GQA)["mlp"].tolist() == [0, 1, 1, 1, 1, 1]


def test_closing_all_v_rows_of_a_head_removes_the_head_and_its_qk_dims():
    v = ones(8)
    v[:4] = 0  # head 0
    kp = keep({"v": v}, ENC)
    assert kp["head"].tolist() == [0, 1]
    assert not kp["qk"][0].any() and kp["qk"][1].all()


def test_closing_all_q_rows_keeps_the_head():
    kp = keep({"q": torch.zeros(8)}, ENC)
    assert kp["head"].tolist() == [1, 1]  # attention becomes uniform, not zero
    assert not kp["qk"].any()


def test_rope_pair_needs_both_rows_closed():
    q = ones(16)
    q[1] = 0  # dim 1 of head 0 closed, partner dim 3 (= 1 + D/2) open
    assert keep({"q": q}, ROPE_GQA)["qk"][0].tolist() == [1, 1, 1, 1]
    q[3] = 0
    assert keep({"q": q}, ROPE_GQA)["qk"][0].tolist() == [1, 0, 1, 0]


def test_gqa_kv_row_stays_while_any_query_head_of_its_group_needs_it():
    o = ones(16)
    o[0:4] = 0  # query head 0 (group 0) closed through O; head 1 (group 0) still open
    kp = keep({"o": o}, ROPE_GQA)
    assert kp["head"].tolist() == [0, 1, 1, 1]
    assert kp["v"].all()  # group 0's V rows still serve head 1
    o[4:8] = 0
    kp = keep({"o": o}, ROPE_GQA)
    assert not kp["v"][0].any() and not kp["k"][0].any() and kp["v"][1].all()


def test_soft_inputs_are_probabilities():
    p = torch.full((6,), 0.5)
    kp = keep({"up": p, "down": p}, ENC)
    assert torch.allclose(kp["mlp"], torch.full((6,), 0.25))


def test_dense_params_match_real_modules():
    for family in FAMILIES:
        model = tiny(family)
        spec = spec_for(model)
        block = blocks(model, spec)[0]
        linears = [block.get_submodule(spec.modules[r]) for r in spec.roles]
        bias = frozenset(r for r, m in zip(spec.roles, linears) if m.bias is not None)
        lay = BlockLayout.from_config(model.config, spec, bias)
        assert lay.dense_params() == sum(p.numel() for m in linears for p in m.parameters()), family
