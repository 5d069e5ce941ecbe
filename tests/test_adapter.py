"""Gates over a low-rank-augmented frozen weight (`GateConfig.adapter_rank`, the `frozen` recipe):
the update starts at zero, trains with the gates, folds into W before compression, and the
compressed model still equals the gated one."""

from __future__ import annotations

import copy

import pytest
import torch

from finegates import GateConfig, apply_gates
from finegates.compression.exact import compress
from finegates.core.model import gated_layers
from finegates.training.recipes import get_recipe

from compress_models import PARAM, inputs, set_gates, tiny


def _with_adapter(family: str, rank: int = 3):
    model = apply_gates(tiny(family), GateConfig(param=PARAM, adapter_rank=rank, adapter_roles=("q", "v", "up")))
    set_gates(model, "random", seed=1)
    return model


def test_update_starts_at_zero_and_only_on_chosen_roles():
    plain = apply_gates(tiny("bert"), GateConfig(param=PARAM)).eval()
    model = apply_gates(tiny("bert"), GateConfig(param=PARAM, adapter_rank=3)).eval()
    x = inputs()
    with torch.no_grad():
        assert torch.equal(plain(**x).logits, model(**x).logits)  # B = 0: exactly the pretrained W
    roles = {m.role for m in gated_layers(model) if m.lora_A is not None}
    assert roles == {"q", "v"}
    assert all(m.lora_A.requires_grad and not m.base.weight.requires_grad for m in gated_layers(model) if m.lora_A is not None)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_compression_folds_the_update_exactly(family):
    model = _with_adapter(family)
    with torch.no_grad():
        for m in gated_layers(model):
            if m.lora_B is not None:
                m.lora_B.normal_(0, 0.5)  # a trained, non-zero update
    model.eval()
    x = inputs(seed=2)
    with torch.no_grad():
        ref = model(**x).logits
        c = compress(copy.deepcopy(model))
        out = c(**x).logits
    assert float((ref - out).abs().max()) <= 1e-5
    without = copy.deepcopy(model)  # the update matters: dropping it changes the output
    for m in gated_layers(without):
        m.lora_A = m.lora_B = None
    with torch.no_grad():
        assert float((ref - without(**x).logits).abs().max()) > 1e-3


def test_frozen_recipe_trains_gates_update_biases_head_only():
    r = get_recipe("frozen")
    assert r.gate.adapter_rank == 4 and not r.gate.train_weights and r.reg.schedule == "taylor"
    model = apply_gates(tiny("bert"), r.gate)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert "lora_A" in trainable and "theta" in trainable and "bias" in trainable
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("base.weight"))


def test_frozen_run_reaches_target_compresses_exactly_and_reloads(tmp_path):
    from finegates.pipeline import compress_run
    from finegates.training.config import TrainConfig
    from finegates.training.classify import train

    from run_helpers import make_tiny_bert, write_task

    model_dir = make_tiny_bert(tmp_path / "bert")
    tr, ev = write_task(tmp_path / "data")
    result = train(TrainConfig(out=tmp_path / "run", model=str(model_dir), train_file=tr, eval_file=ev,
                               text_columns=("text",), recipe="frozen", epochs=6, batch_size=8, progress=False))
    assert abs(result["removable_fraction"] - 0.4) < 0.05
    report = compress_run(tmp_path / "run", tmp_path / "small")  # rebuilds the gated model from the run (adapter too)
    assert report["max_abs_diff"] <= 1e-5 and report["layer_params_removed_fraction"] > 0.35


def test_counts_leave_out_the_update_as_they_leave_out_the_gates():
    from finegates.core.model import count_params as deployed
    from finegates.core.model import count_params

    dense = count_params(tiny("bert"))
    model = apply_gates(tiny("bert"), GateConfig(param=PARAM, adapter_rank=3))
    assert count_params(model) == deployed(model) == dense
