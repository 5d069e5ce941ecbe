"""The seed papers' baselines (finegates.training.methods) and SquareHead (finegates.training.distill).

Tiny random BERT (and Llama for the RoPE/GQA structure) models with the real MiniLM tokenizer;
each method: exactly the right tensors train, schedules reach their targets, what is saved
rebuilds the trained model, and one end-to-end `train` writes metrics.json.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from finegates.training.schedules import cubic_sparsity
from finegates.loaders import load_trained
from finegates.training.methods.registry import parse_options
from finegates.training.methods.magnitude import prune_structured
from finegates.training.methods.gmp import GMPMethod
from finegates.training.methods.lora import LoraOptions
from finegates.training.distill import SquareHead, squarehead_loss
from finegates.training.methods.registry import get_method
from finegates.core.model import GateConfig, apply_gates, gate_parameters
from finegates.loaders import default_model_path
from finegates.training.regularizer import RegConfig, Regularizer
from finegates.training.config import TrainConfig
from finegates.training.classify import train

BASELINES = ("full", "bitfit", "lora", "pst", "gmp", "magnitude")
WORDS = "good bad fine awful great poor nice terrible happy sad".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny random BERT folder (MiniLM's tokenizer) and a 2-class CSV task."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(str(default_model_path())).save_pretrained(root / "model")
    rng = random.Random(0)
    for name, n in (("train", 48), ("dev", 16)):
        with open(root / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for _ in range(n):
                words = rng.choices(WORDS, k=6)
                w.writerow([" ".join(words), int(sum(WORDS.index(x) % 2 == 0 for x in words) > 3)])
    return {"root": root, "model": str(root / "model")}


def cfg_for(tiny, method: str, out: Path | None = None, **kw) -> TrainConfig:
    base = dict(out=out or tiny["root"] / f"run-{method}", model=tiny["model"], train_file=tiny["root"] / "train.csv",
                eval_file=tiny["root"] / "dev.csv", text_columns=("text",), method=method, sparsity=0.5,
                batch_size=8, max_steps=6, progress=False, device="cpu", max_length=16)
    base.update(kw)
    return TrainConfig(**base)


def fresh_model(tiny) -> torch.nn.Module:
    torch.manual_seed(0)
    return BertForSequenceClassification.from_pretrained(tiny["model"], num_labels=2).eval()


def inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---- what trains ------------------------------------------------------------------------------
HEAD = {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("method", BASELINES)
def test_exactly_the_right_tensors_train(tiny, method):
    model = fresh_model(tiny)
    all_names = {n for n, _ in model.named_parameters()}
    m = get_method(method)
    groups = m.prepare(model, cfg_for(tiny, method), total_steps=10)
    names = trainable_names(model)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}  # the optimizer sees them all
    if method in ("full", "gmp"):
        assert names == all_names
    elif method == "bitfit":
        assert names == {n for n in all_names if n.endswith("bias")} | HEAD
    elif method == "lora":
        lora = {n for n in names if "lora_" in n}
        assert lora and all(".query." in n or ".value." in n for n in lora)
        assert len(lora) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)
        assert names - lora == {n.replace("bert.pooler.dense", "bert.pooler.modules_to_save.default.dense")
                                .replace("classifier.", "classifier.modules_to_save.default.") for n in HEAD}
    elif method == "pst":
        pst = names - HEAD
        assert HEAD <= names
        assert len(pst) == 2 * 6 * 6  # 2 layers x 6 linear layers x (U, V, A, B, R, C)
        assert all(n.rsplit(".", 1)[1] in ("weight_U", "weight_V", "mask_A", "mask_B", "mask_R", "mask_C") for n in pst)
    elif method == "magnitude":
        assert names == HEAD
        assert gate_parameters(model) and not any(p.requires_grad for p in gate_parameters(model))


def test_default_learning_rates(tiny):
    expect = {"full": 2e-5, "bitfit": 1e-3, "lora": 5e-4, "pst": 3e-5, "gmp": 5e-5, "magnitude": 1e-3}
    for method, lr in expect.items():
        m = get_method(method)
        groups = m.prepare(fresh_model(tiny), cfg_for(tiny, method), 10)
        head = [g for g in groups if g["name"] == "head"][0]
        assert head["lr"] == lr
        if method != "magnitude":
            assert [g for g in groups if g["name"] != "head"][0]["lr"] == lr
    m = get_method("full")
    groups = m.prepare(fresh_model(tiny), cfg_for(tiny, "full", lr=1e-4, head_lr=3e-3), 10)
    assert sorted(g["lr"] for g in groups) == [1e-4, 3e-3]


# ---- options --------------------------------------------------------------------------------------
def test_options_parse_and_refuse():
    o = parse_options(LoraOptions, {"r": "4", "alpha": "8", "targets": "q,k,v"}, "lora")
    assert (o.r, o.alpha, o.targets) == (4, 8.0, ("q", "k", "v"))
    with pytest.raises(ValueError, match="has no option 'rank'.*alpha, dropout, r, targets"):
        parse_options(LoraOptions, {"rank": "4"}, "lora")
    with pytest.raises(ValueError, match="expected a int"):
        parse_options(LoraOptions, {"r": "four"}, "lora")
    with pytest.raises(ValueError, match="r and alpha must be positive"):
        parse_options(LoraOptions, {"r": "0"}, "lora")


def test_distill_refused_where_unsupported(tiny):
    with pytest.raises(ValueError, match="does not support distillation"):
        get_method("bitfit").prepare(fresh_model(tiny), cfg_for(tiny, "bitfit", distill="squarehead"), 10)


def test_cli_help_lists_every_option():
    from dataclasses import fields

    from finegates.training.methods import BASELINES as classes
    from finegates.cli.train import METHOD_OPTIONS_HELP

    for cls in classes:
        for f in fields(cls.Options):
            assert f"{f.name}=" in METHOD_OPTIONS_HELP, (cls.name, f.name)


# ---- LoRA -------------------------------------------------------------------------------------
def test_lora_merged_equals_unmerged(tiny):
    model = fresh_model(tiny)
    m = get_method("lora")
    m.prepare(model, cfg_for(tiny, "lora", method_options={"r": "4"}), 10)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    x = inputs()
    unmerged = model(**x).logits
    state = m.trainable_state(model)
    m.finish(model)
    assert not any("lora" in n or "modules_to_save" in n for n, _ in model.named_parameters())
    merged = model(**x).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    after = m.trainable_state(model)
    assert state.keys() == after.keys() == {f"bert.encoder.layer.{i}.attention.self.{r}.weight"
                                            for i in range(2) for r in ("query", "value")} | HEAD
    for k in state:
        torch.testing.assert_close(state[k], after[k], atol=1e-6, rtol=1e-6)
    rebuilt = fresh_model(tiny)
    rebuilt.load_state_dict(state, strict=False)
    torch.testing.assert_close(rebuilt(**x).logits, unmerged, atol=1e-5, rtol=1e-5)


# ---- schedules ----------------------------------------------------------------------------------
def test_cubic_schedule():
    vals = [cubic_sparsity(t, 100, 0.6, 0.1, 0.7) for t in range(101)]
    assert vals[0] == vals[10] == 0.0 and vals[70] == vals[100] == 0.6
    assert all(a <= b for a, b in zip(vals, vals[1:]))
    assert vals[20] > 0.6 * (20 - 10) / 60  # cubic: fast first, slow at the end


def test_pst_reaches_target_and_merges_exactly(tiny):
    model = fresh_model(tiny)
    m = get_method("pst")
    m.prepare(model, cfg_for(tiny, "pst", sparsity=0.6), total_steps=20)
    assert m.current_sparsity() == 0.0
    with torch.no_grad():  # a trained-looking state: update and data-driven importance non-zero
        for layer in m.layers.values():
            layer.weight_V.normal_(0, 0.01)
            layer.mask_B.normal_(0, 0.01)
            layer.mask_R.normal_(0, 0.01)
    seen = []
    for step in range(20):
        m.after_step(model, step)
        seen.append(m.current_sparsity())
    assert seen[-1] == 0.6 and all(a <= b for a, b in zip(seen, seen[1:]))
    for layer in m.layers.values():
        w = layer.merged_weight()
        assert int((w == 0).sum()) == int(w.numel() * 0.6)
    assert abs(m.achieved_sparsity() - 0.6) < 1e-3
    model.eval()
    x = inputs()
    before = model(**x).logits
    state = m.trainable_state(model)
    m.finish(model)
    torch.testing.assert_close(model(**x).logits, before, atol=1e-5, rtol=1e-5)
    rebuilt = fresh_model(tiny)
    rebuilt.load_state_dict(state, strict=False)
    torch.testing.assert_close(rebuilt(**x).logits, before, atol=1e-5, rtol=1e-5)
    assert abs(m.summary(model)["unstructured_sparsity"] - 0.6) < 1e-3


def test_pst_mask_passes_gradient_to_importance(tiny):
    model = fresh_model(tiny)
    m = get_method("pst")
    m.prepare(model, cfg_for(tiny, "pst", sparsity=0.5), total_steps=4)
    for step in range(4):
        m.after_step(model, step)
    model.train()
    model(**inputs(), labels=torch.tensor([0, 1, 0])).loss.backward()
    layer = next(iter(m.layers.values()))
    for name in ("weight_V", "mask_B", "mask_R", "mask_C"):
        assert getattr(layer, name).grad is not None and getattr(layer, name).grad.abs().sum() > 0, name


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_gmp_reaches_target_and_pruned_weights_stay_zero(tiny, scope):
    model = fresh_model(tiny)
    m: GMPMethod = get_method("gmp")
    m.prepare(model, cfg_for(tiny, "gmp", sparsity=0.7, distill="none", method_options={"scope": scope}), 30)
    assert m.distiller is None
    pruned_before = None
    for step in range(30):
        with torch.no_grad():  # an optimizer step moves every weight, pruned ones too
            for w in m.weights.values():
                w.add_(1e-3 * torch.randn_like(w))
        m.after_step(model, step)
        zeros = {n: (w == 0) for n, w in m.weights.items()}
        if pruned_before is not None:
            assert all(bool((zeros[n] | ~pruned_before[n]).all()) for n in zeros)  # once pruned, stays pruned
        pruned_before = zeros
        assert abs(m.achieved_sparsity() - m.current) < 1e-3
    assert m.current == 0.7 and abs(m.achieved_sparsity() - 0.7) < 1e-3
    if scope == "layer":
        for w in m.weights.values():
            assert int((w == 0).sum()) == int(w.numel() * 0.7)
    assert m.freq == 1  # 0.7 * 30 / 20 -> 1 step between updates


def test_gmp_distills_by_default(tiny):
    m = get_method("gmp")
    m.prepare(fresh_model(tiny), cfg_for(tiny, "gmp"), 10)
    assert m.distiller is not None and m.distiller.weight == 1.0


# ---- structured magnitude pruning -------------------------------------------------------------------
@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("target", [0.3, 0.6])
def test_magnitude_hits_target_with_hard_gates(tiny, allocation, target):
    model = fresh_model(tiny)
    m = get_method("magnitude")
    m.prepare(model, cfg_for(tiny, "magnitude", sparsity=target, method_options={"allocation": allocation}), 10)
    reg = Regularizer(model, RegConfig(kind="budget", sparsity=target))
    removed = reg.removed_fraction()
    assert target <= removed < target + 0.05  # the fewest units that reach the target: a unit is ~1-2%
    vals = torch.cat([g.values() for g in model.modules() if hasattr(g, "theta")])
    assert set(vals.unique().tolist()) <= {0.0, 1.0}
    model.train()
    vals_train = torch.cat([g() for g in model.modules() if hasattr(g, "theta")])
    assert torch.equal(vals, vals_train)  # no noise: training sees the same 0/1 gates


def test_magnitude_closes_the_lowest_norm_units(tiny):
    model = fresh_model(tiny)
    up = model.bert.encoder.layer[0].intermediate.dense
    with torch.no_grad():
        up.weight[:5] *= 1e-3  # five MLP units of block 0 become the weakest
    apply_gates(model, GateConfig())
    prune_structured(model, 0.05, "global")
    closed = (model.bert.encoder.layer[0].intermediate.dense.row_gate.values() == 0).nonzero().flatten().tolist()
    assert set(range(5)) <= set(closed)


def test_magnitude_on_rope_gqa_llama(tiny):
    config = LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, pad_token_id=0, num_labels=2)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    apply_gates(model, GateConfig())
    removed = prune_structured(model, 0.4)
    reg = Regularizer(model, RegConfig(kind="budget", sparsity=0.4))
    assert abs(reg.removed_fraction() - removed) < 1e-6 and removed >= 0.4
    for layer in model.model.layers:  # q rows close in RoPE pairs: rows j and j + D/2 together
        closed = layer.self_attn.q_proj.row_gate.values().view(4, 8) == 0
        assert torch.equal(closed[:, :4], closed[:, 4:])


def test_magnitude_run_is_a_gated_run(tiny):
    """config.json + trainable.safetensors rebuild the gated model the way a gates run does."""
    from finegates.training.checkpoint import load_trainable
    from finegates.core.gates import GateParam

    result = train(cfg_for(tiny, "magnitude", max_steps=2))
    run = tiny["root"] / "run-magnitude"
    mc = json.loads((run / "config.json").read_text())["method_config"]
    assert mc["rebuild"] == "gates" and result["removable_fraction"] >= 0.5
    gate = GateConfig(**{**mc["gate"], "param": GateParam(**mc["gate"]["param"])})
    model = fresh_model(tiny)
    apply_gates(model, gate)
    load_trainable(model, run / "trainable.safetensors")
    reg = Regularizer(model, RegConfig(kind="budget", sparsity=0.5))
    assert abs(reg.removed_fraction() - result["removable_fraction"]) < 1e-9


def test_magnitude_run_compresses_exactly(tiny, tmp_path):
    """compress (written for gates runs) takes a magnitude run unchanged and removes what it claims."""
    compress_run = pytest.importorskip("finegates.pipeline").compress_run
    run = tmp_path / "mag"
    result = train(cfg_for(tiny, "magnitude", out=run, max_steps=2, sparsity=0.4))
    report = compress_run(run, tmp_path / "small", 16)
    assert report["max_abs_diff"] < 1e-4 and report["prediction_agreement"] == 1.0
    assert abs(report["layer_linear_removed_fraction"] - result["removable_fraction"]) < 0.01


# ---- SquareHead ------------------------------------------------------------------------------------
def test_squarehead_zero_for_identical_positive_otherwise(tiny):
    model = fresh_model(tiny)
    sh = SquareHead(model)
    x = inputs()
    model(**x)
    assert float(sh.loss(x).detach()) == 0.0
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight.mul_(0.5)
    model(**x)
    loss = sh.loss(x)
    assert float(loss.detach()) > 0
    feats_t = [torch.ones(2, 3, 4)]
    assert float(squarehead_loss([torch.zeros(2, 3, 4)], feats_t)) == pytest.approx(1.0)  # normalised per layer
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    s = torch.ones(2, 3, 4)
    s[0, 2] = 9.0  # a padded position: ignored
    assert float(squarehead_loss([s], feats_t, mask)) == 0.0
    sh.remove()


def test_gates_distill_uses_the_dense_teacher(tiny):
    model = fresh_model(tiny)
    m = get_method("gates")
    m.prepare(model, cfg_for(tiny, "gates", distill="squarehead"), 10)
    assert not any(type(mod).__name__ == "GatedLinear" for mod in m.distiller.teacher.modules())
    x = inputs()
    model.train()
    out = model(**x)
    loss, logs = m.extra_loss(model, 0, x, out)
    assert logs["distill"] > 0 and loss.requires_grad


# ---- end to end ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ("gates",) + BASELINES)
def test_train_end_to_end_writes_metrics(tiny, method):
    kw = {"distill": "squarehead"} if method == "gates" else {}
    result = train(cfg_for(tiny, method, max_steps=3, **kw), overwrite=True)  # an earlier test's run may be there
    run = tiny["root"] / f"run-{method}"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["complete"] and metrics["method"] == method and metrics["steps"] == 3
    for key in ("trainable_params", "peak_memory_mb", "seconds_per_step", "train_seconds"):
        assert metrics[key] > 0, key
    config = json.loads((run / "config.json").read_text())
    assert config["method_config"] is not None
    if method in ("pst", "gmp"):
        assert abs(result["unstructured_sparsity"] - 0.5) < 1e-3
    if config["method_config"].get("rebuild") == "dense":
        model = load_trained(run)
        if method in ("pst", "gmp"):
            from finegates.training.methods.baseline import block_linears

            w = torch.cat([lin.weight.flatten() for _, lin in block_linears(model)])
            assert abs(float((w == 0).float().mean()) - result["unstructured_sparsity"]) < 1e-6
    if method == "lora":
        assert config["method_config"]["target_modules"] and config["method_config"]["options"]["r"] == 8


def test_cli_train_with_opt(tiny, tmp_path):
    from typer.testing import CliRunner

    from finegates.cli import app

    common = ["train", "--out", str(tmp_path / "run"), "--model", tiny["model"], "--train-file",
              str(tiny["root"] / "train.csv"), "--eval-file", str(tiny["root"] / "dev.csv"), "--text-columns", "text",
              "--method", "lora", "--max-steps", "2", "--no-progress", "--device", "cpu"]
    res = CliRunner().invoke(app, common + ["--opt", "r=2", "--opt", "targets=q,k"])
    assert res.exit_code == 0, res.output
    mc = json.loads((tmp_path / "run" / "config.json").read_text())["method_config"]
    assert mc["options"]["r"] == 2 and any(t.endswith("attention.self.key") for t in mc["target_modules"])
    bad = CliRunner().invoke(app, common + ["--opt", "rank=2", "--overwrite"])
    assert bad.exit_code == 2 and "has no option 'rank'" in bad.output
    bad = CliRunner().invoke(app, common + ["--opt", "r", "--overwrite"])
    assert bad.exit_code == 2 and "expected KEY=VALUE" in bad.output


def test_gmp_and_pst_state_round_trip(tiny):
    """What --resume restores: GMP's masks and sparsity, PST's current sparsity."""
    model = fresh_model(tiny)
    m = get_method("gmp")
    m.prepare(model, cfg_for(tiny, "gmp", distill="none"), 10)
    for step in range(5):
        m.after_step(model, step)
    state = m.state()
    again = get_method("gmp")
    again.prepare(model, cfg_for(tiny, "gmp", distill="none"), 10)
    again.load_state(state)
    assert again.current == m.current > 0
    assert all(torch.equal(again.masks[n], m.masks[n]) for n in m.masks)
    p = get_method("pst")
    p.prepare(fresh_model(tiny), cfg_for(tiny, "pst"), 10)
    p.load_state({"sparsity": 0.25})
    assert p.current_sparsity() == 0.25 and p.state() == {"sparsity": 0.25}
