"""Exact compression: for every family and gate pattern, the compressed model computes what the
gated model computes, holds exactly the parameters the coupling rules predict, and reloads."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import finegates
from finegates.compression.rebuild import CompressedModelError
from finegates.compression.saved import save_compressed
from finegates.compression.exact import _mlp_fold, compress, linear_params, predicted_kept
from finegates.core.model import count_params

from compress_models import FAMILIES, gated, inputs

TOL = 1e-5


@torch.no_grad()
def _outputs(model, x):
    out = model(**x, output_hidden_states=True)
    return out.logits, out.hidden_states


def _max_diff(a, b) -> float:
    (la, ha), (lb, hb) = a, b
    return max(float((la - lb).abs().max()), *(float((x - y).abs().max()) for x, y in zip(ha, hb)))


@pytest.mark.parametrize("pattern", ["random", "edges"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_compressed_equals_gated(family, pattern):
    g = gated(family, pattern, seed=1)
    x = inputs(seed=2)
    ref = _outputs(g, x)
    predicted = predicted_kept(g)
    dense_linear = linear_params(g)
    c = compress(copy.deepcopy(g))
    assert _max_diff(ref, _outputs(c, x)) <= TOL
    assert linear_params(c) == predicted < dense_linear
    assert count_params(c) < count_params(g)


def test_edge_patterns_reach_every_shape_case():
    """The hand-made pattern really closes a head, a whole attention, a whole MLP, half a pair."""
    c = compress(gated("llama", "edges"))
    layers = c.config.finegates["layers"]
    assert len(layers[0]["attn"]["heads"]) == 3  # head 0 closed through O
    assert layers[1]["attn"]["heads"] == [] and layers[1]["mlp"] == []
    assert len(layers[2]["attn"]["heads"]) == 4 and all(q == [] for q in layers[2]["attn"]["q_dims"])
    q1 = layers[0]["attn"]["q_dims"][0]  # head 1 (first kept): dim 1 closed, its pair partner open
    assert 1 in q1 and 1 + 4 in q1  # head_dim 8: the pair (1, 5) is kept whole


@pytest.mark.parametrize("family", list(FAMILIES))
def test_all_open_removes_nothing(family):
    g = gated(family, "random")
    with torch.no_grad():
        for m in g.modules():
            for gate in getattr(m, "gates", lambda: {})().values():
                gate.theta.fill_(0.5)
    x = inputs()
    ref = _outputs(g, x)
    c = compress(copy.deepcopy(g))
    assert linear_params(c) == linear_params(g)
    assert _max_diff(ref, _outputs(c, x)) <= TOL


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_reload_same_outputs(family, tmp_path):
    c = compress(gated(family, "edges"))
    x = inputs(seed=3)
    save_compressed(c, None, tmp_path, {"note": "test"})
    r = finegates.load(tmp_path)
    assert _max_diff(_outputs(c, x), _outputs(r, x)) == 0.0
    assert count_params(r) == count_params(c)
    assert json.loads((tmp_path / "compress_report.json").read_text()) == {"note": "test"}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_shapes_only_load_needs_no_weights(tmp_path):
    """What a run compressed elsewhere brings back (config, no weights) rebuilds at the same widths:
    what benchmarks.glue's `measure` times when the weights stayed on the GPU machine."""
    from finegates.compression.saved import WEIGHTS, load

    c = compress(gated("bert", "edges"))
    save_compressed(c, None, tmp_path)
    (tmp_path / WEIGHTS).unlink()
    r = load(tmp_path, weights=False)
    assert {n: p.shape for n, p in r.named_parameters()} == {n: p.shape for n, p in c.named_parameters()}
    with pytest.raises(Exception):
        load(tmp_path)  # the default still insists on the weights


def _saved(tmp_path):
    save_compressed(compress(gated("bert", "edges")), None, tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def test_mismatched_shapes_refused(tmp_path):
    cfg = _saved(tmp_path)
    cfg["finegates"]["layers"][0]["mlp"] = cfg["finegates"]["layers"][0]["mlp"][:-1]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CompressedModelError, match="wrong shape"):
        finegates.load(tmp_path)


def test_missing_tensor_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _saved(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state.pop(next(k for k in state if "intermediate" in k))
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CompressedModelError, match="missing"):
        finegates.load(tmp_path)


def test_uncompressed_folder_refused(tmp_path):
    cfg = _saved(tmp_path)
    del cfg["finegates"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CompressedModelError, match="not a compressed model"):
        finegates.load(tmp_path)


def test_ungated_bias_of_a_closed_row_is_folded():
    """A unit whose up row has no weights but a bias adds act(b) * W_down[:, j]: kept in down's bias."""
    up, down = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
    with torch.no_grad():
        up.weight[1] = 0.0
        up.bias[1] = 0.7
    fold = _mlp_fold({"up": up, "down": down}, torch.tensor([1]), swiglu=False, act=torch.nn.functional.gelu)
    expected = torch.nn.functional.gelu(torch.tensor(0.7)) * down.weight[:, 1]
    assert torch.allclose(fold, expected)
