"""The FLAP-style baseline (training/methods/flap.py): fluctuation statistics, whole heads and MLP
units closed to the target, bias compensation on o_proj/down_proj (Llama has none: one is added),
and a compressed model that keeps that bias through save, `finegates.load` and plain transformers."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from compress_models import WITHOUT_FINEGATES
from decoder_helpers import make_decoder

import finegates
from finegates.compression.exact import compress
from finegates.compression.saved import save_compressed
from finegates.core.model import apply_gates, load_gate_state_dict
from finegates.loaders import load_causal_lm, load_tokenizer
from finegates.training.methods.flap import FLAP_GATES, add_bias, add_biases, fluctuation_stats, prune_flap

_PLAIN = WITHOUT_FINEGATES + r'''
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
ids, ref = torch.load(sys.argv[2])
with torch.no_grad():
    print(json.dumps({"diff": (model(input_ids=ids).logits - ref).abs().max().item(),
                      "bias": model.model.layers[0].mlp.down_proj.bias is not None}))
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_decoder(tmp_path_factory.mktemp("flap") / "llama", "llama")  # 2 blocks, 4 heads (2 kv), 48 units


def _flap(folder, sparsity=0.3):
    model = load_causal_lm(str(folder))
    apply_gates(model, FLAP_GATES)
    torch.manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 200, (2, 24))} for _ in range(3)]
    stats = fluctuation_stats(model, batches)
    return model, stats, batches, prune_flap(model, sparsity, stats)


def test_statistics_match_a_hand_computation(folder):
    model = load_causal_lm(str(folder))
    apply_gates(model, FLAP_GATES)
    torch.manual_seed(1)
    batches = [{"input_ids": torch.randint(3, 200, (2, 9))}, {"input_ids": torch.randint(3, 200, (1, 5))}]
    stats = fluctuation_stats(model, batches)
    seen = []
    h = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for b in batches:
            model(**b)
    h.remove()
    x = torch.cat(seen).double()
    torch.testing.assert_close(stats[(1, "down")]["mean"], x.mean(0).float())
    torch.testing.assert_close(stats[(1, "down")]["var"], x.var(0).float())
    assert set(stats) == {(i, r) for i in range(2) for r in ("o", "down")}


def test_flap_closes_whole_heads_and_units_to_target_with_compensation(folder):
    model, stats, batches, removed = _flap(folder, 0.3)
    assert removed >= 0.3
    layer = model.model.layers[0]
    o, down = layer.self_attn.o_proj, layer.mlp.down_proj
    heads_closed = o.col_gate.closed().view(4, -1)
    assert bool((heads_closed.all(1) | ~heads_closed.any(1)).all())  # whole heads only
    # the bias is exactly what the removed channels gave on average: W[:, removed] @ mean(x)[removed]
    shut = down.col_gate.closed()
    assert shut.any()
    w = down.base.weight.detach()
    torch.testing.assert_close(down.base.bias.detach(), w[:, shut] @ stats[(0, "down")]["mean"][shut])
    assert o.base.bias is not None and not o.base.bias.requires_grad


def test_compensation_is_exact_for_channels_that_do_not_fluctuate(folder):
    """A removed channel whose input is constant loses nothing once its mean is in the bias."""
    model = load_causal_lm(str(folder))
    apply_gates(model, FLAP_GATES)
    down = model.model.layers[0].mlp.down_proj
    x = torch.randn(5, down.in_features)
    x[:, :7] = torch.randn(7)  # channels 0..6: the same value at every token
    with torch.no_grad():
        dense = down(x)
    stats = {"mean": x.double().mean(0).float()}
    with torch.no_grad():
        shut = torch.zeros(down.in_features, dtype=torch.bool)
        shut[:7] = True
        down.col_gate.close(shut)
        add_bias(down, down.base.weight[:, shut] @ stats["mean"][shut])
        torch.testing.assert_close(down(x), dense, atol=1e-5, rtol=1e-5)


def test_flap_model_compresses_exactly_and_reloads_with_its_bias(folder, tmp_path):
    model, _, batches, _ = _flap(folder, 0.4)
    model.eval()
    ids = torch.randint(3, 200, (2, 12))
    # the gated model rebuilds from its thetas + biases (what a run directory stores)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("theta", "bias"))}
    fresh = load_causal_lm(str(folder))
    apply_gates(fresh, FLAP_GATES)
    add_biases(fresh)
    load_gate_state_dict(fresh, state)
    with torch.no_grad():
        gated = model(input_ids=ids).logits
        assert torch.equal(fresh.eval()(input_ids=ids).logits, gated)
        small = compress(copy.deepcopy(model))
        assert (small(input_ids=ids).logits - gated).abs().max() < 1e-5
    plans = small.config.finegates["layers"]
    assert all({"o", "down"} <= set(p["bias"]) for p in plans)
    assert sum(len(p["attn"]["heads"]) for p in plans) < 8  # heads went
    save_compressed(small, load_tokenizer(str(folder)), tmp_path / "small")
    loaded = finegates.load(tmp_path / "small")
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - gated).abs().max() < 1e-5
    torch.save((ids, gated), tmp_path / "ref.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, "-c", _PLAIN, str(tmp_path / "small"), str(tmp_path / "ref.pt")],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["bias"] and got["diff"] < 1e-5


def test_flap_without_heads_closes_mlp_units_only(folder):
    model = load_causal_lm(str(folder))
    apply_gates(model, FLAP_GATES)
    torch.manual_seed(0)
    stats = fluctuation_stats(model, [{"input_ids": torch.randint(3, 200, (2, 24))}])
    removed = prune_flap(model, 0.3, stats, heads=False)
    assert removed >= 0.3
    assert not any(l.self_attn.o_proj.col_gate.closed().any() for l in model.model.layers)  # noqa: E741
    with pytest.raises(ValueError, match="removes only"):  # MLP units alone cannot remove 90%
        prune_flap(model, 0.9, stats, heads=False)
