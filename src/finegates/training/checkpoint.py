"""A run's state on disk: the format version, the resumable checkpoint, strict loading.

RUN_DIR/checkpoint/state.pt holds all a run needs to go on bit-exactly after a kill: the
trainable tensors, the optimizer state, the method's state (the lambda controller), the step, the
remaining data order, and every random generator (python, numpy, torch CPU and CUDA, the
batch-order generator; gate noise and dropout draw from torch's global one). It is a single
file written atomically, so a kill at any moment leaves the previous checkpoint or the new one,
never a mix of both.

Loading is strict: a file of another model, of a newer `format_version`, or cut short is refused
with one line naming the file, never half-loaded.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from ..data.files import read_json, read_jsonl, save_tensors, save_torch, write_jsonl
from ..core.model import gate_state_dict, load_gate_state_dict

FORMAT_VERSION = 1  # of config.json, trainable.safetensors and checkpoint/state.pt
CHECKPOINT = Path("checkpoint") / "state.pt"


class RunError(ValueError):
    """A run directory or one of its files cannot be used; the message names the file."""


def check_version(version, path: Path) -> None:
    """Refuse files written by a newer finegates (their layout may mean something else)."""
    try:
        v = int(version)
    except (TypeError, ValueError):
        raise RunError(f"{path}: format_version {version!r} is not a number") from None
    if v > FORMAT_VERSION:
        raise RunError(
            f"{path}: format_version {v} is newer than this finegates reads ({FORMAT_VERSION}): upgrade finegates"
        )


# ---- config.json ------------------------------------------------------------------------------
def read_run_config(run_dir: Path) -> dict:
    """RUN_DIR/config.json, checked: it exists, parses, is a finegates run, and is not too new."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise RunError(f"{run_dir}: not a run directory (no config.json)")
    cfg = read_json(path, RunError)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("train"), dict):
        raise RunError(f"{path}: not a finegates run config (no 'train' section)")
    check_version(cfg.get("format_version", 1), path)
    return cfg


def is_run_dir(path: Path) -> bool:
    """A folder whose config.json is a finegates run config (a model folder's never has 'train')."""
    try:
        return isinstance(json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("train"), dict)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def run_status(run_dir: Path) -> tuple[bool, str]:
    """(complete?, one line): complete only with a metrics.json that says "complete": true."""
    run_dir = Path(run_dir)
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        metrics = None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False, f"incomplete: {run_dir / 'metrics.json'} is damaged"
    if isinstance(metrics, dict) and metrics.get("complete") is True:
        return True, f"complete: {metrics.get('steps')} steps"
    if metrics is not None:
        return False, "incomplete: metrics.json is not marked complete"
    path = run_dir / CHECKPOINT
    if not path.is_file():
        return False, "incomplete: training did not finish and wrote no checkpoint (no metrics.json)"
    try:
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]
    except Exception:  # noqa: BLE001 - any damage reads as "no usable checkpoint"
        return False, f"incomplete: training did not finish; {path} is damaged"
    return False, f"incomplete: training stopped after step {step}; continue with: finegates train --resume {run_dir}"


