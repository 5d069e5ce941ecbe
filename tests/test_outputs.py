"""Nothing a user made is lost (issue 25): the output rule of every writing command, and inputs the
model cannot take refused in one line before training. Each case checks that nothing of the user's
changed: the file listing and every file's bytes before and after."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import finegates.compression
import finegates.compression.saved
import finegates.training.classify
from finegates.cli import app
from finegates.data.outputs import COMPRESSED, PRETRAIN_RUN, TRAIN_RUN, OutputError, check_output
from run_helpers import make_tiny_bert, write_task


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` (and its siblings' names): folders as None, files as their bytes."""
    return {str(p.relative_to(root.parent)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.parent.rglob("*"))}


def refused(result, expected: str, code: int = 2) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert")


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> tuple[Path, Path]:
    return write_task(tmp_path_factory.mktemp("data"), n_train=16, n_eval=8)


def train_args(tiny, task, out, *extra) -> list:
    return ["train", "--out", out, "--model", tiny, "--train-file", task[0], "--eval-file", task[1],
            "--text-columns", "text", "--no-progress", "--device", "cpu", "--batch-size", "8", "--max-steps", "2",
            *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny, task) -> Path:
    out = tmp_path_factory.mktemp("runs") / "a"
    assert cli(*train_args(tiny, task, out)).exit_code == 0
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory, run) -> Path:
    out = tmp_path_factory.mktemp("models") / "small"
    assert cli("compress", run, "--out", out, "--examples", "4").exit_code == 0
    return out


# ---- the output rule ---------------------------------------------------------------------------
def test_train_twice_into_one_folder_is_refused(run, tiny, task):
    before = snapshot(run)
    refused(cli(*train_args(tiny, task, run, "--seed", "1")),
            f"{run} already holds a train run: pass --resume to continue it or --overwrite to replace it")
    assert snapshot(run) == before


@pytest.mark.parametrize("where, expected", [("run", "is the input"), ("inside", "is inside the input"),
                                             ("parent", "holds the input")])
def test_compress_never_writes_into_or_over_its_input(run, where, expected):
    out = {"run": run, "inside": run / "small", "parent": run.parent}[where]
    before = snapshot(run)
    refused(cli("compress", run, "--out", out, "--overwrite"), f"{out} {expected} {run}")
    assert snapshot(run) == before


@pytest.mark.parametrize("command", ["train", "train --overwrite", "compress", "compress --overwrite"])
def test_a_folder_of_the_users_is_never_written(tmp_path, run, tiny, task, command):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own notes")
    before = snapshot(mine)
    name, *flags = command.split()
    args = train_args(tiny, task, mine, *flags) if name == "train" else ["compress", run, "--out", mine, *flags]
    refused(cli(*args), f"{mine} is not empty and holds no finegates")
    assert snapshot(mine) == before


