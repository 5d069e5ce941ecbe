"""GLUE readers on the real files (row counts from shared/data MANIFEST.md), tiny files for the
tasks whose data is absent here, and the own-data CSV/TSV/JSONL path."""

import gzip
import json
from pathlib import Path

import pytest

from finegates.data.tasks import GLUE, DataError, UserData, glue_task, load_glue, read_glue_split

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
# (task, file) -> official row count, as listed in MANIFEST.md
COUNTS = {
    ("cola", "train.tsv"): 8551, ("cola", "dev.tsv"): 1043, ("sst2", "train.tsv"): 67349, ("sst2", "dev.tsv"): 872,
    ("mrpc", "train.tsv"): 3668, ("mrpc", "dev.tsv"): 408, ("stsb", "train.tsv"): 5749, ("stsb", "dev.tsv"): 1500,
    ("rte", "train.tsv"): 2490, ("rte", "dev.tsv"): 277, ("wnli", "train.tsv"): 635, ("wnli", "dev.tsv"): 71,
    ("qnli", "dev.tsv"): 5463, ("mnli", "dev_matched.tsv"): 9815, ("mnli", "dev_mismatched.tsv"): 9832,
    ("qqp", "train.tsv"): 363846, ("qqp", "dev.tsv"): 40430, ("qnli", "train.tsv"): 104743, ("mnli", "train.tsv"): 392702,
}


def _real(task, file):
    path = DATA / GLUE[task].dir_name / file
    return path if path.exists() or path.with_name(path.name + ".gz").exists() else None


# MNLI, QQP and QNLI's train split are not in shared/data (MANIFEST.md): their formats are tested on tiny files
PRESENT = [key for key in sorted(COUNTS) if _real(*key) is not None]


@pytest.mark.parametrize("task,file", PRESENT)
def test_real_glue_files_read_with_official_counts(task, file):
    spec = GLUE[task]
    examples = read_glue_split(spec, DATA / spec.dir_name, file)
    assert len(examples) == COUNTS[task, file]
    assert all(len(e.texts) == len(spec.text_columns) and all(isinstance(t, str) for t in e.texts) for e in examples)
    if spec.regression:
        assert all(0.0 <= e.label <= 5.0 for e in examples)
    else:
        assert {e.label for e in examples} == set(range(spec.num_labels))


def test_mrpc_bom_and_quotes_are_handled():
    if _real("mrpc", "dev.tsv") is None:
        pytest.skip("MRPC absent")
    first = read_glue_split(GLUE["mrpc"], DATA / "MRPC", "dev.tsv")[0]
    assert first.texts[0].startswith("He said the foodservice pie business")


TINY = {
    "mnli": ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
             "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label",
             ["0\t1\t1n\tgov\t(\t(\t(\t(\tA \"quoted\" premise.\tA hypothesis.\tneutral\tneutral",
              "1\t2\t2e\tgov\t(\t(\t(\t(\tAnother premise\tIt follows\tentailment\tentailment",
              "2\t3\t3c\tgov\t(\t(\t(\t(\tThird\tNot so\tcontradiction\tcontradiction"]),
    "qqp": ("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
            ["0\t1\t2\tHow are you?\tHow do you do?\t1", "1\t3\t4\tWhat is \"this\"?\tWho?\t0"]),
    "qnli": ("index\tquestion\tsentence\tlabel",
             ["0\tWhat?\tThis.\tentailment", "1\tWho?\tThat.\tnot_entailment"]),
}


@pytest.mark.parametrize("task", sorted(TINY))
def test_tiny_files_of_absent_tasks(tmp_path, task):
    header, rows = TINY[task]
    spec = GLUE[task]
    text = "\n".join([header, *rows]) + "\n"
    (tmp_path / "train.tsv").write_text(text)
    for f in spec.eval_files.values():
        with gzip.open(tmp_path / (f + ".gz"), "wt") as g:  # gzip-compressed eval files are read too
            g.write(text)
    got_spec, train, evals = load_glue(task, tmp_path)
    assert len(train) == len(rows) and set(evals) == set(spec.eval_files)
    assert train[0].texts[0] == rows[0].split("\t")[spec_index(header, spec.text_columns[0])]


def spec_index(header, column):
    return header.split("\t").index(column)


def test_mnli_has_matched_and_mismatched_eval_splits():
    assert set(GLUE["mnli"].eval_files) == {"", "mm"}
    assert glue_task("MNLI-m").name == "mnli" and glue_task("SST-2").name == "sst2"
    with pytest.raises(DataError, match="unknown task"):
        glue_task("squad")


def test_own_csv_with_string_labels(tmp_path):
    (tmp_path / "t.csv").write_text('q,a,y\n"x, with comma",b,yes\nc,d,no\ne,f,yes\n')
    (tmp_path / "e.csv").write_text("q,a,y\ng,h,no\n")
    spec, train, evals = UserData(tmp_path / "t.csv", tmp_path / "e.csv", ("q", "a"), "y").load()
    assert spec.labels == ("no", "yes") and spec.metrics == ("accuracy", "f1")
    assert train[0].texts == ("x, with comma", "b") and train[0].label == 1
    assert evals[""][0].label == 0


def test_own_jsonl_regression(tmp_path):
    lines = [json.dumps({"text": f"s{i}", "score": i / 2}) for i in range(4)]
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    spec, train, _ = UserData(tmp_path / "t.jsonl", tmp_path / "t.jsonl", ("text",), "score", regression=True).load()
    assert spec.regression and spec.metrics == ("pearson", "spearman")
    assert [e.label for e in train] == [0.0, 0.5, 1.0, 1.5]


def test_own_tsv_with_int_labels_sorts_numerically(tmp_path):
    (tmp_path / "t.tsv").write_text("text\tlabel\na\t10\nb\t2\nc\t1\n")
    spec, train, _ = UserData(tmp_path / "t.tsv", tmp_path / "t.tsv", ("text",), "label").load()
    assert spec.labels == ("1", "2", "10") and spec.metrics == ("accuracy",)
