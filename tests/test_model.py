"""apply_gates on every family: placement, freezing, state round trip, merging."""

import pytest
import torch

from compress_models import FAMILIES, tiny
from finegates import GateConfig, apply_gates, gate_state_dict, gated_layers, load_gate_state_dict, merge_gates
from finegates.core.arch import UnsupportedModelError, blocks, spec_for
from finegates.core.gates import GateParam
from finegates.core.model import count_gate_params, count_trainable, head_parameters


@pytest.mark.parametrize("family", FAMILIES)
def test_every_role_of_every_block_is_gated(family):
    model = apply_gates(tiny(family), GateConfig())
    spec = spec_for(model)
    layers = gated_layers(model)
    n_blocks = len(blocks(model, spec))
    assert len(layers) == n_blocks * len(spec.roles)
    assert {m.role for m in layers} == set(spec.roles)


@pytest.mark.parametrize("family", FAMILIES)
def test_only_gates_and_head_train(family):
    model = apply_gates(tiny(family), GateConfig())
    head = {id(p) for p in head_parameters(model)}
    for name, p in model.named_parameters():
        is_gate = name.endswith(".theta")
        assert p.requires_grad == (is_gate or id(p) in head), name
    assert count_trainable(model) == count_gate_params(model) + sum(p.numel() for p in head_parameters(model))


def test_gate_count_matches_paper_formula():
    # RoBERTa-base in METHOD.md: 12 x (4 x (768 + 768) + 2 x (768 + 3072)) = 165,888 gates
    model = apply_gates(tiny("bert"), GateConfig())
    d, i, n = 32, 48, 3
    assert count_gate_params(model) == n * (4 * (d + d) + 2 * (d + i))


def test_roles_and_target_modules_select_layers():
    only_mlp = apply_gates(tiny("bert"), GateConfig(roles=("up", "down")))
    assert {m.role for m in gated_layers(only_mlp)} == {"up", "down"}
    peft_style = apply_gates(tiny("llama"), GateConfig(target_modules=("q_proj", "v_proj"), layers=(0,)))
    assert sorted((m.layer, m.role) for m in gated_layers(peft_style)) == [(0, "q"), (0, "v")]
    with pytest.raises(ValueError, match="matched no linear layer"):
        apply_gates(tiny("bert"), GateConfig(target_modules=("nonexistent",)))


def test_train_bias_and_norm_options():
    model = apply_gates(tiny("bert"), GateConfig(train_bias=True, train_norm=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("intermediate.dense.base.bias") for n in trainable)
    assert any("LayerNorm.weight" in n and ".layer." in n for n in trainable)
    assert not any("embeddings" in n for n in trainable)


def test_state_round_trip_and_mismatch_refused():
    a = apply_gates(tiny("bert", seed=1), GateConfig(param=GateParam(init_std=0.3)))
    b = apply_gates(tiny("bert", seed=1), GateConfig())
    x = torch.randint(0, 100, (2, 7))
    load_gate_state_dict(b, gate_state_dict(a))
    a.eval(), b.eval()
    assert torch.equal(a(input_ids=x).logits, b(input_ids=x).logits)
    other = apply_gates(tiny("bert"), GateConfig(roles=("q",)))
    with pytest.raises(ValueError, match="does not match"):
        load_gate_state_dict(other, gate_state_dict(a))


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_merge_gates_keeps_outputs(family):
    model = apply_gates(tiny(family), GateConfig(param=GateParam(mean_fn="identity", init_mean=0.0, init_std=0.4))).eval()
    x = torch.randint(1, 100, (2, 9))
    before = model(input_ids=x).logits
    merge_gates(model)
    assert not gated_layers(model)
    assert torch.allclose(model(input_ids=x).logits, before, atol=1e-5)


def test_unknown_architecture_is_refused():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="unsupported model type 'gpt2'"):
        apply_gates(model, GateConfig())
