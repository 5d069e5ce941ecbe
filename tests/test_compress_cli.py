"""train -> compress -> export -> bench through the CLI, on a tiny BERT and own data."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

import finegates
from finegates.training.checkpoint import read_tensors
from finegates.cli import app
from finegates.data.files import save_tensors

from run_helpers import make_tiny_bert, write_task


def _cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_compress_export_bench_from_a_run(tmp_path):
    tiny = make_tiny_bert(tmp_path / "bert")
    train, dev = write_task(tmp_path / "data")
    run = tmp_path / "run"
    _cli("train", "--out", run, "--model", tiny, "--train-file", train, "--eval-file", dev, "--text-columns", "text",
         "--no-progress", "--device", "cpu", "--batch-size", "8", "--max-steps", "2")
    tensors, meta = read_tensors(run / "trainable.safetensors")  # close gates by hand: 2 steps close none
    gen = torch.Generator().manual_seed(0)
    for name, t in tensors.items():
        if name.endswith("row_gate.theta") or name.endswith("col_gate.theta"):
            t[torch.rand(t.shape, generator=gen) < 0.4] = -1.0
    save_tensors(run / "trainable.safetensors", tensors, metadata=meta)

    model_dir = tmp_path / "small"
    _cli("compress", run, "--out", model_dir)
    report = json.loads((model_dir / "compress_report.json").read_text())
    assert report["max_abs_diff"] <= 1e-5 and report["prediction_agreement"] == 1.0
    assert report["layer_linear_params_compressed"] == report["coupling_predicted_linear_params"]
    assert report["params_compressed"] < report["params_dense"]
    assert 0 < report["layer_params_removed_fraction"] < 1
    assert finegates.load(model_dir).config.finegates["format_version"] == 2

    out = _cli("export", model_dir, "--onnx", tmp_path / "small.onnx").output
    assert float(out.rsplit("ONNX Runtime:", 1)[1].strip()) <= 1e-4

    out = _cli("export", model_dir, "--onnx", tmp_path / "small-int8.onnx", "--int8").output
    assert 0 < float(out.rsplit("):", 1)[1].strip()) <= 0.1
    assert (tmp_path / "small-int8.onnx").stat().st_size < (tmp_path / "small.onnx").stat().st_size

    _cli("bench", model_dir, "--runs", "2", "--warmup", "0", "--batch", "2", "--seq", "16", "--no-memory", "--int8",
         "--json", tmp_path / "bench.json")
    bench = json.loads((tmp_path / "bench.json").read_text())
    for key in ("latency_ms_dense", "latency_ms_compressed", "latency_ratio", "settings", "params",
                "ort_latency_ms_compressed", "ort_int8_latency_ms_compressed", "ort_int8_latency_ms_dense"):
        assert key in bench
    assert bench["onnx_mb"]["compressed-int8"] < bench["onnx_mb"]["compressed"]
    assert bench["params"]["compressed"]["params"] == report["params_compressed"]

    # peak memory is read in a fresh process per model (that process imports the worker by its path)
    _cli("bench", model_dir, "--runs", "1", "--warmup", "0", "--batch", "1", "--seq", "8", "--json", tmp_path / "mem.json")
    memory = json.loads((tmp_path / "mem.json").read_text())
    assert all(memory["memory_mb"][k]["peak_rss_mb"] > 0 for k in ("dense", "compressed")), memory["memory_mb"]
