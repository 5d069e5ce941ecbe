"""Plain text for language modelling: read (`.gz` too), tokenize, cut into training blocks.

Files are tokenized whole, without special tokens, and concatenated with an EOS token between
files; training cuts the stream into blocks of `block_size` tokens (the last partial block is
dropped).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import torch


class LMDataError(ValueError):
    """Text data that cannot be used; the message says which file and why."""


# ---- data ---------------------------------------------------------------------------------------
def read_text(path: Path) -> str:
    """A text file's contents (gzip if it ends in .gz); empty or unreadable files are errors."""
    path = Path(path)
    if not path.is_file():
        raise LMDataError(f"text file not found: {path}")
    try:
        raw = gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")
        with raw as f:
            text = f.read()
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise LMDataError(f"{path}: not a UTF-8 text file ({e})") from None
    if not text.strip():
        raise LMDataError(f"{path}: empty")
    return text


def tokenize_files(paths, tokenizer) -> torch.Tensor:
    """One token stream: each file tokenized whole, no special tokens, EOS between files."""
    ids: list[int] = []
    for i, path in enumerate(paths):
        if i and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        ids.extend(tokenizer(read_text(path), add_special_tokens=False, verbose=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def pack(ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cut a token stream into [n_blocks, block_size]; the last partial block is dropped."""
    n = ids.numel() // block_size
    if n == 0:
        raise LMDataError(f"the training text has {ids.numel()} tokens, fewer than one block of {block_size}")
    return ids[: n * block_size].view(n, block_size)


def eval_ids(path: Path, tokenizer, limit: int | None = None) -> torch.Tensor:
    ids = tokenize_files([path], tokenizer)
    return ids[:limit] if limit else ids
