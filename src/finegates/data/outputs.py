"""Where a command may write: one rule for every output folder or file, so nothing a user made is lost.

    with output_folder(out, TRAIN_RUN, inputs=[data_dir], resume=False, overwrite=False) as folder:
        ...write into `folder`...

The target must be new or empty, or hold this command's own earlier output that the user is
resuming (`--resume`) or replacing (`--overwrite`). It is never an input, nor inside one, nor a
folder holding one: `compress runs/a --out runs/a` would turn the run into a model folder, and
`--overwrite` of a parent would delete the input. A refusal is one line naming the folder and the
flag that would allow it, raised before anything is written.

Outputs appear whole or not at all: a folder that cannot be resumed (a compressed model) is
written beside the target and renamed into place once complete; an `--overwrite` likewise
replaces the old output only after the new one is complete. A run written to a new folder is
written in place instead, because a killed run must stay resumable there (its metrics.json,
written last, marks it complete; every file in it is written atomically, files.py).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..core.distributed import Processes, barrier


class OutputError(ValueError):
    """The target of a command's output may not be written; the message says which flag allows it."""


def _config(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _is_run(folder: Path, pretrain: bool) -> bool:
    """A finegates run folder (config.json with a 'train' section), made by `pretrain` or not."""
    train = _config(folder).get("train")
    return isinstance(train, dict) and str(train.get("method", "")).startswith("pretrain-") == pretrain


@dataclass(frozen=True)
class Kind:
    """What one command writes, and how to recognise its own earlier output in a folder."""

    what: str                           # "train run": named in refusals
    owns: Callable[[Path], bool]        # does this folder hold such an output?
    resumable: bool = False             # a run: written in place, so a killed run can go on


TRAIN_RUN = Kind("train run", lambda p: _is_run(p, pretrain=False), resumable=True)
PRETRAIN_RUN = Kind("pretrain run", lambda p: _is_run(p, pretrain=True), resumable=True)
COMPRESSED = Kind("compressed model", lambda p: isinstance(_config(p).get("finegates"), dict))  # compression/saved.py


def _overlap(target: Path, inputs: Iterable) -> str | None:
    """How `target` collides with an input path (None: it does not)."""
    t = target.resolve()
    for item in inputs:
        if item is None or not Path(item).exists():
            continue  # hub ids, absent options
        p = Path(item).resolve()
        if t == p:
            return f"is the input {item}"
        if p in t.parents:
            return f"is inside the input {item}"
        if t in p.parents:
            return f"holds the input {item}"
    return None


def check_output(target, kind: Kind, *, inputs: Iterable = (), resume: bool = False, overwrite: bool = False) -> None:
    """Raise OutputError (one line, nothing written) unless `kind` may be written to `target`."""
    target = Path(target)
    clash = _overlap(target, inputs)
    if clash:
        raise OutputError(f"{target} {clash}: write the output to another folder")
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir():
        raise OutputError(f"{target} exists and is not a folder: choose a new or empty folder")
    if not any(target.iterdir()):
        return
    if not kind.owns(target):
        raise OutputError(f"{target} is not empty and holds no finegates {kind.what}: choose a new or empty "
                          "folder (finegates never mixes its files with yours)")
    if (resume and kind.resumable) or overwrite:
        return
    flags = "--resume to continue it or --overwrite to replace it" if kind.resumable else "--overwrite to replace it"
    raise OutputError(f"{target} already holds a {kind.what}: pass {flags}")


def _staging(target: Path) -> Path:
    """The folder beside `target` a new output is written into (hidden, named after the target,
    the same for every training process)."""
    return target.parent / f".{target.name}.partial"


@contextmanager
def output_folder(target, kind: Kind, *, inputs: Iterable = (), resume: bool = False, overwrite: bool = False,
                  procs: Processes = Processes()) -> Iterator[Path]:
    """Check `target` (check_output), then yield the folder to write into.

    A resumable kind going into a new or empty folder, or resumed, writes in place; anything else
    is written into a sibling staging folder that replaces the target only when the block ends
    without an error. With several training processes (`procs`) every one checks and decides before
    the main one, alone, touches the disk.
    """
    target = Path(target)
    check_output(target, kind, inputs=inputs, resume=resume, overwrite=overwrite)
    fresh = not target.exists() or (target.is_dir() and not any(target.iterdir()))
    barrier(procs)
    main = procs.main
    if kind.resumable and (fresh or resume):
        yield target  # created by the run itself, once its inputs are checked: a refused run leaves nothing
        return
    staging = _staging(target)
    if main:
        shutil.rmtree(staging, ignore_errors=True)  # what a killed earlier attempt left
        staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if main:
        replace_folder(staging, target)


def replace_folder(new: Path, target: Path) -> None:
    """Put the complete folder `new` at `target`; an old target is removed only once `new` is there."""
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.replace(new, target)
        return
    old = target.parent / f".{target.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def check_output_file(target, *, inputs: Iterable = (), overwrite: bool = False, suffix: str = "") -> None:
    """The rule for a command that writes one file (export): new, or replaced with `--overwrite`
    when it is a file of that command's type (`suffix`); never inside or over an input. The file
    itself is written atomically (files.atomic_write)."""
    target = Path(target)
    clash = _overlap(target, inputs)
    if clash:
        raise OutputError(f"{target} {clash}: write the output to another folder")
    if not target.exists():
        return
    if not target.is_file() or not target.name.endswith(suffix):
        raise OutputError(f"{target} exists and is not a {suffix or 'output'} file: choose a new file name")
    if not overwrite:
        raise OutputError(f"{target} already exists: pass --overwrite to replace it")
