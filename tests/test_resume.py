"""A run killed with SIGKILL at a random step and resumed ends bit-identical to an uninterrupted one.

The tiny BERT keeps dropout on and the gates are noisy, so every random generator (python,
numpy, torch, the batch-order generator) and the lambda controller must come back exactly.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from finegates.training.checkpoint import RunError
from finegates.cli import app
from run_helpers import make_tiny_bert, write_task

TIMING = ("train_seconds", "seconds_per_step", "steady_seconds_per_step", "samples_per_second", "peak_memory_mb",
          "peak_memory_mb_per_process", "resumed_from_step")


def _train(out: Path, model: Path, task: tuple[Path, Path], *extra: str) -> subprocess.Popen:
    args = ["train", "--out", out, "--model", model, "--train-file", task[0], "--eval-file", task[1],
            "--text-columns", "text", "--batch-size", "4", "--epochs", "8", "--evals-per-epoch", "2",
            "--checkpoint-every", "5", "--trace-every", "3", "--no-progress", "--device", "cpu",
            "--recipe", "fast", *extra]  # fast: noisy gates, one more generator to restore
    return _cli(*args)


def _cli(*args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # same threads, same sums
    return subprocess.Popen([sys.executable, "-m", "finegates.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("model") / "bert")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """(reference run, killed-then-resumed run, tiny model folder, step of the checkpoint resumed)."""
    root = tmp_path_factory.mktemp("resume")
    model = tiny_model
    task = write_task(root / "data")
    ref = _train(root / "ref", model, task)  # in parallel with the run that gets killed
    victim = _train(root / "killed", model, task)
    state = root / "killed" / "checkpoint" / "state.pt"
    deadline = time.time() + 120
    while not state.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random().uniform(0.0, 0.4))  # a random step after the first checkpoint
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, victim.stdout.read()
    killed_at = torch.load(state, weights_only=True)["step"]
    assert not (root / "killed" / "metrics.json").exists()
    info = CliRunner().invoke(app, ["info", str(root / "killed")])
    assert f"incomplete: training stopped after step {killed_at}" in info.output

    resumed = _cli("train", "--resume", root / "killed", "--no-progress")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out
    return root / "ref", root / "killed", model, killed_at


def test_resumed_run_is_bit_identical(runs):
    ref, resumed, _, killed_at = runs
    a, b = load_file(ref / "trainable.safetensors"), load_file(resumed / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _lines(ref / "metrics.jsonl") == _lines(resumed / "metrics.jsonl")  # no line lost or repeated
    assert _lines(ref / "trace.jsonl") == _lines(resumed / "trace.jsonl")
    m_ref, m_res = (json.loads((d / "metrics.json").read_text()) for d in (ref, resumed))
    assert m_res["resumed_from_step"] == killed_at and m_res["complete"] is True
    assert {k: v for k, v in m_ref.items() if k not in TIMING} == {k: v for k, v in m_res.items() if k not in TIMING}
    assert not (resumed / "checkpoint").exists()  # complete: the checkpoint is gone
    assert "complete: 96 steps" in CliRunner().invoke(app, ["info", str(resumed)]).output


def test_resume_of_a_complete_run_changes_nothing(runs):
    ref = runs[0]
    before = {p.name: p.read_bytes() for p in ref.iterdir()}
    result = CliRunner().invoke(app, ["train", "--resume", str(ref)])
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in ref.iterdir()} == before


def test_trained_tensors_load_strictly(runs, tmp_path):
    from finegates.loaders import load_run

    ref, _, model, _ = runs
    run = tmp_path / "run"
    run.mkdir()
    for f in ref.iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    load_run(run)  # loads

    other = make_tiny_bert(tmp_path / "other", seed=1)  # same shapes, other weights
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "model_location": str(other)}))
    with pytest.raises(RunError, match=r"trainable.safetensors: trained on another base model"):
        load_run(run)

    (run / "config.json").write_text(json.dumps(config))
    data = (ref / "trainable.safetensors").read_bytes()
    (run / "trainable.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(RunError, match=r"trainable.safetensors: not a readable safetensors file, truncated"):
        load_run(run)

    (run / "config.json").write_text(json.dumps({**config, "format_version": 2}))
    with pytest.raises(RunError, match=r"config.json: format_version 2 is newer than this finegates reads"):
        load_run(run)


# ---- every method, in-process: an exception mid-run stands in for the kill ----------------------------
class _Cut(Exception):
    pass


def _methods() -> list[tuple[str, str | None]]:
    from finegates.training.methods.registry import METHODS, get_method

    get_method("gates")  # registers the baselines
    return sorted((m, None) for m in METHODS) + [("gates", "fast")]  # gates: default (finetune) and fast


@pytest.mark.parametrize("method,recipe", _methods())
def test_every_method_resumes_bit_exactly(tiny_model, tmp_path, method, recipe, monkeypatch):
    """Each method's state (Taylor importances, GMP masks, PST sparsity...) must come back exactly."""
    from finegates.training.config import config_from_run
    from finegates.training.methods.registry import METHODS
    from finegates.training.config import TrainConfig
    from finegates.training.classify import train

    model = tiny_model
    task = write_task(tmp_path / "data")
    options = {"gmp": {"freq": 4}}.get(method, {})  # mask updates between checkpoints
    kw = dict(model=str(model), train_file=task[0], eval_file=task[1], text_columns=("text",), method=method,
              method_options=options, sparsity=0.5, batch_size=8, epochs=3, evals_per_epoch=2,
              checkpoint_every=5, max_length=16, progress=False, device="cpu", **({"recipe": recipe} if recipe else {}))
    ref = train(TrainConfig(out=tmp_path / "ref", **kw))

    real = METHODS[method].after_step

    def cut(self, model, step):
        if step == 11:  # the last checkpoint is step 10's: step 10 is replayed after the resume
            raise _Cut
        return real(self, model, step)

    monkeypatch.setattr(METHODS[method], "after_step", cut)
    with pytest.raises(_Cut):
        train(TrainConfig(out=tmp_path / "cut", **kw))
    monkeypatch.setattr(METHODS[method], "after_step", real)
    resumed = train(config_from_run(tmp_path / "cut"), resume=True)

    assert resumed["resumed_from_step"] == 10
    a, b = load_file(tmp_path / "ref" / "trainable.safetensors"), load_file(tmp_path / "cut" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _lines(tmp_path / "ref" / "metrics.jsonl") == _lines(tmp_path / "cut" / "metrics.jsonl")
    assert {k: v for k, v in ref.items() if k not in TIMING} == {k: v for k, v in resumed.items() if k not in TIMING}
