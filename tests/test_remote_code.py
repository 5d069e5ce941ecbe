"""A compressed folder loads with plain transformers (trust_remote_code), without finegates."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from compress_models import WITHOUT_FINEGATES, set_gates
from decoder_helpers import decoder_config, make_tokenizer

import finegates
from finegates import GateConfig, GateParam, apply_gates
from finegates.compression.exact import compress
from finegates.compression.saved import save_compressed
from finegates.compression.remote_code import MODELING_FILE, RemoteCodeError, modeling_source

# Runs in a fresh interpreter where `import finegates` raises, loads both folders through the Auto
# classes and prints the largest logit differences to the references finegates.load gave.
_PLAIN = WITHOUT_FINEGATES + r'''
try:
    import finegates
    sys.exit("finegates imported")
except ImportError:
    pass
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, pipeline
enc_dir, dec_dir, ref = sys.argv[1:4]
ref = torch.load(ref)
enc = AutoModelForSequenceClassification.from_pretrained(enc_dir, trust_remote_code=True)
dec = AutoModelForCausalLM.from_pretrained(dec_dir, trust_remote_code=True)
with torch.no_grad():
    enc_diff = (enc(**ref["enc_in"]).logits - ref["enc_out"]).abs().max().item()
    dec_diff = (dec(**ref["dec_in"]).logits - ref["dec_out"]).abs().max().item()
    gen = dec.generate(ref["dec_in"]["input_ids"][:1], max_new_tokens=6, do_sample=False).tolist()
top = pipeline("text-classification", model=enc_dir, trust_remote_code=True)(ref["text"])[0]
print(json.dumps({"enc": enc_diff, "dec": dec_diff, "generate": gen, "pipeline": top,
                  "classes": [type(enc).__name__, type(dec).__name__]}))
'''


def _compressed(model, pattern: str = "random"):
    model = apply_gates(model, GateConfig(param=GateParam(mean_fn="identity", init_mean=0.5, init_std=0.0,
                                                          noise_std=0.0)))
    set_gates(model, pattern)
    return compress(model.eval())


def test_compressed_folders_load_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, BertConfig, BertForSequenceClassification

    tok = make_tokenizer(tmp_path / "tok")
    enc_dir, dec_dir = tmp_path / "enc", tmp_path / "dec"
    torch.manual_seed(0)
    save_compressed(_compressed(BertForSequenceClassification(BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
        num_labels=3))), tok, enc_dir)
    dec_config = decoder_config("llama", len(tok))
    dec_config.num_hidden_layers = 3  # the "edge" gate pattern closes all of layer 1's attention and MLP
    save_compressed(_compressed(AutoModelForCausalLM.from_config(dec_config), "edge"), tok, dec_dir)
    assert json.loads((enc_dir / "config.json").read_text())["auto_map"] == {
        "AutoModelForSequenceClassification": "modeling_finegates.FinegatesBertForSequenceClassification"}

    text = "the river town grew"
    enc, dec = finegates.load(enc_dir), finegates.load(dec_dir)
    enc_in = {"input_ids": torch.randint(3, len(tok), (2, 7)), "attention_mask": torch.tensor([[1] * 7, [1] * 4 + [0] * 3])}
    dec_in = {"input_ids": torch.randint(3, len(tok), (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    with torch.no_grad():
        ref = {"enc_in": enc_in, "dec_in": dec_in, "enc_out": enc(**enc_in).logits, "dec_out": dec(**dec_in).logits,
               "text": text}
        gen = dec.generate(dec_in["input_ids"][:1], max_new_tokens=6, do_sample=False).tolist()
        probs = torch.softmax(enc(**tok(text, return_tensors="pt")).logits[0], -1)
    torch.save(ref, tmp_path / "ref.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, "-c", _PLAIN, str(enc_dir), str(dec_dir), str(tmp_path / "ref.pt")],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["classes"] == ["FinegatesBertForSequenceClassification", "FinegatesLlamaForCausalLM"]
    assert got["enc"] <= 1e-5 and got["dec"] <= 1e-5
    assert got["generate"] == gen
    assert got["pipeline"]["score"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_shipped_code_is_cut_from_finegates_source():
    import inspect

    from finegates.compression import rebuild
    from finegates.core import compact

    source = modeling_source("BertForSequenceClassification")
    assert inspect.getsource(rebuild.build_block) in source  # the code load runs, verbatim
    assert inspect.getsource(compact.CompactAttention) in source
    assert "finegates" not in "\n".join(line for line in source.splitlines() if "import" in line)
    assert "def compress_run" not in source  # only what the rebuild reaches
    # a root its module re-exports ships from where it is defined (exact.py imports build_block from rebuild.py)
    assert "# ---- from finegates.core.arch" in modeling_source("BertModel", roots=("finegates.compression.exact:spec_for",))


def test_code_that_cannot_travel_is_refused():
    with pytest.raises(RemoteCodeError, match="relative import"):
        modeling_source("BertForSequenceClassification", roots=("finegates.training.methods.gates:GatesMethod",))
    with pytest.raises(RemoteCodeError, match="safetensors"):
        modeling_source("BertForSequenceClassification", roots=("finegates.data.files:save_tensors",))
    assert MODELING_FILE == "modeling_finegates.py"