# ---- trained tensors --------------------------------------------------------------------------
def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the pretrained input embeddings: tells one base model from another of the
    same shape. Computed on the freshly loaded model (before any training)."""
    emb = model.get_input_embeddings().weight.detach()
    h = hashlib.sha256(f"{model.config.model_type}:{tuple(emb.shape)}".encode())
    h.update(emb.flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding NaN or inf (such tensors are never written)."""
    return [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def save_trainable(path: Path, model: nn.Module, fingerprint: str, step: int,
                   tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """trainable.safetensors: every trainable tensor (or the method's `tensors`, e.g. merged LoRA
    weights), tagged with the base model's fingerprint."""
    tensors = gate_state_dict(model) if tensors is None else tensors
    bad = nonfinite(tensors)
    if bad:  # train() checks first; this is the last line of defence: never write NaN gates
        raise ValueError(f"refusing to write {path}: tensor {bad[0]} holds NaN/inf values")
    meta = {"format": "finegates.trainable", "format_version": str(FORMAT_VERSION),
            "fingerprint": fingerprint, "model_type": model.config.model_type, "step": str(step)}
    return save_tensors(path, tensors, metadata=meta)


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a truncated or corrupt file gets a clear error."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise RunError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None
    return tensors, meta


def load_trainable(model: nn.Module, path: Path, fingerprint: str | None = None) -> dict[str, str]:
    """Load trainable.safetensors into a freshly built, gated `model`; refuse another model's file.

    `fingerprint` defaults to the model's own (right for a model not trained yet). Returns the
    file's metadata."""
    tensors, meta = read_tensors(path)
    check_version(meta.get("format_version", 1), Path(path))
    expected = fingerprint or model_fingerprint(model)
    if meta.get("fingerprint") and meta["fingerprint"] != expected:
        raise RunError(
            f"{path}: trained on another base model ({meta.get('model_type', '?')} {meta['fingerprint']}, "
            f"this one is {model.config.model_type} {expected})"
        )
    bad = nonfinite(tensors)
    if bad:
        raise RunError(f"{path}: tensor {bad[0]} holds NaN/inf values")
    try:
        load_gate_state_dict(model, tensors)
    except ValueError as e:
        raise RunError(f"{path}: {e}") from None
    return meta


# ---- random generators ------------------------------------------------------------------------
def capture_rng(generator: torch.Generator) -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the checkpoint ---------------------------------------------------------------------------
def _plain(obj):
    """Containers of python scalars and tensors only (what `torch.load(weights_only=True)` reads)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_checkpoint(run_dir: Path, *, step: int, model: nn.Module, optimizer, method, generator,
                    fingerprint: str, loop: dict) -> Path:
    """Write RUN_DIR/checkpoint/state.pt (one atomic file). `loop`: the loop's own counters."""
    state = {
        "format_version": FORMAT_VERSION, "step": step, "fingerprint": fingerprint,
        "trainable": gate_state_dict(model), "optimizer": optimizer.state_dict(),
        "method": _plain(method.state()), "loop": _plain(loop), "rng": capture_rng(generator),
    }
    return save_torch(Path(run_dir) / CHECKPOINT, state)


def read_checkpoint(run_dir: Path) -> dict | None:
    """RUN_DIR/checkpoint/state.pt, or None when there is none; a damaged file is an error."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RunError(f"{path}: not a readable checkpoint, truncated or corrupt ({first})") from None
    need = ("step", "fingerprint", "trainable", "optimizer", "method", "loop", "rng")
    missing = [k for k in need if k not in state] if isinstance(state, dict) else list(need)
    if missing:
        raise RunError(f"{path}: not a finegates checkpoint (no {', '.join(missing)})")
    check_version(state.get("format_version"), path)
    return state


def restore_checkpoint(state: dict, path: Path, *, model: nn.Module, optimizer, method, generator,
                       fingerprint: str) -> dict:
    """Put a checkpoint's state back into freshly built objects; return the loop's counters."""
    if state["fingerprint"] != fingerprint:
        raise RunError(f"{path}: written for another base model (fingerprint {state['fingerprint']}, "
                       f"this one is {fingerprint})")
    try:
        load_gate_state_dict(model, state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise RunError(f"{path}: does not match this run's model ({e})") from None
    method.load_state(state["method"])
    restore_rng(state["rng"], generator)
    return state["loop"]


def truncate_log(path: Path, step: int) -> None:
    """Drop a log's lines past `step` (and any torn line), so a resumed run repeats none."""
    if Path(path).is_file():
        write_jsonl(path, [r for r in read_jsonl(path) if isinstance(r, dict) and r.get("step", 0) <= step])
