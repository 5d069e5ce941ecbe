"""A compressed model exports to ONNX (dynamic batch and sequence) and ONNX Runtime agrees."""

from __future__ import annotations

import pytest

from finegates.compression.exact import compress
from finegates.export import export_onnx, onnx_max_abs_diff

from compress_models import gated, inputs


@pytest.mark.parametrize("family", ["bert", "qwen2"])  # encoder; RoPE decoder with GQA and q/k/v biases
def test_onnx_matches_pytorch(family, tmp_path):
    c = compress(gated(family, "edges"))
    path = export_onnx(c, tmp_path / "m.onnx")
    batches = [inputs(seed=1, batch=3, seq=11), inputs(seed=2, batch=1, seq=30)]  # not the traced shapes
    if family == "bert":
        for b in batches:
            b["token_type_ids"] = (b["input_ids"] % 2)
    assert onnx_max_abs_diff(c, path, batches) <= 1e-4
