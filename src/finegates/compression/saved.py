"""The compressed model on disk: weights, tokenizer and a config.json whose `finegates` entry
records every layer's kept shapes; `load` rebuilds the model at those shapes, then loads strictly.

    finegates.compression.save_compressed(small, tokenizer, "model-dir", report)
    model = finegates.load("model-dir")
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch.nn as nn
from safetensors.torch import load_file

from ..core.arch import blocks, spec_for
from ..core.compact import AttnLayout
from ..core.pooling import restore_pooling
from ..data.files import atomic_write, save_tensors, write_json
from .exact import FORMAT_VERSION, build_block

WEIGHTS = "model.safetensors"


REPORT = "compress_report.json"  # what compress_run found: removed fractions, exactness, the compressed widths


class CompressedModelError(ValueError):
    """A compressed-model folder that does not match its own recorded shapes."""


# ---- save / load --------------------------------------------------------------------------------
def save_compressed(model: nn.Module, tokenizer, out_dir, report: dict | None = None) -> Path:
    """Write weights, tokenizer and config.json (with the `finegates` shapes), each atomically.

    config.json goes last: a folder without it is not a model.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fg = getattr(model.config, "finegates", None)
    if not fg:
        raise ValueError("save_compressed: this model was not compressed (no config.finegates)")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_tensors(out / WEIGHTS, state, metadata={"format": "pt", "finegates_format": str(FORMAT_VERSION)})
    if tokenizer is not None:
        with tempfile.TemporaryDirectory(dir=out, prefix=".tok-") as tmp:
            tokenizer.save_pretrained(tmp)
            for f in Path(tmp).iterdir():
                if f.is_file():
                    atomic_write(out / f.name, lambda t, src=f: os.replace(src, t))
    if report is not None:
        write_json(out / REPORT, report)
    config = model.config.to_dict()
    config["finegates"] = fg
    write_json(out / "config.json", config)
    return out


def load(model_dir) -> nn.Module:
    """Rebuild a compressed model at its recorded shapes and load its weights strictly (eval mode)."""
    import transformers
    from transformers import AutoConfig

    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise CompressedModelError(f"{d}: no config.json (not a finegates model folder)")
    raw = json.loads((d / "config.json").read_text())
    fg = raw.get("finegates")
    if not fg:
        raise CompressedModelError(f"{d}: config.json has no 'finegates' field (not a compressed model)")
    if fg.get("format_version") != FORMAT_VERSION:
        raise CompressedModelError(f"{d}: finegates format {fg.get('format_version')}, this version reads {FORMAT_VERSION}")
    config = AutoConfig.from_pretrained(d)
    cls = getattr(transformers, fg["task_class"])
    model = cls._from_config(config)
    spec = spec_for(model)
    layer_list = blocks(model, spec)
    if len(layer_list) != len(fg["layers"]):
        raise CompressedModelError(f"{d}: config records {len(fg['layers'])} layers, the model has {len(layer_list)}")
    dtype = next(model.parameters()).dtype
    for i, (block, plan) in enumerate(zip(layer_list, fg["layers"])):
        build_block(block, spec, config, plan, i, dtype)
    model.config.finegates = fg
    _load_strict(model, d / WEIGHTS)
    return restore_pooling(model).eval()


def _load_strict(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise CompressedModelError(f"{path.parent}: no {WEIGHTS}")
    state = load_file(str(path))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unknown = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} (config says {tuple(own[k].shape)})"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unknown or wrong:
        parts = [f"{len(wrong)} tensors of the wrong shape, e.g. {wrong[0]}" if wrong else "",
                 f"missing {missing[:3]}" if missing else "", f"unexpected {unknown[:3]}" if unknown else ""]
        raise CompressedModelError(f"{path}: weights do not match the recorded shapes: "
                                   + "; ".join(p for p in parts if p))
    model.load_state_dict(state, strict=True)


# ---- from a run directory -----------------------------------------------------------------------
def layer_summary(model: nn.Module) -> list[dict]:
    """Per layer: kept query heads, kv heads, padded Q/K and V widths, MLP units."""
    out = []
    for plan in model.config.finegates["layers"]:
        lay = AttnLayout.from_dict(plan["attn"])
        out.append({"heads": len(lay.heads), "kv_heads": len(lay.groups), "qk_width": lay.qk_width() if lay.heads else 0,
                    "v_width": lay.v_width() if lay.heads else 0, "mlp_units": len(plan["mlp"])})
    return out
