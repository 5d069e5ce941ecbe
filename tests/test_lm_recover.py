"""Decoders that recover when cut (issue 21): the training text's <unk> handling, the LM logit
distillation from the dense model, and the `lm-distill` recipe end to end (train, compress
exactly, reload; resuming: tests/test_lm.py). Tiny random Llama only."""

from __future__ import annotations

import json

import pytest
import torch

from decoder_helpers import make_decoder, write_text

from finegates import loaders
from finegates.compression.exact import compress
from finegates.data import text
from finegates.training import config, lm
from finegates.training.distill import frozen_copy, lm_kd_loss


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_decoder(tmp_path_factory.mktemp("rec") / "llama", "llama")


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    return write_text(d / "train.txt", 1200, 1), write_text(d / "eval.txt", 200, 2)


# ---- training text ------------------------------------------------------------------------------------
def test_drop_unk_takes_whole_words_with_one_space_and_keeps_the_spacing():
    wiki = " Senjō no Valkyria 3 : <unk> Chronicles , a role @-@ playing game . <unk>\n <unk> the end <unk>\n"
    assert text.drop_unk(wiki) == " Senjō no Valkyria 3 : Chronicles , a role @-@ playing game .\n the end\n"
    assert text.drop_unk("a <unk> <unk> b") == "a b"
    assert text.drop_unk("x<unk>y <unk>s") == "x<unk>y <unk>s"  # not whole words: kept


def test_training_text_drops_unk_and_the_eval_text_keeps_it(llama, tmp_path):
    from finegates.loaders import load_tokenizer

    tok = load_tokenizer(str(llama))
    f = tmp_path / "wiki.train.tokens"
    f.write_text(" the city <unk> grew , and the port <unk> .\n", encoding="utf-8")
    dropped, counts = text.tokenize_corpus([f, f], tok, drop_unk_words=True)
    plain = tok(" the city grew , and the port .\n", add_special_tokens=False)["input_ids"]
    assert dropped.tolist() == plain + [tok.eos_token_id] + plain and counts == [len(plain)] * 2
    kept = text.tokenize_files([f], tok).tolist()  # the default reads the file as it is
    assert kept == tok(f.read_text(), add_special_tokens=False)["input_ids"] and len(kept) > len(plain)


# ---- LM distillation --------------------------------------------------------------------------------------
def test_lm_kd_loss_is_zero_for_equal_logits_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11) * 3
    assert lm_kd_loss(logits, logits.clone()).item() == 0.0
    other = logits + torch.randn_like(logits)
    assert lm_kd_loss(other, logits).item() > 0
    ref = (logits.softmax(-1) * (logits.log_softmax(-1) - other.log_softmax(-1))).sum(-1).mean()
    assert torch.allclose(lm_kd_loss(other, logits), ref, atol=1e-6)
    t = 2.0  # T^2 * KL at temperature T
    ref_t = (logits / t).softmax(-1) * ((logits / t).log_softmax(-1) - (other / t).log_softmax(-1))
    assert torch.allclose(lm_kd_loss(other, logits, t), ref_t.sum(-1).mean() * t * t, atol=1e-6)


def test_distilled_objective_is_zero_kd_on_the_untrained_gated_student(llama, texts):
    """Open gates and a zero-initialised adapter compute the dense model exactly: KL 0 to the copy."""
    from finegates.core.model import apply_gates
    from finegates.training.recipes import get_recipe

    model = loaders.load_causal_lm(str(llama))
    teacher = frozen_copy(model)
    apply_gates(model, get_recipe("lm-distill").gate)
    blocks = torch.randint(0, 200, (4, 16))
    objective = lm.DistilledLanguageModelling(blocks, blocks.flatten(), 16, 8, 2, teacher=teacher, weight=0.5,
                                              temperature=1.0)
    loss, lm_loss, _, logs = objective.loss(model, objective.batch([0, 1], torch.device("cpu")), [0, 1])
    assert logs["kd"].item() == 0.0 and torch.allclose(loss, 0.5 * lm_loss)
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():  # a student that differs is pulled back
        next(m for m in model.modules() if getattr(m, "lora_B", None) is not None).lora_B.fill_(0.1)
    assert objective.loss(model, objective.batch([0, 1], torch.device("cpu")), [0, 1])[3]["kd"].item() > 0


# ---- the lm-distill recipe end to end ------------------------------------------------------------------
def _cfg(llama, texts, out, **kw):
    args = dict(out=out, model=str(llama), text_files=(texts[0],), eval_text_file=texts[1], block_size=32,
                window=32, stride=16, batch_size=4, max_steps=12, evals=2, recipe="lm-distill", sparsity=0.3,
                progress=False, device="cpu", eval_dense=False)
    return config.LMConfig(**{**args, **kw})


def test_lm_distill_trains_closes_to_target_and_compresses_exactly(llama, texts, tmp_path):
    metrics = lm.train_lm(_cfg(llama, texts, tmp_path / "run"))
    assert metrics["kd_weight"] == 0.5 and metrics["recipe"] == "lm-distill"
    assert metrics["removable_fraction"] >= 0.3 - 0.02  # MLP units only: the last unit overshoots a little
    (n,) = metrics["train_file_tokens"]
    assert metrics["train_tokens"] == n // 32 * 32 and metrics["tokens_seen"] == 12 * 4 * 32
    gated, tok, run = loaders.load_lm_run(tmp_path / "run")
    assert run["method_config"]["gate"]["adapter_rank"] == 8 and run["kd_weight"] == 0.5
    assert any(m.lora_B.abs().sum() > 0 for m in gated.modules() if getattr(m, "lora_B", None) is not None)
    x = torch.randint(0, len(tok), (2, 24))
    with torch.no_grad():
        before = gated(input_ids=x).logits
        small = compress(gated)
        after = small(input_ids=x).logits
    assert (before - after).abs().max() < 1e-4
    layers = small.config.finegates["layers"]
    assert sum(len(p["mlp"]) for p in layers) < 2 * 48  # units were cut out
    assert all(len(p["attn"]["heads"]) == 4 for p in layers)  # attention whole: MLP units only


def test_kd_weight_zero_builds_no_teacher_and_another_method_gets_none(llama, texts, tmp_path):
    assert lm.lm_kd_weight(_cfg(llama, texts, tmp_path / "a", kd_weight=0.0)) == 0.0
    assert lm.lm_kd_weight(_cfg(llama, texts, tmp_path / "b", recipe="lm-fast")) == 0.0
    assert lm.lm_kd_weight(_cfg(llama, texts, tmp_path / "c", kd_weight=0.25)) == 0.25
    with pytest.raises(ValueError, match="kd-weight"):
        _cfg(llama, texts, tmp_path / "d", kd_weight=1.5)


def test_cli_lm_distill_takes_kd_weight_and_keep_unk(llama, texts, tmp_path):
    from typer.testing import CliRunner

    from finegates.cli import app

    args = ["train", "--objective", "lm", "--model", str(llama), "--text-files", str(texts[0]), "--eval-text-file",
            str(texts[1]), "--block-size", "16", "--window", "32", "--stride", "16", "--max-steps", "2",
            "--batch-size", "4", "--no-eval-dense", "--device", "cpu", "--no-progress", "--recipe", "lm-distill"]
    r = CliRunner().invoke(app, [*args, "--kd-weight", "0.25", "--keep-unk", "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["kd_weight"] == 0.25 and m["kd_temperature"] == 1.0 and m["drop_unk"] is False
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b")])  # the recipe's weight, <unk> dropped
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert r.exit_code == 0 and m["kd_weight"] == 0.5 and m["drop_unk"] is True

