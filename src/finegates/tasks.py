"""Tasks and their data: the nine GLUE tasks (original TSV layout) and the user's own files.

GLUE TSVs contain quote characters that are not CSV quoting, so they are read with quoting
disabled; files may be gzip-compressed (`.tsv.gz`) and may start with a UTF-8 byte-order mark.
Every reader fails with a `DataError` naming the file, line and column at fault.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

csv.field_size_limit(10**8)


class DataError(ValueError):
    """Bad or missing task data; the message names the file and what is wrong."""


@dataclass
class Example:
    texts: tuple[str, ...]
    label: int | float


@dataclass(frozen=True)
class TaskSpec:
    """A GLUE task: files, columns (by header name, or by index for header-less files), labels."""

    name: str
    dir_name: str
    text_columns: tuple[str | int, ...]
    label_column: str | int
    labels: tuple[str, ...] | None  # None: regression
    metrics: tuple[str, ...]
    eval_files: dict[str, str] = field(default_factory=lambda: {"": "dev.tsv"})
    header: bool = True

    @property
    def regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


GLUE: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("cola", "CoLA", (3,), 1, ("0", "1"), ("mcc",), header=False),
        TaskSpec("sst2", "SST-2", ("sentence",), "label", ("0", "1"), ("accuracy",)),
        TaskSpec("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), ("accuracy", "f1")),
        TaskSpec("stsb", "STS-B", ("sentence1", "sentence2"), "score", None, ("pearson", "spearman")),
        TaskSpec("qqp", "QQP", ("question1", "question2"), "is_duplicate", ("0", "1"), ("accuracy", "f1")),
        TaskSpec(
            "mnli", "MNLI", ("sentence1", "sentence2"), "gold_label",
            ("contradiction", "entailment", "neutral"), ("accuracy",),
            eval_files={"": "dev_matched.tsv", "mm": "dev_mismatched.tsv"},
        ),
        TaskSpec("qnli", "QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"), ("accuracy",)),
        TaskSpec("rte", "RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), ("accuracy",)),
        TaskSpec("wnli", "WNLI", ("sentence1", "sentence2"), "label", ("0", "1"), ("accuracy",)),
    )
}
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli"}


def glue_task(name: str) -> TaskSpec:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in GLUE:
        raise DataError(f"unknown task {name!r}: choose one of {', '.join(GLUE)} (or use --train-file)")
    return GLUE[key]


# ---- reading files ----------------------------------------------------------------------
def _open_text(path: Path) -> io.TextIOBase:
    """Open a text file (plain or .gz), BOM stripped, with a clear error for bad bytes."""
    if not path.is_file():
        candidates = [path.with_name(path.name + ".gz")]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise DataError(f"data file not found: {path}")
        path = found
    raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
    return io.StringIO(text, newline="")


def read_rows(path: Path, delimiter: str, quoting: int) -> list[list[str]]:
    """All non-empty rows of a delimited file."""
    with _open_text(path) as f:
        return [r for r in csv.reader(f, delimiter=delimiter, quoting=quoting) if any(c.strip() for c in r)]


def _column_index(header: list[str] | None, col: str | int, path: Path) -> int:
    if isinstance(col, int):
        return col
    if header is None or col not in header:
        have = ", ".join(repr(h) for h in (header or []))
        raise DataError(f"{path}: no column {col!r} (columns: {have})")
    return header.index(col)


def _label(value: str, labels: tuple[str, ...] | None, path: Path, line: int) -> int | float:
    if labels is None:
        try:
            x = float(value)
        except ValueError:
            raise DataError(f"{path}:{line}: regression label {value!r} is not a number") from None
        if not math.isfinite(x):
            raise DataError(f"{path}:{line}: regression label {value!r} is not finite")
        return x
    if value not in labels:
        raise DataError(f"{path}:{line}: label {value!r} is not one of {', '.join(labels)}")
    return labels.index(value)


def _examples_from_rows(
    rows: list[list[str]], path: Path, header: bool, text_cols, label_col, labels
) -> list[Example]:
    head = [h.strip() for h in rows[0]] if header and rows else None
    body = rows[1:] if header else rows
    if not body:
        raise DataError(f"{path}: no examples")
    idx = [_column_index(head, c, path) for c in text_cols]
    lab = _column_index(head, label_col, path)
    need = max(idx + [lab])
    out = []
    for n, row in enumerate(body, start=2 if header else 1):
        if len(row) <= need:
            raise DataError(f"{path}:{n}: row has {len(row)} fields, needs at least {need + 1}")
        out.append(Example(tuple(row[i] for i in idx), _label(row[lab].strip(), labels, path, n)))
    return out


def read_glue_split(spec: TaskSpec, data_dir: Path, file_name: str) -> list[Example]:
    path = Path(data_dir) / file_name
    rows = read_rows(path, "\t", csv.QUOTE_NONE)
    return _examples_from_rows(rows, path, spec.header, spec.text_columns, spec.label_column, spec.labels)


# ---- the user's own data ------------------------------------------------------------------
def _records(path: Path) -> tuple[list[str], list[dict]]:
    """Header and records of a CSV, TSV or JSONL file."""
    suffix = path.name.removesuffix(".gz").rsplit(".", 1)[-1].lower()
    if suffix == "jsonl":
        records = []
        with _open_text(path) as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{n}: each JSONL line must be an object")
                records.append({k: "" if v is None else str(v) for k, v in obj.items()})
        if not records:
            raise DataError(f"{path}: no examples")
        return list(records[0]), records
    if suffix not in ("csv", "tsv"):
        raise DataError(f"{path}: unsupported file type .{suffix} (use .csv, .tsv or .jsonl)")
    delimiter = "\t" if suffix == "tsv" else ","
    rows = read_rows(path, delimiter, csv.QUOTE_MINIMAL)
    if len(rows) < 2:
        raise DataError(f"{path}: no examples (a header line and at least one row are needed)")
    header = [h.strip() for h in rows[0]]
    records = []
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path}:{n}: row has {len(row)} fields, header has {len(header)}")
        records.append(dict(zip(header, row)))
    return header, records


@dataclass
class UserData:
    """Own train/eval files: `--text-columns a[,b] --label-column y [--regression]`."""

    train_file: Path
    eval_file: Path
    text_columns: tuple[str, ...]
    label_column: str
    regression: bool = False

    def load(self) -> tuple[TaskSpec, list[Example], dict[str, list[Example]]]:
        train_h, train_r = _records(Path(self.train_file))
        eval_h, eval_r = _records(Path(self.eval_file))
        for path, header in ((self.train_file, train_h), (self.eval_file, eval_h)):
            for col in (*self.text_columns, self.label_column):
                if col not in header:
                    raise DataError(f"{path}: no column {col!r} (columns: {', '.join(map(repr, header))})")
        labels = None
        if not self.regression:
            # int labels sort numerically, strings alphabetically: a stable label order
            values = {r[self.label_column].strip() for r in train_r}
            labels = tuple(sorted(values, key=lambda v: (0, int(v), "") if v.lstrip("-").isdigit() else (1, 0, v)))
            if len(labels) < 2:
                raise DataError(f"{self.train_file}: label column {self.label_column!r} has a single value {labels}")
        spec = TaskSpec(
            name="custom", dir_name="", text_columns=self.text_columns, label_column=self.label_column,
            labels=labels, metrics=("pearson", "spearman") if self.regression else _class_metrics(labels),
        )

        def examples(path, records):
            return [
                Example(
                    tuple(r[c] for c in self.text_columns),
                    _label(r[self.label_column].strip(), labels, Path(path), n),
                )
                for n, r in enumerate(records, start=2)
            ]

        return spec, examples(self.train_file, train_r), {"": examples(self.eval_file, eval_r)}


def _class_metrics(labels: tuple[str, ...]) -> tuple[str, ...]:
    return ("accuracy", "f1") if len(labels) == 2 else ("accuracy",)


def load_glue(name: str, data_dir: Path) -> tuple[TaskSpec, list[Example], dict[str, list[Example]]]:
    """(spec, train examples, {eval split suffix: examples}) of a GLUE task directory."""
    spec = glue_task(name)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory not found: {data_dir}")
    train = read_glue_split(spec, data_dir, "train.tsv")
    evals = {suffix: read_glue_split(spec, data_dir, f) for suffix, f in spec.eval_files.items()}
    return spec, train, evals
