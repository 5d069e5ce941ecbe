"""One short end-to-end CLI run on the real MiniLM and real MRPC, and `info` on its run directory."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finegates.cli import app

MRPC = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "MRPC"
REPO_MRPC = Path(__file__).resolve().parents[1] / "data" / "MRPC"


@pytest.fixture(scope="module")
def mrpc_dir():
    for d in (MRPC, REPO_MRPC):
        if (d / "train.tsv").exists():
            return d
    pytest.skip("no MRPC data")


@pytest.mark.slow
def test_train_then_info_on_real_minilm(tmp_path, mrpc_dir):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "train", "--task", "mrpc", "--data-dir", str(mrpc_dir), "--out", str(out), "--max-steps", "6",
        "--train-limit", "96", "--eval-limit", "48", "--batch-size", "8", "--sparsity", "0.3", "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())
    for key in ("task", "dev", "trainable_params", "total_params", "gated_off_fraction"):
        assert key in m
    assert m["task"] == "mrpc" and set(m["dev"]) == {"accuracy", "f1"}
    assert 0.0 <= m["dev"]["accuracy"] <= 1.0
    assert m["total_params"] == 22_713_986  # MiniLM-L6 + a 2-way head, gates not counted
    assert m["trainable_params"] > m["gate_params"] == 6 * (4 * (384 + 384) + 2 * (384 + 1536))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["sparsity"] == 0.3 and cfg["num_labels"] == 2
    info = CliRunner().invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and "mrpc" in info.output


def test_help_reads_like_documentation():
    result = CliRunner().invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    for option in ("--task", "--sparsity", "--recipe", "--train-file", "--text-columns"):
        assert option in result.output
