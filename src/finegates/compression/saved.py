"""The compressed model on disk: weights, tokenizer and a config.json whose `finegates` entry
records every layer's kept shapes (rebuild.py documents the format); `load` rebuilds the model at
those shapes, then loads strictly. The folder also ships `modeling_finegates.py` (remote_code.py),
so plain transformers loads it with trust_remote_code.

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

from ..core.compact import AttnLayout
from ..core.pooling import restore_pooling
from ..data.files import atomic_write, save_tensors, write_json
from ..data.outputs import COMPRESSED, output_folder
from .rebuild import FORMAT_VERSION, CompressedModelError, rebuild
from .remote_code import add_remote_code


WEIGHTS = "model.safetensors"



REPORT = "compress_report.json"  # what compress_run found: removed fractions, exactness, the compressed widths



# ---- save / load --------------------------------------------------------------------------------
def save_compressed(model: nn.Module, tokenizer, out_dir, report: dict | None = None, overwrite: bool = False) -> Path:
    """Write weights, tokenizer and config.json (with the `finegates` shapes) to a new or empty
    folder, or over a compressed model with `overwrite`; the folder appears only once complete
    (data/outputs.py)."""
    if not getattr(model.config, "finegates", None):
        raise ValueError("save_compressed: this model was not compressed (no config.finegates)")
    with output_folder(out_dir, COMPRESSED, overwrite=overwrite) as out:
        _write_compressed(model, tokenizer, out, report)
    return Path(out_dir)



def _write_compressed(model: nn.Module, tokenizer, out: Path, report: dict | None) -> None:
    """config.json goes last: a folder without it is not a model."""
    fg = model.config.finegates
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
    write_json(out / "config.json", add_remote_code(out, {**model.config.to_dict(), "finegates": fg}))



def load(model_dir, weights: bool = True) -> nn.Module:
    """Rebuild a compressed model at its recorded shapes and load its weights strictly (eval mode).

    `weights=False` stops at the shapes (the architecture's random initialisation): for timing a
    compressed model whose weights stayed on the machine that trained it, since CPU latency depends
    on the widths, not on the values (benchmarks/glue.py's `measure`)."""
    import transformers
    from transformers import AutoConfig

    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise CompressedModelError(f"{d}: no config.json (not a finegates model folder)")
    raw = json.loads((d / "config.json").read_text())
    fg = raw.get("finegates")
    if not fg:
        raise CompressedModelError(f"{d}: config.json has no 'finegates' field (not a compressed model)")
    config = AutoConfig.from_pretrained(d)
    model = getattr(transformers, fg["task_class"])._from_config(config)
    try:
        rebuild(model, fg)
    except CompressedModelError as e:
        raise CompressedModelError(f"{d}: {e}") from None
    if weights:
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
    """Per layer: attention module, kept query heads, kv heads, Q/K and V widths computed, MLP units."""
    out = []
    for plan in model.config.finegates["layers"]:
        lay = AttnLayout.from_dict(plan["attn"])
        stock = plan.get("attn_module") == "stock"  # stock modules compute at the original head dim
        qk, v = (lay.head_dim, lay.head_dim) if stock else (lay.qk_width(), lay.v_width())
        out.append({"attn_module": plan.get("attn_module", "compact"), "heads": len(lay.heads), "kv_heads": len(lay.groups),
                    "qk_width": qk if lay.heads else 0, "v_width": v if lay.heads else 0, "mlp_units": len(plan["mlp"])})
    return out