def test_overwrite_replaces_a_run_only_once_the_new_one_is_complete(tmp_path, run, tiny, task, monkeypatch):
    mine = tmp_path / "a"
    shutil.copytree(run, mine)
    before = snapshot(mine)

    def killed(*a, **k):
        raise KeyboardInterrupt  # a kill while the new run trains: it has written its config.json already
    monkeypatch.setattr(finegates.training.classify, "evaluate", killed)
    assert cli(*train_args(tiny, task, mine, "--seed", "1", "--overwrite")).exit_code != 0
    assert snapshot(mine) == before  # the old run, untouched; no staging folder left beside it
    monkeypatch.undo()
    assert cli(*train_args(tiny, task, mine, "--seed", "1", "--overwrite")).exit_code == 0
    config = json.loads((mine / "config.json").read_text())
    assert config["train"]["seed"] == 1 and config["train"]["out"] == str(mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"] and (mine / "metrics.json").is_file()


def test_resume_continues_only_a_run(run, tiny, task):
    assert cli("train", "--resume", run).exit_code == 0  # complete: returns its metrics, writes nothing


def test_compressed_model_appears_whole_and_is_replaced_only_with_overwrite(tmp_path, run, small, monkeypatch):
    out = tmp_path / "small"
    shutil.copytree(small, out)
    before = snapshot(out)
    refused(cli("compress", run, "--out", out), f"{out} already holds a compressed model: pass --overwrite")
    assert snapshot(out) == before

    def torn(model, tokenizer, folder, report):  # a save that dies after its first file
        (folder / finegates.compression.WEIGHTS).write_bytes(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(finegates.compression.saved, "_write_compressed", torn)
    assert isinstance(cli("compress", run, "--out", out, "--overwrite", "--examples", "4").exception, OSError)
    assert snapshot(out) == before
    monkeypatch.undo()
    new = tmp_path / "new"
    monkeypatch.setattr(finegates.compression.saved, "_write_compressed", torn)
    cli("compress", run, "--out", new, "--examples", "4")
    assert not new.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["small"]  # nothing, not half
    monkeypatch.undo()
    assert cli("compress", run, "--out", out, "--overwrite", "--examples", "4").exit_code == 0
    assert finegates.load(out) is not None and sorted(p.name for p in tmp_path.iterdir()) == ["small"]


def test_export_refuses_an_existing_file_and_its_input(tmp_path, small):
    mine = tmp_path / "m.onnx"
    mine.write_bytes(b"my own model")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    before = snapshot(mine)
    refused(cli("export", small, "--onnx", mine), f"{mine} already exists: pass --overwrite to replace it")
    refused(cli("export", small, "--onnx", notes, "--overwrite"), f"{notes} exists and is not a .onnx file")
    refused(cli("export", small, "--onnx", small / "m.onnx"), f"{small / 'm.onnx'} is inside the input {small}")
    assert snapshot(mine) == before and not (small / "m.onnx").exists()


def test_each_command_recognises_only_its_own_output(tmp_path):
    def folder(name: str, config: dict) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        return tmp_path / name

    train_run = folder("t", {"train": {"method": "gates"}})
    pretrain_run = folder("p", {"train": {"method": "pretrain-gated"}})
    model = folder("m", {"model_type": "bert", "finegates": {"layers": []}})
    assert TRAIN_RUN.owns(train_run) and not TRAIN_RUN.owns(pretrain_run) and not TRAIN_RUN.owns(model)
    assert PRETRAIN_RUN.owns(pretrain_run) and not PRETRAIN_RUN.owns(train_run)
    assert COMPRESSED.owns(model) and not COMPRESSED.owns(train_run)
    check_output(pretrain_run, PRETRAIN_RUN, resume=True)
    with pytest.raises(OutputError, match="already holds a pretrain run: pass --resume"):
        check_output(pretrain_run, PRETRAIN_RUN)
    with pytest.raises(OutputError, match="holds no finegates train run"):
        check_output(pretrain_run, TRAIN_RUN, overwrite=True)
    with pytest.raises(OutputError, match="pass --overwrite to replace it"):
        check_output(model, COMPRESSED, resume=True)  # a model is not resumed
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", COMPRESSED)
    check_output(tmp_path / "new" / "deeper", TRAIN_RUN)


# ---- inputs the model cannot take ------------------------------------------------------------------
def write_pairs(folder: Path, columns: tuple[str, str]) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.csv", 16), ("dev.csv", 8)):
        with open(folder / name, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow([*columns, "label"])
            for i in range(n):
                w.writerow(["good fine nice" if i % 2 else "bad dull poor", "a second text", i % 2])
    return folder / "train.csv", folder / "dev.csv"


PAIR = ("first, part", "second part")  # a comma and spaces in the names


def pair_args(model, data, out) -> list:
    return ["train", "--out", out, "--model", model, "--train-file", data[0], "--eval-file", data[1],
            "--text-column", PAIR[0], "--text-column", PAIR[1], "--no-progress", "--device", "cpu",
            "--batch-size", "8", "--max-steps", "1"]


def test_column_names_with_commas_and_spaces(tmp_path, tiny):
    data = write_pairs(tmp_path / "data", PAIR)
    assert cli(*pair_args(tiny, data, tmp_path / "run")).exit_code == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["text_columns"] == list(PAIR)
    refused(cli(*pair_args(tiny, data, tmp_path / "r2"), "--text-columns", "a,b"), "not both")


def test_token_types_the_model_lacks_are_refused_before_training(tmp_path):
    model = make_tiny_bert(tmp_path / "bert1", type_vocab_size=1)
    data = write_pairs(tmp_path / "data", PAIR)
    refused(cli(*pair_args(model, data, tmp_path / "run")),
            "token type ids up to 1 (the second text of a pair), but the model has 1 token type (type_vocab_size=1)")
    assert not (tmp_path / "run").exists()


def test_a_loaded_head_of_another_size_is_refused(tmp_path, task):
    model = make_tiny_bert(tmp_path / "head3", model_class="BertForSequenceClassification", num_labels=3)
    refused(cli(*train_args(model, task, tmp_path / "run")), "its classification head has 3 outputs, the task needs 2")
    assert not (tmp_path / "run").exists()


def test_positions_after_the_padding_offset_fit_the_table(tmp_path):
    """RoBERTa numbers positions from padding_idx + 1: 20 slots, pad 1 -> 18 tokens, not 20."""
    model = make_tiny_bert(tmp_path / "roberta", model_class="RobertaModel", max_position_embeddings=20,
                           pad_token_id=1, type_vocab_size=1)
    data = []
    for name in ("train.csv", "dev.csv"):  # 60 words: longer than the table
        (tmp_path / name).write_text("text,label\n" + "".join(f"{'good ' * 60},{i % 2}\n" for i in range(8)))
        data.append(tmp_path / name)
    result = cli(*train_args(model, data, tmp_path / "run"))
    assert result.exit_code == 0, (result.output, result.exception)
