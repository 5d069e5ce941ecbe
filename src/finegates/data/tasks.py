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
import zlib
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
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at offset {e.start})") from None
    return io.StringIO(text, newline="")


def read_rows(path: Path, delimiter: str, quoting: int) -> list[list[str]]:
    """All non-empty rows of a delimited file."""
    return [row for _, row in read_numbered_rows(path, delimiter, quoting)]


def read_numbered_rows(path: Path, delimiter: str, quoting: int) -> list[tuple[int, list[str]]]:
    """(line number, row) of every non-empty row. With CSV quoting on, quoting must be well formed:
    an unclosed quote would otherwise swallow every following line into one field."""
    rows, start = [], 1  # a row's number is the line it starts on (quoted fields may span lines)
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting, strict=quoting != csv.QUOTE_NONE)
        try:
            for row in reader:
                if any(c.strip() for c in row):
                    rows.append((start, row))
                start = reader.line_num + 1
        except csv.Error as e:
            why = "a quote opened on this line is never closed" if "end of data" in str(e) else str(e)
            raise DataError(
                f"{path}:{start}: malformed {'TSV' if delimiter == chr(9) else 'CSV'} ({why}); "
                "fields holding the delimiter, quotes or line breaks must be quoted, with inner quotes doubled"
            ) from None
    return rows


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
    rows: list[tuple[int, list[str]]], path: Path, header: bool, text_cols, label_col, labels
) -> list[Example]:
    head = [h.strip() for h in rows[0][1]] if header and rows else None
    body = rows[1:] if header else rows
    if not body:
        raise DataError(f"{path}: no examples")
    idx = [_column_index(head, c, path) for c in text_cols]
    lab = _column_index(head, label_col, path)
    need = max(idx + [lab])
    out = []
    for n, row in body:
        if len(row) <= need:
            raise DataError(f"{path}:{n}: row has {len(row)} fields, needs at least {need + 1}")
        out.append(Example(tuple(row[i] for i in idx), _label(row[lab].strip(), labels, path, n)))
    return out


def read_glue_split(spec: TaskSpec, data_dir: Path, file_name: str) -> list[Example]:
    path = Path(data_dir) / file_name
    rows = read_numbered_rows(path, "\t", csv.QUOTE_NONE)
    return _examples_from_rows(rows, path, spec.header, spec.text_columns, spec.label_column, spec.labels)


# ---- the user's own data ------------------------------------------------------------------
def _json_field(value, path: Path, line: int, key: str) -> str:
    """A JSONL value as text: 1 and 1.0 are the same label; lists and objects are refused."""
    if isinstance(value, (dict, list)):
        raise DataError(f"{path}:{line}: field {key!r} is a JSON {type(value).__name__}, expected text or a number")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value)


def _records(path: Path) -> tuple[list[str], list[dict], list[int]]:
    """Header, records and their line numbers of a CSV, TSV or JSONL file."""
    suffix = path.name.removesuffix(".gz").rsplit(".", 1)[-1].lower()
    if suffix == "jsonl":
        records, lines = [], []
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
                records.append({k: _json_field(v, path, n, k) for k, v in obj.items()})
                lines.append(n)
        if not records:
            raise DataError(f"{path}: no examples")
        return list(records[0]), records, lines
    if suffix not in ("csv", "tsv"):
        raise DataError(f"{path}: unsupported file type .{suffix} (use .csv, .tsv or .jsonl)")
    delimiter = "\t" if suffix == "tsv" else ","
    rows = read_numbered_rows(path, delimiter, csv.QUOTE_MINIMAL)
    if len(rows) < 2:
        raise DataError(f"{path}: no examples (a header line and at least one row are needed)")
    header = [h.strip() for h in rows[0][1]]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DataError(f"{path}:1: duplicate column name(s) {', '.join(map(repr, dupes))} in the header")
    records = []
    for n, row in rows[1:]:
        if len(row) != len(header):
            raise DataError(f"{path}:{n}: row has {len(row)} fields, the header has {len(header)}")
        records.append(dict(zip(header, row)))
    return header, records, [n for n, _ in rows[1:]]


@dataclass
class UserData:
    """Own train/eval files: `--text-columns a[,b] --label-column y [--regression]`."""

    train_file: Path
    eval_file: Path
    text_columns: tuple[str, ...]
    label_column: str
    regression: bool = False

    def load(self) -> tuple[TaskSpec, list[Example], dict[str, list[Example]]]:
        train_h, train_r, train_n = _records(Path(self.train_file))
        eval_h, eval_r, eval_n = _records(Path(self.eval_file))
        columns = (*self.text_columns, self.label_column)
        for path, header, records, lines in ((self.train_file, train_h, train_r, train_n),
                                             (self.eval_file, eval_h, eval_r, eval_n)):
            for col in columns:
                if col not in header:
                    raise DataError(f"{path}: no column {col!r} (columns: {', '.join(map(repr, header))})")
            for r, n in zip(records, lines):  # JSONL lines may each have their own keys
                missing = [c for c in columns if c not in r]
                if missing:
                    raise DataError(f"{path}:{n}: no field {missing[0]!r} on this line")
        labels = None
        if not self.regression:
            # int labels sort numerically, strings alphabetically: a stable label order
            values = {r[self.label_column].strip() for r in train_r}
            labels = tuple(sorted(values, key=lambda v: (0, int(v), "") if v.lstrip("-").isdigit() else (1, 0, v)))
            if len(labels) < 2:
                raise DataError(f"{self.train_file}: label column {self.label_column!r} has a single value {labels}")
            _refuse_numeric_target(Path(self.train_file), self.label_column, labels)
        spec = TaskSpec(
            name="custom", dir_name="", text_columns=self.text_columns, label_column=self.label_column,
            labels=labels, metrics=("pearson", "spearman") if self.regression else _class_metrics(labels),
        )

        def examples(path, records, lines):
            return [
                Example(
                    tuple(r[c] for c in self.text_columns),
                    _label(r[self.label_column].strip(), labels, Path(path), n),
                )
                for r, n in zip(records, lines)
            ]

        return spec, examples(self.train_file, train_r, train_n), {"": examples(self.eval_file, eval_r, eval_n)}


def _refuse_numeric_target(path: Path, column: str, labels: tuple[str, ...]) -> None:
    """Many distinct fractional numbers as class labels: the user forgot --regression."""
    try:
        numbers = [float(v) for v in labels]
    except ValueError:
        return
    if len(labels) > 10 and any(not x.is_integer() for x in numbers if math.isfinite(x)):
        raise DataError(
            f"{path}: label column {column!r} holds {len(labels)} distinct numbers (e.g. {labels[0]!r}): "
            "pass --regression for a numeric target"
        )


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
