"""Bad input gets one clear line, a non-zero exit code, and leaves nothing that looks like a result.

Readers (tasks.py) are fuzzed with hypothesis: whatever the bytes, they return examples or raise
`DataError`; well-formed files (quotes, delimiters, line breaks, BOM, CRLF inside the text) read
back exactly. The CLI cases run `finegates train` in-process on a tiny random BERT.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from finegates.cli import app
from finegates.data.tasks import GLUE, DataError, UserData, load_glue, read_glue_split
from run_helpers import make_tiny_bert, write_task

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---- readers: fuzzing ------------------------------------------------------------------------------
PIECES = [b"text", b"label", b"sentence", b"a b", b",", b"\t", b'"', b'""', b"\n", b"\r\n", b"\r", b"0", b"1",
          b"2", b"\xef\xbb\xbf", b"\xff", b"\xc3", b"\x00", b" ", b"{", b"}", b":", b"[", b"]", b"null", b"1.5",
          b"\xc3\xa9", b"nan"]
raw_files = st.lists(st.sampled_from(PIECES), max_size=60).map(b"".join)


def _load_own(tmp: Path, suffix: str, train: bytes, dev: bytes, regression: bool = False):
    (tmp / f"train.{suffix}").write_bytes(train)
    (tmp / f"dev.{suffix}").write_bytes(dev)
    return UserData(tmp / f"train.{suffix}", tmp / f"dev.{suffix}", ("text",), "label", regression).load()


@FUZZ
@given(train=raw_files, dev=raw_files, suffix=st.sampled_from(["csv", "tsv", "jsonl"]), regression=st.booleans())
def test_own_data_any_bytes_give_examples_or_a_data_error(tmp_path, train, dev, suffix, regression):
    try:
        spec, tr, evals = _load_own(tmp_path, suffix, train, dev, regression)
    except DataError as e:
        assert "\n" not in str(e) and str(tmp_path) in str(e)
        return
    assert tr and evals[""] and all(len(x.texts) == 1 for x in tr)
    assert all(math.isfinite(x.label) for x in tr + evals[""])


@FUZZ
@given(train=raw_files, dev=raw_files, task=st.sampled_from(["sst2", "cola", "stsb"]))
def test_glue_any_bytes_give_examples_or_a_data_error(tmp_path, train, dev, task):
    (tmp_path / "train.tsv").write_bytes(train)
    (tmp_path / "dev.tsv").write_bytes(dev)
    try:
        spec, tr, evals = load_glue(task, tmp_path)
    except DataError as e:
        assert "\n" not in str(e) and str(tmp_path) in str(e)
        return
    assert tr and evals[""]


texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
labels = st.sampled_from(["pos", "neg", "0", "1"])


@FUZZ
@given(rows=st.lists(st.tuples(texts, labels), min_size=2, max_size=8), bom=st.booleans(), crlf=st.booleans(),
       delimiter=st.sampled_from([",", "\t"]))
def test_well_formed_csv_and_tsv_read_back_exactly(tmp_path, rows, bom, crlf, delimiter):
    rows = rows + [("x", "pos"), ("y", "neg")]  # at least two classes
    buf = io.StringIO()
    # Python's writer quotes only the line terminator's characters: with "\n" a lone "\r" needs QUOTE_ALL
    w = csv.writer(buf, delimiter=delimiter, lineterminator="\r\n" if crlf else "\n",
                   quoting=csv.QUOTE_MINIMAL if crlf else csv.QUOTE_ALL)
    w.writerow(["text", "label"])
    w.writerows(rows)
    data = ("\ufeff" if bom else "") + buf.getvalue()
    suffix = "csv" if delimiter == "," else "tsv"
    spec, tr, _ = _load_own(tmp_path, suffix, data.encode(), data.encode())
    assert [x.texts[0] for x in tr] == [t for t, _ in rows]
    assert [spec.labels[x.label] for x in tr] == [lab for _, lab in rows]


@FUZZ
@given(rows=st.lists(st.tuples(texts, labels), min_size=2, max_size=8), ascii_only=st.booleans())
def test_well_formed_jsonl_reads_back_exactly(tmp_path, rows, ascii_only):
    rows = rows + [("x", "pos"), ("y", "neg")]
    data = "".join(json.dumps({"text": t, "label": lab}, ensure_ascii=ascii_only) + "\n" for t, lab in rows)
    spec, tr, _ = _load_own(tmp_path, "jsonl", data.encode(), data.encode())
    assert [x.texts[0] for x in tr] == [t for t, _ in rows]


@FUZZ
@given(rows=st.lists(st.tuples(st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\t\r\n"),
                                       min_size=1, max_size=30).filter(str.strip),
                               st.sampled_from(["0", "1"])), min_size=1, max_size=8))
def test_glue_tsv_quotes_are_text(tmp_path, rows):
    """GLUE TSVs hold quote characters that are not CSV quoting: they stay in the text."""
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows))
    got = read_glue_split(GLUE["sst2"], tmp_path, "train.tsv")
    assert [x.texts[0] for x in got] == [t for t, _ in rows]


# ---- readers: each malformed case, with the line it must report -------------------------------
GOOD = b"text,label\nnice film,1\nbad film,0\n"
CASES = {
    # name: (suffix, train bytes, expected message fragment)
    "ragged row": ("csv", b"text,label\nnice,1\nbad,0,extra\n", "train.csv:3: row has 3 fields, the header has 2"),
    "unclosed quote": ("csv", b'text,label\n"nice,1\nbad,0\n', "train.csv:2: malformed CSV (a quote opened on this line is never closed)"),
    "text after closing quote": ("csv", b'text,label\n"nice" film,1\nbad,0\n', "train.csv:2: malformed CSV"),
    "tsv with csv quoting broken": ("tsv", b'text\tlabel\n"Hi," she said\t1\nx\t0\n', "train.tsv:2: malformed TSV"),
    "non-UTF-8 byte": ("csv", b"text,label\nnice,1\nbad \xff film,0\n", "train.csv:3: not UTF-8 text (byte b'\\xff'"),
    "latin-1 file": ("csv", b"text,label\ncaf\xe9,1\nbad,0\n", "train.csv:2: not UTF-8 text"),
    "missing label column": ("csv", b"text,y\nnice,1\nbad,0\n", "no column 'label' (columns: 'text', 'y')"),
    "missing text column": ("csv", b"sentence,label\nnice,1\nbad,0\n", "no column 'text'"),
    "duplicate column": ("csv", b"text,text,label\na,b,1\nc,d,0\n", "train.csv:1: duplicate column name(s) 'text'"),
    "empty file": ("csv", b"", "train.csv: no examples"),
    "only blank lines": ("csv", b"\n\r\n\n", "train.csv: no examples"),
    "header only": ("csv", b"text,label\n", "train.csv: no examples"),
    "single class": ("csv", b"text,label\na,1\nb,1\n", "has a single value"),
    "numbers without --regression": (
        "csv", b"text,label\n" + b"".join(b"t%d,%d.5\n" % (i, i) for i in range(12)), "pass --regression"),
    "jsonl invalid json": ("jsonl", b'{"text": "a", "label": 1}\n{"text": "b", label: 0}\n', "train.jsonl:2: invalid JSON"),
    "jsonl not an object": ("jsonl", b'{"text": "a", "label": 1}\n["b", 0]\n', "train.jsonl:2: each JSONL line must be an object"),
    "jsonl field missing on a line": (
        "jsonl", b'{"text": "a", "label": 1}\n\n{"label": 0}\n', "train.jsonl:3: no field 'text' on this line"),
    "jsonl nested value": ("jsonl", b'{"text": ["a"], "label": 1}\n{"text": "b", "label": 0}\n', "field 'text' is a JSON list"),
    "unsupported extension": ("txt", b"text,label\na,1\n", "unsupported file type .txt"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_own_data(tmp_path, name):
    suffix, data, expected = CASES[name]
    with pytest.raises(DataError) as e:
        _load_own(tmp_path, suffix, data, GOOD if suffix != "jsonl" else b'{"text": "a", "label": 1}\n')
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_unseen_label_in_eval_file(tmp_path):
    with pytest.raises(DataError, match=r"dev.csv:3: label 'maybe' is not one of 0, 1"):
        _load_own(tmp_path, "csv", GOOD, b"text,label\na,1\nb,maybe\n")


@pytest.mark.parametrize("value", ["abc", "inf", "nan"])
def test_bad_regression_label(tmp_path, value):
    with pytest.raises(DataError, match=r"train.csv:3: regression label"):
        _load_own(tmp_path, "csv", f"text,label\na,0.5\nb,{value}\n".encode(), GOOD, regression=True)


def test_tolerated_variants_read_the_same(tmp_path):
    """BOM, CRLF, blank lines, trailing spaces on labels and jsonl 1.0 == 1 all give the same data."""
    plain = _load_own(tmp_path, "csv", GOOD, GOOD)[1]
    variants = [b"\xef\xbb\xbf" + GOOD, GOOD.replace(b"\n", b"\r\n"), b"\n" + GOOD.replace(b"\n", b"\n\n"),
                GOOD.replace(b",1\n", b", 1 \n")]
    for data in variants:
        assert _load_own(tmp_path, "csv", data, GOOD)[1] == plain
    jsonl = b'{"text": "nice film", "label": 1.0}\r\n{"text": "bad film", "label": 0}\n'
    assert _load_own(tmp_path, "jsonl", jsonl, jsonl)[1] == plain


def test_huge_lines(tmp_path):
    big = "word " * 400_000  # a 2 MB field
    spec, tr, _ = _load_own(tmp_path, "csv", f"text,label\n{big},1\nb,0\n".encode(), GOOD)
    assert tr[0].texts[0] == big
    spec, tr, _ = _load_own(tmp_path, "jsonl", (json.dumps({"text": big, "label": 1}) + "\n"
                                                + json.dumps({"text": "b", "label": 0})).encode(), b'{"text":"a","label":1}')
    assert tr[0].texts[0] == big


def test_glue_malformed(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nnice\t1\nno label here\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nnice\t1\n")
    with pytest.raises(DataError, match=r"train.tsv:3: row has 1 fields, needs at least 2"):
        load_glue("sst2", tmp_path)
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n\nnice\t1\n\nbad\t7\n")
    with pytest.raises(DataError, match=r"train.tsv:5: label '7' is not one of 0, 1"):
        load_glue("sst2", tmp_path)
    (tmp_path / "train.tsv").write_text("text\tlabel\nnice\t1\n")
    with pytest.raises(DataError, match=r"no column 'sentence'"):
        load_glue("sst2", tmp_path)
    (tmp_path / "train.tsv").unlink()
    (tmp_path / "train.tsv.gz").write_bytes(gzip.compress(b"sentence\tlabel\nnice\t1\n")[:20])
    with pytest.raises(DataError, match=r"train.tsv.gz: cannot read"):
        load_glue("sst2", tmp_path)
    (tmp_path / "train.tsv.gz").unlink()
    (tmp_path / "train.tsv").write_text("sentence1\tsentence2\tgold_label\na\tb\tneutral\n")
    with pytest.raises(DataError, match=r"data file not found: .*dev_matched.tsv"):
        load_glue("mnli", tmp_path)
    with pytest.raises(DataError, match=r"unknown task 'glue9'"):
        load_glue("glue9", tmp_path)
    with pytest.raises(DataError, match=r"data directory not found"):
        load_glue("sst2", tmp_path / "nope")


# ---- the CLI ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert")


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> tuple[Path, Path]:
    return write_task(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny) -> Path:
    """Model folders that are not usable, each for its own reason."""
    root = tmp_path_factory.mktemp("models")
    for name, config in {"neox": '{"model_type": "gpt_neox", "hidden_size": 32}', "garbage": "not json {",
                         "no_type": "{}", "no_weights": (tiny / "config.json").read_text(),
                         "no_tokenizer": (tiny / "config.json").read_text()}.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(config)
    (root / "no_config").mkdir()
    for f in tiny.glob("tokenizer*"):
        (root / "no_weights" / f.name).write_bytes(f.read_bytes())
    (root / "no_tokenizer" / "model.safetensors").write_bytes((tiny / "model.safetensors").read_bytes())
    (root / "truncated").mkdir()
    for f in tiny.iterdir():
        (root / "truncated" / f.name).write_bytes(f.read_bytes())
    (root / "truncated" / "model.safetensors").write_bytes((tiny / "model.safetensors").read_bytes()[:50_000])
    return root


def run_cli(args: list[str]):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def own(task, tiny, out, *extra) -> list:
    return ["train", "--out", out, "--model", tiny, "--train-file", task[0], "--eval-file", task[1],
            "--text-columns", "text", "--no-progress", "--device", "cpu", "--batch-size", "8", *extra]


def assert_refused(result, out: Path, expected: str, code: int = 2, trainable_ok: bool = False) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert not (out / "metrics.json").exists()
    assert trainable_ok or not (out / "trainable.safetensors").exists()


OPTION_CASES = {
    "sparsity above 1": (["--sparsity", "1.5"], "--sparsity must be in [0, 1), got 1.5"),
    "sparsity negative": (["--sparsity", "-0.1"], "--sparsity must be in [0, 1)"),
    "sparsity nan": (["--sparsity", "nan"], "--sparsity must be in [0, 1), got nan"),
    "lr zero": (["--lr", "0"], "--lr must be in (0, 10), got 0.0"),
    "lr huge": (["--lr", "1e6"], "--lr must be in (0, 10)"),
    "lr nan": (["--lr", "nan"], "--lr must be in (0, 10)"),
    "head lr negative": (["--head-lr", "-1"], "--head-lr must be in (0, 10)"),
    "batch size zero": (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    "batch size negative": (["--batch-size", "-4"], "--batch-size must be positive, got -4"),
    "epochs zero": (["--epochs", "0"], "--epochs must be positive and finite, got 0.0"),
    "epochs inf": (["--epochs", "inf"], "--epochs must be positive and finite, got inf"),
    "epochs nan": (["--epochs", "nan"], "--epochs must be positive and finite, got nan"),
    "max length zero": (["--max-length", "0"], "--max-length must be positive, got 0"),
    "max steps zero": (["--max-steps", "0"], "--max-steps must be at least 1, got 0"),
    "train limit negative": (["--train-limit", "-3"], "--train-limit must be at least 1, got -3"),
    "evals per epoch zero": (["--evals-per-epoch", "0"], "--evals-per-epoch must be at least 1"),
    "checkpoint every negative": (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0"),
    "lambda nan": (["--lam", "nan"], "--lam must be >= 0 and finite"),
    "device tpu": (["--device", "tpu"], "--device must be auto, cpu or cuda"),
    "three text columns": (["--text-columns", "a,b,c"], "--text-columns takes one or two columns"),
    "unknown method": (["--method", "magic"], "unknown method 'magic'"),
    "unknown recipe": (["--recipe", "magic"], "unknown recipe 'magic'"),
    "unknown regularizer": (["--regularizer", "magic"], "regularizer kind must be layer, stg or budget"),
    "missing label column": (["--label-column", "y"], "no column 'y'"),
    "unknown pooling": (["--pooling", "max"], "--pooling must be one of auto, cls, mean, got 'max'"),
    "unknown prune unit": (["--prune-units", "mlp,heads"], "units must be a non-empty subset of mlp, vo, qk"),
}


@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_cli_refuses_bad_options(tmp_path, task, tiny, name):
    extra, expected = OPTION_CASES[name]
    out = tmp_path / "run"
    assert_refused(run_cli(own(task, tiny, out, *extra)), out, expected)
    assert not out.exists()  # refused before anything was written


def test_cli_refuses_missing_data(tmp_path, task, tiny):
    out, empty = tmp_path / "run", tmp_path / "empty"  # not inside a data folder: that is refused first
    empty.mkdir()
    base = ["train", "--out", out, "--model", tiny, "--no-progress"]
    cases = [
        (["--task", "sst2", "--data-dir", tmp_path / "nope"], "data directory not found"),
        (["--task", "sst2", "--data-dir", empty], "data file not found"),
        (["--task", "glue9", "--data-dir", empty], "unknown task 'glue9'"),
        (["--task", "sst2"], "--task sst2 needs --data-dir"),
        ([], "give --task with --data-dir, or --train-file"),
        (["--train-file", tmp_path / "none.csv", "--eval-file", task[1], "--text-columns", "text"],
         "data file not found"),
        (["--train-file", task[0], "--eval-file", task[1]], "--train-file needs --eval-file and --text-columns"),
    ]
    for extra, expected in cases:
        assert_refused(run_cli(base + extra), out, expected)
        assert not out.exists()
    assert_refused(run_cli(["train", "--task", "sst2", "--data-dir", tmp_path]), out, "give --out")


@pytest.mark.parametrize("name, expected", [
    ("missing", "model folder not found"),
    ("no_config", "not a Hugging Face model folder (no config.json)"),
    ("neox", "unsupported model type 'gpt_neox'"),
    ("garbage", "config.json: not a valid model config"),
    ("no_type", "config.json: no model_type"),
    ("no_weights", "cannot load the model weights"),
    ("no_tokenizer", "no usable tokenizer"),
    ("truncated", "cannot load the model weights"),
])
def test_cli_refuses_unusable_models(tmp_path, task, models, name, expected):
    out = tmp_path / "run"
    assert_refused(run_cli(own(task, models / name, out)), out, expected)
    assert not out.exists()


def test_cli_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, task, tiny, monkeypatch):
    import torch

    from finegates.training.methods.gates import GatesMethod

    real = GatesMethod.extra_loss

    def poisoned(self, model, step, batch, outputs):
        penalty, logs = real(self, model, step, batch, outputs)
        return (penalty * float("nan") if step >= 5 else penalty), logs

    monkeypatch.setattr(GatesMethod, "extra_loss", poisoned)
    out = tmp_path / "run"
    task = write_task(tmp_path / "data")  # a copy this test may edit
    result = run_cli(own(task, tiny, out, "--epochs", "2", "--checkpoint-every", "2"))
    assert_refused(result, out, "loss is nan (task loss", code=3)
    assert "at step 5: lower --lr, or pass --skip-nonfinite" in result.stderr
    assert "the last good checkpoint (step 4) is kept" in result.stderr
    assert (out / "checkpoint" / "state.pt").is_file()
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == 4 and all(torch.isfinite(t).all() for t in state["trainable"].values())
    info = run_cli(["info", out])
    assert info.exit_code == 0 and "incomplete: training stopped after step 4" in info.output
    # resuming goes on from step 4 (and meets the same NaN); changed data is refused
    result = run_cli(["train", "--resume", out, "--no-progress"])
    assert_refused(result, out, "loss is nan", code=3)
    assert "at step 5" in result.stderr and "(step 4) is kept" in result.stderr
    original = task[0].read_text()
    task[0].write_text(original.replace("good", "fine", 1))
    assert_refused(run_cli(["train", "--resume", out]), out, "the training data changed since this checkpoint")
    task[0].write_text(original)

    # with --skip-nonfinite the same run skips those batches, counts them, and completes
    monkeypatch.setattr(GatesMethod, "extra_loss",
                        lambda self, m, step, b, o: (poisoned(self, m, step, b, o) if step in (5, 6) else real(self, m, step, b, o)))
    result = run_cli(own(task, tiny, out, "--epochs", "2", "--skip-nonfinite", "--overwrite"))
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] is True and metrics["skipped_nonfinite"] == 2
    assert not (out / "checkpoint").exists()
    info = run_cli(["info", out])
    assert "complete: 12 steps" in info.output

    # ... unless every batch is bad: then it stops, having written no NaN anywhere (and, being an
    # --overwrite, having left the complete run it was to replace as it was)
    monkeypatch.setattr(GatesMethod, "extra_loss", poisoned)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = run_cli(own(task, tiny, out, "--epochs", "3", "--skip-nonfinite", "--overwrite"))
    assert_refused(result, tmp_path / f".{out.name}.partial", "10 non-finite batches in a row: training diverged",
                   code=3)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_cli_resume_refuses_bad_run_dirs(tmp_path, task, tiny):
    out = tmp_path / "run"
    assert_refused(run_cli(["train", "--resume", out]), out, "not a run directory (no config.json)")
    result = run_cli(own(task, tiny, out, "--max-steps", "3"))
    assert result.exit_code == 0, result.output
    (out / "metrics.json").unlink()  # make it look interrupted
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    assert_refused(run_cli(["train", "--resume", out]), out, "format_version 99 is newer than this finegates reads",
                   trainable_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "state.pt").write_bytes(b"PK\x03\x04 truncated")
    assert_refused(run_cli(["train", "--resume", out]), out, "state.pt: not a readable checkpoint, truncated or corrupt",
                   trainable_ok=True)
    assert "is damaged" in run_cli(["info", out]).output


def test_unsupported_model_in_a_subprocess(tmp_path, task, models):
    """The installed entry point, not only the in-process app: one line on stderr, exit 2."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "finegates.cli", *map(str, own(task, models / "neox", out))],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "unsupported model type 'gpt_neox'" in proc.stderr
    assert not out.exists()


def test_cli_long_texts_are_cut_to_the_model_positions(tmp_path, tiny):
    """A --max-length beyond the model's position table (128 here) is capped, not a crash."""
    data = tmp_path / "long.csv"
    data.write_text("text,label\n" + " ".join(["good"] * 3000) + ",1\nbad film,0\n" * 1)
    out = tmp_path / "run"
    result = run_cli(["train", "--out", out, "--model", tiny, "--train-file", data, "--eval-file", data,
                      "--text-columns", "text", "--no-progress", "--device", "cpu", "--max-length", "1000",
                      "--max-steps", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["complete"] is True
