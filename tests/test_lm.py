"""The language-modelling objective: text data, exact sliding-window perplexity, LM gate runs,
and the decoder generation benchmark. Tiny random decoders only."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch
import torch.nn.functional as F

from decoder_helpers import make_decoder, write_text

from finegates import loaders, pipeline
from finegates.data import text
from finegates.training import config, lm, perplexity as ppl, schedules
from finegates.bench.decoder import bench_generation


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_decoder(tmp_path_factory.mktemp("lm") / "llama", "llama")


@pytest.fixture(scope="module")
def model_and_tok(llama):
    from finegates.loaders import load_tokenizer

    return loaders.load_causal_lm(str(llama)).eval(), load_tokenizer(str(llama))


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    return write_text(d / "train.txt", 900, 1), write_text(d / "eval.txt", 200, 2)


# ---- data -------------------------------------------------------------------------------------------
def test_pack_drops_the_partial_block():
    blocks = text.pack(torch.arange(10), 4)
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(text.LMDataError, match="fewer than one block"):
        text.pack(torch.arange(3), 4)


def test_text_files_plain_gz_and_errors(tmp_path, model_and_tok):
    _, tok = model_and_tok
    (tmp_path / "a.txt").write_text("the city grew")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("good river")
    ids = text.tokenize_files([tmp_path / "a.txt", tmp_path / "b.txt.gz"], tok).tolist()
    a = tok("the city grew", add_special_tokens=False)["input_ids"]
    b = tok("good river", add_special_tokens=False)["input_ids"]
    assert ids == a + [tok.eos_token_id] + b
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(text.LMDataError, match="empty"):
        text.read_text(tmp_path / "empty.txt")
    with pytest.raises(text.LMDataError, match="not found"):
        text.read_text(tmp_path / "missing.txt")


@pytest.mark.parametrize("n,window,stride", [(10, 4, 2), (10, 4, 4), (11, 5, 3), (3, 8, 4), (9, 4, 1)])
def test_windows_score_every_token_once(n, window, stride):
    scored = []
    for begin, end, score_from in ppl.windows(n, window, stride):
        assert end - begin <= window and begin < score_from < end
        if begin > 0:
            assert score_from - begin >= max(1, window - stride)  # the promised minimum context
        scored.extend(range(score_from, end))
    chunk_starts = set(range(window, n, window)) if stride == window else set()
    assert scored == [t for t in range(1, n) if t not in chunk_starts]


def test_bad_window_is_refused():
    with pytest.raises(ValueError, match="stride"):
        ppl.windows(10, 4, 5)


# ---- perplexity -------------------------------------------------------------------------------------
@torch.no_grad()
def _nll_by_hand(model, ids, window, stride):
    """Token t scored with context ids[k*stride : t], k the first window reaching t: one forward each."""
    total, count = 0.0, 0
    for t in range(1, len(ids)):
        k = next(k for k in range(len(ids)) if min(k * stride + window, len(ids)) > t)
        context = ids[k * stride: t]
        if len(context) == 0:  # a chunk's first token (stride == window): nothing to predict it from
            continue
        logits = model(input_ids=context[None]).logits[0, -1]
        total += F.cross_entropy(logits[None], ids[t][None]).item()
        count += 1
    return total / count, count


@pytest.mark.parametrize("window,stride", [(64, 64), (16, 16), (16, 8), (12, 5)])
def test_perplexity_is_exp_mean_nll_by_hand(model_and_tok, window, stride):
    model, _ = model_and_tok
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    result = ppl.perplexity(model, ids, window, stride, batch_size=3)
    mean, count = _nll_by_hand(model, ids, window, stride)
    assert result["tokens"] == count == 39 - (40 - 1) // window * (stride == window) and (result["window"], result["stride"]) == (window, stride)
    assert result["nll"] == pytest.approx(mean, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(mean), rel=1e-5)


def test_perplexity_does_not_depend_on_batch_size(model_and_tok):
    model, _ = model_and_tok
    ids = torch.randint(0, model.config.vocab_size, (100,), generator=torch.Generator().manual_seed(1))
    a = ppl.perplexity(model, ids, 16, 8, batch_size=1)["nll"]
    b = ppl.perplexity(model, ids, 16, 8, batch_size=5)["nll"]
    assert a == pytest.approx(b, rel=1e-6)


# ---- training runs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm_run(llama, texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lm"
    cfg = config.LMConfig(out=out, model=str(llama), text_files=(texts[0],), eval_text_file=texts[1], block_size=32,
                      window=32, stride=16, batch_size=4, max_steps=4, evals=2, lr=5e-2, progress=False,
                      device="cpu", trace_every=2)
    return out, lm.train_lm(cfg)


def test_lm_run_writes_the_run_directory(lm_run, llama):
    out, result = lm_run
    assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.jsonl", "trace.jsonl",
                                                "trainable.safetensors", "metrics.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["objective"] == "lm" and config["model_location"] == str(llama)
    assert config["method_config"]["name"] == "paper-lm" and config["method_config"]["reg"]["sparsity"] == 0.3
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] and metrics["steps"] == 4 and (metrics["window"], metrics["stride"]) == (32, 16)
    assert metrics["perplexity"] > 1 and metrics["dense_perplexity"] > 1
    assert len(metrics["open_fractions"]) == 14  # every linear of both blocks (paper's LM mode)
    assert metrics["trainable_params"] == metrics["gate_params"]  # no head, no biases


def test_lm_run_reloads_and_evaluates_the_same(lm_run, texts):
    out, result = lm_run
    again = pipeline.evaluate_path(out, texts[1], window=32, stride=16)
    assert again["kind"] == "gated run"
    assert again["perplexity"] == pytest.approx(result["perplexity"], rel=1e-6)


def test_gated_and_compressed_perplexity_agree(lm_run, texts, tmp_path):
    from finegates.compression.exact import compress
    from finegates.compression.saved import save_compressed

    out, _ = lm_run
    model, tok, _ = loaders.load_lm_run(out)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # close ~30% of the gates, leave others fractional: a real compression
        for m in model.modules():
            for g in getattr(m, "gates", lambda: {})().values():
                u = torch.rand(g.theta.shape, generator=gen)
                g.theta.copy_(torch.where(u < 0.3, torch.full_like(u, -5.0), torch.atanh(u.clamp(0.05, 0.45))))
    ids = text.eval_ids(texts[1], tok)
    gated = ppl.perplexity(model, ids, 32, 16)
    gen_gated = bench_generation(model, tok, prompt_tokens=24, new_tokens=8, threads=1, runs=1, warmup=0)
    save_compressed(compress(model), tok, tmp_path / "small")
    small = pipeline.evaluate_path(tmp_path / "small", texts[1], window=32, stride=16)
    assert small["kind"] == "compressed"
    assert small["nll"] == pytest.approx(gated["nll"], abs=1e-5)
    # KV-cache decoding through the compressed attention gives the same greedy tokens
    compressed, _, _ = loaders.load_for_eval(tmp_path / "small")
    gen_small = bench_generation(compressed, tok, prompt_tokens=24, new_tokens=8, threads=1, runs=1, warmup=0)
    assert gen_small["generated_ids"] == gen_gated["generated_ids"]
    assert gen_small["params"] < gen_gated["params"]


def test_cli_lm_train_and_eval(llama, texts, tmp_path):
    from typer.testing import CliRunner

    from finegates.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["train", "--objective", "lm", "--model", str(llama), "--text-files",
                            f"{texts[0]},{texts[1]}", "--eval-text-file", str(texts[1]), "--block-size", "16",
                            "--window", "32", "--stride", "16", "--max-steps", "2", "--batch-size", "4",
                            "--no-eval-dense", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert "window 32, stride 16" in r.output
    r = runner.invoke(app, ["eval", str(tmp_path / "r"), "--text-file", str(texts[1]), "--window", "32",
                            "--stride", "16", "--out", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    e = json.loads((tmp_path / "e.json").read_text())
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert e["perplexity"] == pytest.approx(m["perplexity"], rel=1e-6)
    r = runner.invoke(app, ["train", "--objective", "lm", "--model", str(llama), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--text-files" in r.output


def test_lm_config_errors(tmp_path):
    with pytest.raises(ValueError, match="text-files"):
        config.LMConfig(out=tmp_path, eval_text_file=tmp_path / "e")
    with pytest.raises(ValueError, match="stride"):
        config.LMConfig(out=tmp_path, text_files=(tmp_path / "t",), eval_text_file=tmp_path / "e", window=8, stride=16)


def test_cosine_schedule():
    f = schedules.lr_lambda("cosine", total=10, warmup=0)
    assert f(0) == 1.0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)
    g = schedules.lr_lambda("constant", total=10, warmup=2)
    assert (g(0), g(1), g(5)) == (0.5, 1.0, 1.0)


# ---- generation benchmark -----------------------------------------------------------------------------
def test_bench_generation_matches_greedy_generate(model_and_tok):
    model, tok = model_and_tok
    result = bench_generation(model, tok, prompt_tokens=20, new_tokens=6, threads=1, runs=2, warmup=1)
    assert result["prefill_ms"]["median"] > 0 and result["decode_ms_per_token"]["median"] > 0
    assert result["decode_ms_per_token"]["all_steps"]["n"] == 2 * 5
    assert result["peak_rss_mb"] > 0 and result["params"] == sum(p.numel() for p in model.parameters())
    from finegates.bench.decoder import prompt_ids

    ids = prompt_ids(tok, 20)
    with torch.no_grad():
        from transformers import GenerationConfig

        greedy = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=greedy)
    assert result["generated_ids"] == ref[0, 20:].tolist()


def test_bench_generation_refuses_too_long_prompts(model_and_tok):
    model, tok = model_and_tok
    with pytest.raises(ValueError, match="positions"):
        bench_generation(model, tok, prompt_tokens=250, new_tokens=10)


def test_eval_batches_for_compression(lm_run, model_and_tok):
    out, _ = lm_run
    _, tok = model_and_tok
    batches = pipeline.lm_eval_batches(out, tok, limit=3, length=16)
    assert len(batches) == 3 and all(b["input_ids"].shape == (1, 16) for b in batches)


def test_eval_refuses_encoders_and_classification_runs(tmp_path, texts):
    from typer.testing import CliRunner

    from finegates.cli import app

    r = CliRunner().invoke(app, ["eval", "minilm", "--text-file", str(texts[1])])
    assert r.exit_code == 2 and "not a decoder" in r.output
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {"method": "gates"}, "model_location": "x"}))
    r = CliRunner().invoke(app, ["eval", str(run), "--text-file", str(texts[1])])
    assert r.exit_code == 2 and "not a language-modelling run" in r.output


@pytest.mark.parametrize("recipe", ["paper-lm", "lm-distill"])
def test_lm_run_killed_mid_way_resumes_to_the_same_run(llama, texts, tmp_path, monkeypatch, recipe):
    """LM training goes through the one loop: a kill after a checkpoint resumes bit-exactly (CPU);
    with lm-distill the teacher is rebuilt from the starting model and the Taylor importances and
    closed units come back from the checkpoint."""
    from safetensors.torch import load_file

    from finegates.training.methods.gates import GatesMethod

    def cfg(out):
        return config.LMConfig(out=out, model=str(llama), text_files=(texts[0],), eval_text_file=texts[1],
                               block_size=32, window=32, stride=16, batch_size=4, max_steps=6, evals=3, lr=5e-2,
                               progress=False, device="cpu", eval_dense=False, recipe=recipe)

    reference = lm.train_lm(cfg(tmp_path / "ref"))
    real, calls = GatesMethod.extra_loss, []

    def killed_in_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # after the step-4 checkpoint
        return real(*args, **kwargs)

    monkeypatch.setattr(GatesMethod, "extra_loss", killed_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        lm.train_lm(cfg(tmp_path / "cut"))
    monkeypatch.setattr(GatesMethod, "extra_loss", real)
    assert not (tmp_path / "cut" / "metrics.json").exists()
    resumed = config.config_from_run(tmp_path / "cut")
    assert isinstance(resumed, config.LMConfig)
    again = lm.train_lm(resumed, resume=True)
    assert again["resumed_from_step"] == 4 and again["perplexity"] == reference["perplexity"]
    a, b = load_file(str(tmp_path / "cut" / "trainable.safetensors")), load_file(str(tmp_path / "ref" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    curve = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("cut", "ref")]
    assert [json.loads(x) for x in curve[0]] == [json.loads(x) for x in curve[1]]
