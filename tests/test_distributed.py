"""Two training processes (torchrun, gloo on CPU; accelerate sets the group up) train the same gates as one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from run_helpers import write_task

# accelerate's own launcher runs multi-process CPU jobs only through MPI; torchrun is the CPU launcher
TWO_PROCESSES = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]


def no_dropout_model(folder: Path, model_type: str = "bert") -> Path:
    """A tiny random model of `model_type` without dropout: the only randomness left is shared by
    every rank (gate noise). MPNet and RoBERTa number positions after the padding index: an
    architecture unlike BERT's in more than its name."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from finegates.core.arch import UnsupportedModelError, spec_for_model_type
    from finegates.loaders import default_model_path

    try:
        spec_for_model_type(model_type)
    except UnsupportedModelError:
        pytest.skip(f"{model_type}: finegates has no ArchSpec row for it in this checkout")
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=30527, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    AutoModel.from_config(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def no_dropout_bert(tmp_path_factory) -> Path:
    return no_dropout_model(tmp_path_factory.mktemp("bert"))


def _train(args: list[str], out: Path, launcher: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [*launcher, "-m", "finegates.cli", "train", *args, "--out", str(out), "--no-progress", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("model_type", ["bert", "mpnet"])  # mpnet: the base-size model's architecture (issue 24)
def test_two_processes_train_what_one_trains(model_type, tmp_path):
    model = no_dropout_model(tmp_path / model_type, model_type)
    train_csv, dev_csv = write_task(tmp_path / "data", n_train=64, n_eval=24)
    args = ["--model", str(model), "--train-file", str(train_csv), "--eval-file", str(dev_csv),
            "--text-columns", "text", "--epochs", "2", "--batch-size", "8", "--lr", "0.05", "--sparsity", "0.3",
            "--pooling", "cls", "--checkpoint-every", "3"]
    one = _train(args, tmp_path / "one", [sys.executable])
    two = _train(args, tmp_path / "two", TWO_PROCESSES)
    assert two["processes"] == 2 and one["processes"] == 1 and len(two["peak_memory_mb_per_process"]) == 2
    assert two["steps"] == one["steps"] == 16
    a, b = load_file(str(tmp_path / "one" / "trainable.safetensors")), load_file(str(tmp_path / "two" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # gradients of two half batches averaged == gradient of the whole batch (float rounding)
        assert torch.allclose(a[k], b[k], atol=1e-4), k
    assert two["removable_fraction"] == pytest.approx(one["removable_fraction"], abs=1e-6)
    assert two["dev"] == pytest.approx(one["dev"], abs=1e-6)  # the whole dev set, evaluated once
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # one line per evaluation: only the main process writes
    assert not (tmp_path / "two" / "checkpoint").exists()  # complete run: checkpoint removed once


def test_global_batch_must_split_evenly(no_dropout_bert, tmp_path):
    train_csv, dev_csv = write_task(tmp_path / "data", n_train=16, n_eval=8)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*TWO_PROCESSES, "-m", "finegates.cli", "train",
           "--model", str(no_dropout_bert), "--train-file", str(train_csv), "--eval-file", str(dev_csv),
           "--text-columns", "text", "--batch-size", "7", "--out", str(tmp_path / "run"), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "must be a multiple of the 2 training processes" in proc.stderr + proc.stdout
