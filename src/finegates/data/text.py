"""Plain text for language modelling: read (`.gz` too), tokenize, cut into training blocks.

Files are tokenized whole, without special tokens, and concatenated with an EOS token between
files; training cuts the stream into blocks of `block_size` tokens (the last partial block is
dropped).

Tokenized corpora (WikiText-2's `wiki.*.tokens`, Mikolov's PTB) replace rare words by the
placeholder `<unk>`. A subword tokenizer has no such word: it would read `<unk>` as three ordinary
tokens and a model trained on it would learn to predict a string that held-out raw text never
contains (2.6% of the words of wiki.train.tokens). `drop_unk=True` (the LM objective's default
for training text) removes each whole-word `<unk>` with one adjacent space. Nothing else is
changed: WikiText's Moses-style spacing (" @-@ ", " , ", " . ") is kept, because the raw WikiText-2
files we evaluate on (`wiki.test.raw`) are spaced exactly so, and PTB keeps its lower case and `N`
for numbers (it is what it is; benchmarks/lm_text.py measures how far each corpus is from the test text).
"""

from __future__ import annotations

import gzip
import re
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


UNK = "<unk>"
_UNK_WORD = re.compile(r"(?<!\S)<unk>(?!\S)[ \t]?|[ \t]<unk>$", re.MULTILINE)


def drop_unk(text: str) -> str:
    """`text` without its whole-word `<unk>` placeholders, each taken with one adjacent space
    ("a <unk> b" -> "a b"); `<unk>` inside a longer word stays."""
    return _UNK_WORD.sub("", text)


def tokenize_files(paths, tokenizer, drop_unk_words: bool = False) -> torch.Tensor:
    """One token stream: each file tokenized whole, no special tokens, EOS between files."""
    return tokenize_corpus(paths, tokenizer, drop_unk_words)[0]


def tokenize_corpus(paths, tokenizer, drop_unk_words: bool = False) -> tuple[torch.Tensor, list[int]]:
    """`tokenize_files`, and the number of tokens each file gave (its EOS separator not counted)."""
    ids: list[int] = []
    counts = []
    for i, path in enumerate(paths):
        if i and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        text = read_text(path)
        part = tokenizer(drop_unk(text) if drop_unk_words else text, add_special_tokens=False, verbose=False)["input_ids"]
        ids.extend(part)
        counts.append(len(part))
    return torch.tensor(ids, dtype=torch.long), counts


def pack(ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cut a token stream into [n_blocks, block_size]; the last partial block is dropped."""
    n = ids.numel() // block_size
    if n == 0:
        raise LMDataError(f"the training text has {ids.numel()} tokens, fewer than one block of {block_size}")
    return ids[: n * block_size].view(n, block_size)


def eval_ids(path: Path, tokenizer, limit: int | None = None) -> torch.Tensor:
    ids = tokenize_files([path], tokenizer)
    return ids[:limit] if limit else ids
