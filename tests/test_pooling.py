"""Mean pooling: the head reads the attention-masked token mean, and every loader keeps it."""

from __future__ import annotations

import copy

import pytest
import torch

from finegates.compression.exact import compress
from finegates.compression.saved import load, save_compressed
from finegates.export import export_onnx, onnx_max_abs_diff
from finegates.loaders import default_model_path
from finegates.core.pooling import apply_pooling, checkpoint_pooling, resolve_pooling

from compress_models import gated, inputs, tiny

ENCODERS = ["bert", "roberta", "distilbert"]


def _head_input(model, batch) -> torch.Tensor:
    """The first-token state the stock head reads (captured from the block stack's output)."""
    seen = {}
    stack = model.base_model.get_submodule({"distilbert": "transformer"}.get(model.config.model_type, "encoder"))
    h = stack.register_forward_hook(lambda m, a, out: seen.update(h=out[0][:, 0].clone()))
    model(**batch)
    h.remove()
    return seen["h"]


@pytest.mark.parametrize("family", ENCODERS)
@torch.no_grad()
def test_head_reads_the_masked_mean_and_padding_does_not_matter(family):
    model = apply_pooling(tiny(family), "mean")
    b = inputs(seed=3, batch=3, seq=9)
    stock = tiny(family)  # same weights, stock [CLS] head: its stack output is the unpooled states
    states = []
    stack = stock.base_model.get_submodule({"distilbert": "transformer"}.get(family, "encoder"))
    h = stack.register_forward_hook(lambda m, a, out: states.append(out[0].clone()))
    stock(**b)
    h.remove()
    m = b["attention_mask"].unsqueeze(-1).float()
    expected = (states[0] * m).sum(1) / m.sum(1)
    assert torch.allclose(_head_input(model, b), expected, atol=1e-6)
    # the padded row gets the logits it gets alone
    row = 1
    n = int(b["attention_mask"][row].sum())
    alone = {k: v[row:row + 1, :n] for k, v in b.items()}
    assert torch.allclose(model(**b).logits[row], model(**alone).logits[0], atol=1e-5)
    assert not torch.allclose(model(**b).logits, stock(**b).logits)  # the option changes the head input


@pytest.mark.parametrize("family", ["bert", "distilbert"])
@torch.no_grad()
def test_mean_pooling_survives_compress_save_load_and_onnx(family, tmp_path):
    model = apply_pooling(gated(family, "edges"), "mean")
    b = inputs(seed=4)
    ref = model(**b).logits
    c = compress(copy.deepcopy(model))
    assert torch.allclose(c(**b).logits, ref, atol=1e-5)
    save_compressed(c, None, tmp_path / "m")
    again = load(tmp_path / "m")
    assert again.config.finegates_pooling == "mean"
    assert torch.allclose(again(**b).logits, ref, atol=1e-5)
    path = export_onnx(again, tmp_path / "m.onnx")
    assert onnx_max_abs_diff(again, path, [b, inputs(seed=5, batch=2, seq=17)]) <= 1e-4


def test_auto_reads_the_checkpoint_pooling(tmp_path):
    assert checkpoint_pooling(str(default_model_path())) == "mean"  # all-MiniLM-L6-v2: mean tokens
    assert checkpoint_pooling(str(tmp_path)) == "cls"  # a plain HF folder
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    assert resolve_pooling("auto", str(tmp_path), decoder=False) == "cls"
    assert resolve_pooling("auto", str(default_model_path()), decoder=True) == "last"
    with pytest.raises(ValueError, match="decoder classifiers pool their last token"):
        resolve_pooling("mean", str(tmp_path), decoder=True)
    with pytest.raises(ValueError, match="--pooling must be one of"):
        resolve_pooling("max", str(tmp_path), decoder=False)


@torch.no_grad()
def test_applying_twice_does_not_stack_hooks():
    b = inputs(seed=6)
    once = apply_pooling(tiny("bert"), "mean")
    twice = apply_pooling(apply_pooling(tiny("bert"), "mean"), "mean")
    assert torch.allclose(once(**b).logits, twice(**b).logits)
    back = apply_pooling(twice, "cls")
    assert torch.allclose(back(**b).logits, tiny("bert")(**b).logits)
