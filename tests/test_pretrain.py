"""Sparse pretraining (pretrain.py): a 2-layer, 32-wide Llama trained from scratch on CPU, dense and
gated; exact compression of the gated run, bit-identical resume, matched-size dense models, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from decoder_helpers import write_text

from finegates import loaders, pipeline
from finegates.training import pretrain as P
from finegates.training.checkpoint import RunError

TINY = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128,
        "tie_word_embeddings": True}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: with 2 threads on a busy shared CPU each op can wait a whole scheduler slice."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pt")
    (d / "tiny.json").write_text(json.dumps(TINY))
    return {"config": d / "tiny.json", "train": write_text(d / "train.txt", 4000, 1),
            "valid": write_text(d / "valid.txt", 400, 2), "test": write_text(d / "test.txt", 400, 3)}


def config(data, out, **kw) -> P.PretrainConfig:
    base = dict(out=out, model_config=data["config"], text_files=(data["train"],), valid_text_file=data["valid"],
                test_text_file=data["test"], vocab_size=300, max_steps=30, batch_size=8, block_size=32,
                eval_every=10, warmup_steps=3, lr=1e-2, gate_lr=0.1, progress=False, device="cpu")
    return P.PretrainConfig(**{**base, **kw})


def curve(run_dir) -> list[float]:
    return [r["valid"]["perplexity"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def gated_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("gated") / "run"
    metrics = P.pretrain(config(data, out, mode="gated", sparsity=0.4, reg_start_step=5, ramp_steps=12))
    return out, metrics


def test_dense_loss_decreases_and_the_model_folder_reloads(data, tmp_path):
    from transformers import AutoTokenizer

    m = P.pretrain(config(data, tmp_path / "dense", mode="dense"))
    ppl = curve(tmp_path / "dense")
    assert m["complete"] and m["steps"] == 30 and len(ppl) == 3
    assert ppl[-1] < ppl[0] and ppl[-1] < 80  # an untrained model is near-uniform: ~300 over 300 tokens
    tok = AutoTokenizer.from_pretrained(tmp_path / "dense" / "model")  # a plain HF folder
    assert len(tok) == m["model_config"]["vocab_size"] == 300
    again = pipeline.evaluate_path(tmp_path / "dense" / "model", data["test"], m["window"], m["stride"], device="cpu")
    assert again["perplexity"] == pytest.approx(m["test_perplexity"], rel=1e-6)
    assert not (tmp_path / "dense" / "checkpoint").exists()


def test_gated_run_closes_gates_and_compresses_exactly(gated_run, data, tmp_path):
    from finegates.pipeline import compress_run, logits
    from finegates.compression.saved import load

    out, m = gated_run
    assert 0.3 <= m["removed_fraction"] <= 0.5  # the top-k schedule stops at the 0.4 target
    assert m["predicted_kept_linear_params"] < 0.7 * m["block_linear_params"]
    weights = load_file(str(out / "trainable.safetensors"))
    assert weights and all(k.endswith(".theta") for k in weights)

    report = compress_run(out, tmp_path / "small", limit=4)  # what `finegates compress` runs
    assert report["max_abs_diff"] < 1e-4 and report["params_compressed"] < 0.85 * report["params_dense"]
    assert report["layer_linear_params_compressed"] == report["coupling_predicted_linear_params"]
    gated, tok, _ = loaders.load_lm_run(out)
    batches = pipeline.lm_eval_batches(out, tok, limit=4)
    torch.testing.assert_close(logits(load(tmp_path / "small"), batches), logits(gated, batches), atol=1e-4, rtol=0)
    ppl_run = pipeline.evaluate_path(out, data["test"], m["window"], m["stride"], device="cpu")
    ppl_small = pipeline.evaluate_path(tmp_path / "small", data["test"], m["window"], m["stride"], device="cpu")
    assert ppl_run["kind"] == "gated run" and ppl_small["kind"] == "compressed"
    assert ppl_run["perplexity"] == pytest.approx(m["test_perplexity"], rel=1e-6)
    assert ppl_small["perplexity"] == pytest.approx(ppl_run["perplexity"], rel=1e-5)


def test_a_moved_run_still_loads_and_evaluates(gated_run, data, tmp_path):
    import shutil

    out, m = gated_run
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(out, moved)
    hidden = out.with_name("hidden")
    out.rename(hidden)  # the original place is gone: the copy must not reach back to it
    try:
        ppl = pipeline.evaluate_path(moved, data["test"], m["window"], m["stride"], device="cpu")
    finally:
        hidden.rename(out)
    assert ppl["kind"] == "gated run" and ppl["perplexity"] == pytest.approx(m["test_perplexity"], rel=1e-6)


def test_resume_after_interruption_gives_the_same_run(gated_run, data, tmp_path, monkeypatch):
    reference, _ = gated_run
    out = tmp_path / "run"
    real, calls = P.PretrainGates.extra_loss, []

    def killed_at_step_16(*args, **kwargs):
        calls.append(1)
        if len(calls) == 16:
            raise KeyboardInterrupt  # a kill after the step-10 checkpoint
        return real(*args, **kwargs)

    monkeypatch.setattr(P.PretrainGates, "extra_loss", killed_at_step_16)
    with pytest.raises(KeyboardInterrupt):
        P.pretrain(config(data, out, mode="gated", sparsity=0.4, reg_start_step=5, ramp_steps=12))
    monkeypatch.setattr(P.PretrainGates, "extra_loss", real)
    assert not (out / "metrics.json").exists() and (out / "checkpoint" / "state.pt").is_file()
    P.pretrain(P.config_from_run(out), resume=True)
    assert curve(out) == curve(reference)
    for name in ("model/model.safetensors", "trainable.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(reference / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dense_at_matched_size(data, tmp_path):
    from transformers import AutoConfig

    from finegates.training.scratch import build_config, match_intermediate, param_count, train_tokenizer

    tok = train_tokenizer([data["train"]], 300)
    full = build_config(TINY, tok)
    target = int(0.75 * param_count(full))
    small = match_intermediate(full, target)
    assert small.intermediate_size < full.intermediate_size and small.intermediate_size % 8 == 0
    assert abs(param_count(small) - target) <= 3 * 32 * 2 * 4  # half a step of 8 units, 2 layers
    with pytest.raises(ValueError, match="cannot go below"):
        match_intermediate(full, 1000)
    m = P.pretrain(config(data, tmp_path / "m", mode="dense", match_params=target, max_steps=4, eval_every=4))
    assert m["params"] == param_count(small)  # within half a step of 8 MLP units of the target
    assert AutoConfig.from_pretrained(tmp_path / "m" / "model").intermediate_size == small.intermediate_size


def test_bad_input_is_refused(data, tmp_path):
    from typer.testing import CliRunner

    from finegates.cli import app

    bad = [({"text_files": (tmp_path / "missing.txt",)}, "text file not found"),
           ({"valid_text_file": None}, "--valid-text-file"),
           ({"sparsity": 1.0}, r"\[0, 1\)"), ({"sparsity": -0.1}, r"\[0, 1\)"),
           ({"model_config": tmp_path / "none.json"}, "model config not found"),
           ({"mode": "sparse"}, "gated or dense"),
           ({"match_params": 1000}, "--mode dense"),
           ({"max_steps": 0}, "max-steps"), ({"vocab_size": 100}, "vocab-size"),
           ({"prune_units": ("mlp", "heads")}, "prune-units")]
    for kw, message in bad:
        with pytest.raises(ValueError, match=message):
            config(data, tmp_path / "r", **kw)
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "bert.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not valid JSON"):
        config(data, tmp_path / "r", model_config=tmp_path / "bad.json")
    with pytest.raises(ValueError, match="not a decoder"):
        config(data, tmp_path / "r", model_config=tmp_path / "bert.json")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        P.pretrain(config(data, tmp_path / "r", block_size=256))
    with pytest.raises(RunError, match="no checkpoint"):
        P.pretrain(config(data, tmp_path / "r2"), resume=True)

    r = CliRunner().invoke(app, ["pretrain", "--config", str(data["config"]), "--text-files", str(data["train"]),
                                 "--valid-text-file", str(data["valid"]), "--sparsity", "1.5",
                                 "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "--sparsity must be in [0, 1)" in r.output


def test_cli_pretrain_runs_and_resume_refuses_other_runs(data, tmp_path):
    from typer.testing import CliRunner

    from finegates.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["pretrain", "--config", str(data["config"]), "--text-files", str(data["train"]),
                            "--valid-text-file", str(data["valid"]), "--mode", "dense", "--vocab-size", "300",
                            "--max-steps", "3", "--eval-every", "3", "--batch-size", "4", "--block-size", "32",
                            "--no-progress", "--device", "cpu", "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "pretrain dense: 3 steps" in r.output
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text(json.dumps({"train": {"method": "gates"}, "objective": "lm"}))
    r = runner.invoke(app, ["pretrain", "--resume", str(tmp_path / "lm")])
    assert r.exit_code == 2 and "not a pretraining run" in r.output


def test_pretrain_writes_only_a_new_folder_or_its_own_run(data, tmp_path):
    """outputs.py's rule, before any tokenizer is trained: a folder of the user's is never written."""
    from finegates.data.outputs import OutputError

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own notes")
    with pytest.raises(OutputError, match="is not empty and holds no finegates pretrain run"):
        P.pretrain(config(data, mine), overwrite=True)
    assert [(p.name, p.read_text()) for p in mine.iterdir()] == [("notes.txt", "my own notes")]
    with pytest.raises(OutputError, match="is the input"):
        P.pretrain(config(data, data["config"]))
