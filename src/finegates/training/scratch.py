"""A decoder from scratch: a BPE tokenizer trained on the text, a HF config sized to it, a fresh
model, and the trained model saved back as a plain HF folder (pretraining's building blocks)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from ..core.arch import spec_for_model_type
from ..data.files import atomic_write, read_json
from ..data.text import read_text


SPECIAL = "<|endoftext|>"  # BOS = EOS = the separator between files


# ---- tokenizer and model ------------------------------------------------------------------------
def train_tokenizer(files, vocab_size: int):
    """A byte-level BPE tokenizer trained on `files` (never an unknown token), as a HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator((line for f in files for line in read_text(f).splitlines(keepends=True)), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=SPECIAL, eos_token=SPECIAL, pad_token=SPECIAL)


def read_model_config(path: Path) -> dict:
    """The config JSON as a dict; refuse a missing file, bad JSON, or a family finegates cannot gate."""
    path = Path(path)
    raw = read_json(path, ValueError, "model config not found")
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ValueError(f"{path}: not a Hugging Face config (no model_type)")
    if not spec_for_model_type(raw["model_type"]).decoder:
        raise ValueError(f"{path}: {raw['model_type']} is not a decoder; pretraining needs a causal LM")
    return raw


def build_config(raw: dict, tokenizer):
    """A HF config from the JSON, with vocabulary and special ids taken from the tokenizer."""
    from transformers import AutoConfig

    raw = {k: v for k, v in raw.items() if not k.startswith("_")}  # "_comment" keys document the JSON
    eos = tokenizer.eos_token_id
    return AutoConfig.for_model(**{**raw, "vocab_size": len(tokenizer), "bos_token_id": eos, "eos_token_id": eos,
                                   "pad_token_id": tokenizer.pad_token_id})


def param_count(config) -> int:
    """Parameters of a causal LM built from `config` (tied weights once), without allocating them."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def match_intermediate(config, n_params: int, multiple: int = 8):
    """A copy of `config` whose intermediate_size (a multiple of `multiple`) gives the parameter
    count closest to `n_params`. Only the MLP width shrinks: heads, hidden size and vocabulary stay,
    as in the compressed model, whose residual stream and embedding compression never cuts."""
    full, i = param_count(config), config.intermediate_size
    per_unit = (param_count(replace_attr(config, intermediate_size=i + multiple)) - full) / multiple
    width = multiple * round((i - (full - n_params) / per_unit) / multiple)
    if width < multiple:
        floor = full - per_unit * (i - multiple)
        raise ValueError(f"--match-params {n_params:,}: shrinking intermediate_size alone cannot go below "
                         f"{floor:,.0f} parameters with this config")
    return replace_attr(config, intermediate_size=int(width))


def replace_attr(config, **changes):
    new = config.__class__.from_dict(config.to_dict())
    for k, v in changes.items():
        setattr(new, k, v)
    return new


def build_model(config, seed: int) -> nn.Module:
    """A freshly initialised causal LM in fp32 (bf16 comes from autocast on the GPU)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


# ---- saving ---------------------------------------------------------------------------------------
def write_folder(folder: Path, write) -> None:
    """`write(tmp_dir)`, then move each file into `folder` atomically, config.json last."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-") as tmp:
        write(tmp)
        files = sorted(Path(tmp).iterdir(), key=lambda f: f.name == "config.json")
        for f in files:
            if f.is_file():
                atomic_write(folder / f.name, lambda t, src=f: os.replace(src, t))


def save_model_folder(model: nn.Module, config, folder: Path, dtype: torch.dtype) -> None:
    """The trained weights as a plain HF model (gate wrappers removed, gates not baked in)."""
    from transformers import AutoModelForCausalLM

    state = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if not k.endswith(".theta")}
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(state, strict=True)
    plain.to(dtype)
    write_folder(folder, lambda tmp: plain.save_pretrained(tmp))
