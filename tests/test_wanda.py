"""The Wanda-style structured criterion (weight norm x activation norm) of baselines/magnitude.py."""

from __future__ import annotations

import copy

import torch
from decoder_helpers import make_decoder

from finegates.training.methods.magnitude import FIXED_GATES, _wanda_units, activation_norms, prune_structured
from finegates.compression.exact import compress
from finegates.loaders import load_causal_lm
from finegates.core.model import GateConfig, apply_gates
from finegates.training.regularizer import Regularizer


def _gated(tmp_path):
    model = load_causal_lm(str(make_decoder(tmp_path / "llama", "llama")))
    apply_gates(model, GateConfig(param=FIXED_GATES, train_bias=False, train_head=False))
    return model.eval()


def test_activation_norms_match_a_hand_computation(tmp_path):
    model = _gated(tmp_path)
    torch.manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 100, (2, 9))}, {"input_ids": torch.randint(0, 100, (1, 5))}]
    norms = activation_norms(model, batches)
    layer = model.model.layers[1]
    seen = {}
    handles = [layer.mlp.down_proj.register_forward_hook(lambda m, a, o: seen.setdefault("down", []).append(a[0])),
               layer.self_attn.k_proj.register_forward_hook(lambda m, a, o: seen.setdefault("k", []).append(o))]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    down = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen["down"]])
    k = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen["k"]])
    torch.testing.assert_close(norms[(1, "down")], down.norm(dim=0))
    torch.testing.assert_close(norms[(1, "k")], k.norm(dim=0))
    assert {r for _, r in norms} == {"q", "k", "o", "down"}


def test_wanda_scores_and_exact_compression(tmp_path):
    model = _gated(tmp_path)
    torch.manual_seed(1)
    norms = activation_norms(model, [{"input_ids": torch.randint(0, 100, (2, 16))}])
    lay, gated = Regularizer._collect_blocks(model)[0]
    units = {u.kind: u.priority for u in _wanda_units(0, gated, lay, norms)}
    w_down = gated["down"].base.weight.detach()
    j = 3
    assert torch.isclose(units["mlp"][j], w_down[:, j].norm() * norms[(0, "down")][j])
    assert units["qk"].numel() == lay.n_heads * lay.head_dim // 2  # RoPE: one score per pair

    reference = copy.deepcopy(model)
    removed_w = prune_structured(model, 0.3, "uniform", norms)
    removed_m = prune_structured(reference, 0.3, "uniform")
    assert removed_w >= 0.3 and removed_m >= 0.3
    closed = lambda m: torch.cat([g.closed() for l in m.modules() if hasattr(l, "gates") for g in l.gates().values()])  # noqa: E731, E741
    assert not torch.equal(closed(model), closed(reference))  # a different criterion, a different choice
    x = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        before = model(input_ids=x).logits
        after = compress(model)(input_ids=x).logits
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-5)


def test_spread_pads_when_only_the_last_dim_is_deleted():
    """Regression (found on SmolLM2 magnitude pruning): deleting only the very last V dim left a
    spread index equal to arange(n), which was taken for the identity and skipped the pad slot."""
    from finegates.core.compact import AttnLayout, spread_indices

    D = 4
    lay = AttnLayout(head_dim=D, rope=False, heads=[0, 1], groups=[0, 1], head_group=[0, 1],
                     q_dims=[[0, 1, 2, 3]] * 2, k_dims=[[0, 1, 2, 3]] * 2, v_dims=[[0, 1, 2, 3], [0, 1, 2]],
                     o_dims=[[0, 1, 2, 3], [0, 1, 2]])
    idx = spread_indices(lay)
    assert lay.v_width() == 4 and lay.n_v == 7
    assert idx["v"] is not None and idx["v"].tolist() == list(range(8))  # slot 7 reads the pad row (index 7)
    assert idx["q"] is None and idx["k"] is None
