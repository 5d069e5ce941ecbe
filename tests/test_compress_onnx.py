"""A compressed model exports to ONNX (dynamic batch and sequence) and ONNX Runtime agrees."""

from __future__ import annotations

import pytest

from finegates.compression.exact import compress
from finegates.export import export_onnx, onnx_max_abs_diff, quantize_int8

from compress_models import gated, inputs


# encoders (DistilBERT: its own attention module; MPNet: relative position bias, eager-only attention)
# and a RoPE decoder with GQA and q/k/v biases
@pytest.mark.parametrize("family", ["bert", "distilbert", "mpnet", "qwen2"])
def test_onnx_matches_pytorch(family, tmp_path):
    c = compress(gated(family, "edges"))
    path = export_onnx(c, tmp_path / "m.onnx")
    batches = [inputs(seed=1, batch=3, seq=11), inputs(seed=2, batch=1, seq=30)]  # not the traced shapes
    if family == "bert":
        for b in batches:
            b["token_type_ids"] = (b["input_ids"] % 2)
    assert onnx_max_abs_diff(c, path, batches) <= 1e-4


def test_int8_quantizes_every_projection_and_stays_close(tmp_path):
    import onnx

    c = compress(gated("bert", "edges"))
    fp32 = export_onnx(c, tmp_path / "m.onnx")
    int8 = quantize_int8(fp32, tmp_path / "m-int8.onnx")
    ops = [n.op_type for n in onnx.load(str(int8)).graph.node]
    n_const = sum(1 for n in onnx.load(str(fp32)).graph.node if n.op_type in ("MatMul", "Gemm")) - ops.count("MatMul") \
        - ops.count("Gemm")
    assert ops.count("MatMulInteger") == n_const > 0  # every weight MatMul/Gemm went int8; attention's stay fp32
    assert int8.stat().st_size < fp32.stat().st_size
    batches = [inputs(seed=1, batch=3, seq=11)]
    assert 1e-5 < onnx_max_abs_diff(c, int8, batches) < 5e-2  # really quantized, and close


def test_export_traces_eager_attention_and_sessions_skip_slow_fusions(tmp_path):
    import onnx

    from finegates.export import ort_session

    c = compress(gated("roberta", "edges"))
    assert c.config._attn_implementation == "sdpa"
    path = export_onnx(c, tmp_path / "m.onnx")
    assert c.config._attn_implementation == "sdpa"  # restored after the export
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Softmax" in ops and "IsNaN" not in ops  # SDPA's decomposition guards every score with IsNaN + Where
    ort_session(path, 1, save_optimized=tmp_path / "opt.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert "SkipLayerNormalization" not in ops and ops.count("LayerNormalization") == 7  # embeddings + 2 per layer
