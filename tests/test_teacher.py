"""Capacity and distillation options of gate training: `--teacher` (logit distillation from a
finetuned model) and `--train-weights` (gates over finetuned weights).

Tiny random BERT with the real MiniLM tokenizer; every run is a few CPU steps.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_baselines import cfg_for, tiny  # noqa: F401 - the module fixture

from finegates.training.distill import kd_loss
from finegates.loaders import load_run
from finegates.training.classify import train


def test_kd_loss_zero_only_when_student_matches_teacher():
    t = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    assert float(kd_loss(t.clone(), t, 2.0, regression=False)) == pytest.approx(0.0, abs=1e-7)
    assert float(kd_loss(t.flip(-1), t, 2.0, regression=False)) > 0.05
    assert float(kd_loss(torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0], [4.0]]), 1.0, regression=True)) == 2.0


def test_kd_temperature_scaling_keeps_the_gradient_scale():
    """T^2 makes the soft-target gradient comparable across temperatures (Hinton et al., 2015)."""
    t = torch.tensor([[3.0, -3.0]])
    grads = []
    for temp in (2.0, 4.0):
        s = torch.zeros(1, 2, requires_grad=True)
        kd_loss(s, t, temp, regression=False).backward()
        grads.append(float(s.grad.abs().sum()))
    assert 0.5 < grads[0] / grads[1] < 2.0


def test_teacher_run_is_distilled_and_cached(tiny, tmp_path):  # noqa: F811
    teacher = tmp_path / "teacher"
    train(cfg_for(tiny, "full", out=teacher, max_steps=4, lr=1e-3))
    student = train(cfg_for(tiny, "gates", out=tmp_path / "student", max_steps=3, teacher=str(teacher)))
    assert student["complete"]
    caches = list((teacher / "teacher_logits").glob("*.safetensors"))
    assert len(caches) == 1
    table = load_file(str(caches[0]))["logits"]
    assert table.shape == (48, 2) and torch.isfinite(table).all()
    # the table is the teacher's own eval-mode prediction on the training set
    from finegates.loaders import load_any
    from finegates.loaders import load_tokenizer

    model, _ = load_any(teacher)
    tok = load_tokenizer(tiny["model"])
    import csv

    rows = list(csv.DictReader(open(tiny["root"] / "train.csv")))
    enc = tok([rows[0]["text"]], truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**enc).logits[0], table[0], atol=1e-4)
    # the trace logs the KD term, and the config names the teacher
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["train"]["teacher"] == str(teacher) and config["train"]["kd_weight"] == 0.5


def test_distillation_changes_the_gradient(tiny, tmp_path):  # noqa: F811
    """kd_weight 1 trains on the teacher alone: a different result from the task loss alone."""
    teacher = tmp_path / "teacher"
    train(cfg_for(tiny, "full", out=teacher, max_steps=4, lr=1e-3))
    a = train(cfg_for(tiny, "gates", out=tmp_path / "a", max_steps=3))
    b = train(cfg_for(tiny, "gates", out=tmp_path / "b", max_steps=3, teacher=str(teacher), kd_weight=1.0))
    ga = load_file(str(tmp_path / "a" / "trainable.safetensors"))
    gb = load_file(str(tmp_path / "b" / "trainable.safetensors"))
    assert any(not torch.equal(ga[k], gb[k]) for k in ga)
    assert a["complete"] and b["complete"]


def test_teacher_errors_name_the_problem(tiny, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="--teacher .*no such folder"):
        cfg_for(tiny, "gates", teacher=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="--kd-weight"):
        cfg_for(tiny, "gates", kd_weight=1.5)
    with pytest.raises(ValueError, match="--kd-temperature"):
        cfg_for(tiny, "gates", kd_temperature=0.0)
    # a teacher with another label count: refused before training, no run written
    teacher = tmp_path / "three"
    from transformers import BertForSequenceClassification

    BertForSequenceClassification.from_pretrained(tiny["model"], num_labels=3,
                                                  ignore_mismatched_sizes=True).save_pretrained(teacher)
    from finegates.loaders import load_tokenizer

    load_tokenizer(tiny["model"]).save_pretrained(teacher)
    out = tmp_path / "student"
    with pytest.raises(ValueError, match="outputs 3 values per example, this task needs 2"):
        train(cfg_for(tiny, "gates", out=out, max_steps=2, teacher=str(teacher)))
    assert not (out / "trainable.safetensors").exists()


def test_train_weights_trains_saves_reloads_and_compresses(tiny, tmp_path):  # noqa: F811
    from finegates.pipeline import compress_run
    from finegates.core.gates import GatedLinear

    run = tmp_path / "w"
    result = train(cfg_for(tiny, "gates", out=run, max_steps=4, train_weights=True, sparsity=0.4,
                           recipe_options={"weight_lr": 1e-2}))
    state = load_file(str(run / "trainable.safetensors"))
    weights = [k for k in state if k.endswith("base.weight")]
    assert len(weights) == 12  # 6 linear layers per block x 2 blocks
    model, _, _ = load_run(run)
    from transformers import BertForSequenceClassification

    pretrained = BertForSequenceClassification.from_pretrained(tiny["model"], num_labels=2)
    pre = dict(pretrained.named_modules())
    gated = [(name, m) for name, m in model.named_modules() if isinstance(m, GatedLinear)]
    assert len(gated) == 12 and all(not torch.equal(m.base.weight, pre[name].weight) for name, m in gated)
    assert result["trainable_params"] > sum(v.numel() for k, v in state.items() if k.endswith("base.weight"))
    report = compress_run(run, tmp_path / "small", 16)
    assert report["max_abs_diff"] < 1e-4 and report["prediction_agreement"] == 1.0


def test_frozen_weights_stay_pretrained_with_the_fast_recipe(tiny, tmp_path):  # noqa: F811
    run = tmp_path / "g"
    train(cfg_for(tiny, "gates", out=run, max_steps=2, recipe="fast"))
    assert not any(k.endswith("base.weight") for k in load_file(str(run / "trainable.safetensors")))


def test_cli_passes_teacher_and_weights_and_refuses_a_weight_lr_for_frozen_weights(tiny, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    from finegates.cli import app

    teacher = tmp_path / "teacher"
    train(cfg_for(tiny, "full", out=teacher, max_steps=2))
    common = ["train", "--model", tiny["model"], "--train-file", str(tiny["root"] / "train.csv"),
              "--eval-file", str(tiny["root"] / "dev.csv"), "--text-columns", "text", "--max-steps", "2",
              "--max-length", "16", "--no-progress", "--device", "cpu"]
    res = CliRunner().invoke(app, common + ["--out", str(tmp_path / "s"), "--teacher", str(teacher), "--kd-weight", "0.7",
                                            "--train-weights", "--weight-lr", "1e-4"])
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["train"]["teacher"] == str(teacher) and config["train"]["kd_weight"] == 0.7
    assert config["method_config"]["weight_lr"] == 1e-4 and config["method_config"]["gate"]["train_weights"] is True
    for frozen in (["--recipe", "fast"], ["--freeze-weights"]):
        bad = CliRunner().invoke(app, common + ["--out", str(tmp_path / "b"), "--weight-lr", "1e-4", *frozen])
        assert bad.exit_code != 0 and "--weight-lr needs trained weights" in bad.output
        assert not (tmp_path / "b").exists()
    ok = CliRunner().invoke(app, common + ["--out", str(tmp_path / "d"), "--weight-lr", "1e-4"])  # default: trained
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "d" / "config.json").read_text())["method_config"]["weight_lr"] == 1e-4


def test_a_run_short_of_its_target_is_flagged():
    from finegates.cli.train import _target_missed

    assert _target_missed({"sparsity_target": 0.4, "removable_fraction": 0.39, "steps": 900}) is None
    assert _target_missed({"removable_fraction": 0.0, "steps": 9}) is None  # not a gates run
    msg = _target_missed({"sparsity_target": 0.4, "removable_fraction": 0.1, "steps": 60})
    assert "10.0%" in msg and "40% target" in msg and "60 steps" in msg
