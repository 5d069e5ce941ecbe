"""The GLUE benchmark's bookkeeping: which runs it schedules first and which lr it reports.

These decide what a cut-short grid still shows and whether the table is tuned fairly, so they
are tested like library code (no training here).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.glue import build_jobs, select  # noqa: E402

CFG = {
    "seeds": [0, 1, 2],
    "defaults": {"batch_size": 16},
    "tasks": {"mrpc": {"epochs": 10}, "sst2": {"epochs": 2, "seeds": [0]}},
    "methods": {
        "full": {"method": "full", "lrs": [2e-5, 5e-5]},
        "sweep": {"method": "gates", "sparsity": 0.2, "lrs": [0.01], "tasks": ["mrpc"], "seeds": [0]},
    },
}


def test_jobs_respect_task_and_method_seeds_and_tasks():
    jobs = build_jobs(CFG, Path("out"), None, Path("glue"))
    names = {j["out"] for j in jobs}
    assert "out/full/lr2e-05/sst2-s0" in names and "out/full/lr2e-05/sst2-s1" not in names
    assert "out/sweep/lr0.01/mrpc-s0" in names and "out/sweep/lr0.01/sst2-s0" not in names
    assert "out/sweep/lr0.01/mrpc-s1" not in names
    assert len(jobs) == 2 * (3 + 1) + 1
    sweep = next(j for j in jobs if j["out"] == "out/sweep/lr0.01/mrpc-s0")
    assert sweep["sparsity"] == 0.2 and sweep["lr"] == 0.01 and sweep["data_dir"] == "glue/MRPC"
    assert "lrs" not in sweep and "tasks" not in sweep and "seeds" not in sweep


def test_seed_zero_first_and_leading_lr_before_the_others():
    jobs = build_jobs(CFG, Path("out"), None, Path("glue"), leading={"full": {"mrpc": "5e-05"}})
    prio = {j["out"]: j["_priority"] for j in jobs}
    assert prio["out/full/lr5e-05/mrpc-s1"] < prio["out/full/lr2e-05/mrpc-s1"] < prio["out/full/lr5e-05/mrpc-s2"]
    assert max(p for o, p in prio.items() if o.endswith("-s0")) < min(p for o, p in prio.items() if o.endswith("-s1"))


def _row(lr: str, seed: int, score: float) -> dict:
    return {"method": "full", "task": "mrpc", "lr": lr, "seed": seed, "score": score}


def test_select_compares_lrs_on_shared_seeds_and_keeps_all_seeds_of_the_winner():
    rows = [_row("2e-05", 0, 0.80), _row("2e-05", 1, 0.80),
            _row("5e-05", 0, 0.79), _row("5e-05", 1, 0.79), _row("5e-05", 2, 0.99)]
    chosen = select(rows)  # seed 2 ran only for 5e-05: it must not decide the lr
    assert {r["lr"] for r in chosen} == {"2e-05"}
    assert len(chosen) == 2 and chosen[0]["lr_chosen_on_seeds"] == [0, 1]
    rows[0]["score"] = 0.70
    chosen = select(rows)
    assert {r["lr"] for r in chosen} == {"5e-05"} and len(chosen) == 3


@pytest.mark.parametrize("bad", [{"tasks": {"nope": {}}}])
def test_unknown_task_is_an_error(bad):
    with pytest.raises(KeyError):
        build_jobs({**CFG, **bad}, Path("out"), None, Path("glue"))


def test_teacher_jobs_wait_for_the_teachers_seed_zero_run(tmp_path):
    cfg = {**CFG, "methods": {
        "teacher": {"method": "full", "task_lrs": {"mrpc": [2e-5], "sst2": [5e-5]}, "seeds": [0]},
        "kd": {"method": "gates", "lrs": [0.01], "teacher": "teacher"},
    }}
    jobs = build_jobs(cfg, tmp_path, None, Path("glue"))
    teachers = {j["task"]: j for j in jobs if j["method"] == "full"}
    assert teachers["sst2"]["lr"] == 5e-5 and teachers["mrpc"]["lr"] == 2e-5 and len(teachers) == 2
    kd = [j for j in jobs if j["method"] == "gates"]
    assert len(kd) == 4 and all(j["teacher"] == j["_after"] == teachers[j["task"]]["out"] for j in kd)
    assert "teacher" not in teachers["mrpc"]

    from benchmarks.runner import _startable

    student = next(j for j in kd if j["task"] == "mrpc")
    assert _startable(student, [teachers["mrpc"]], []) is False  # its teacher is still to run
    assert _startable(student, [], []) is None  # the teacher failed: the student cannot run
    (Path(teachers["mrpc"]["out"]) / "metrics.json").parent.mkdir(parents=True)
    (Path(teachers["mrpc"]["out"]) / "metrics.json").write_text("{}")
    assert _startable(student, [], []) is True


def test_a_run_killed_between_training_and_compressing_is_compressed_not_retrained(tmp_path, monkeypatch):
    import json

    import finegates.compression
    import finegates.pipeline
    import finegates.training.classify
    from benchmarks.runner import _finished, run_one

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"train": {"method": "gates"}}')
    (out / "metrics.json").write_text("{}")
    job = {"out": str(out), "task": "mrpc", "data_dir": str(tmp_path), "_compress": True}
    assert _finished(job)  # only its JSON files: brought back without weights, nothing to compress here
    (out / "trainable.safetensors").write_bytes(b"")  # trained here, killed before compressing
    assert not _finished(job) and _finished({k: v for k, v in job.items() if k != "_compress"})
    calls = []
    monkeypatch.setattr(finegates.training.classify, "train", lambda cfg, resume: calls.append(("train", resume)))

    def compress(run, dest, limit, overwrite):  # finegates refuses dest inside run: the runner moves it in
        calls.append(("compress", Path(dest)))
        dest.mkdir()
        (dest / finegates.compression.WEIGHTS).write_bytes(b"")
        (dest / finegates.compression.REPORT).write_text("{}")

    monkeypatch.setattr(finegates.pipeline, "compress_run", compress)
    run_one(json.dumps(job))
    assert calls == [("train", True), ("compress", tmp_path / ".run.compressed")]  # resume: a complete run returns as is
    assert _finished(job) and not (out / "compressed" / finegates.compression.WEIGHTS).exists()


def test_report_on_a_shared_folder_keeps_the_configs_methods_with_their_recipe(tmp_path):
    import argparse
    import json

    from benchmarks.glue import cmd_report

    runs = tmp_path / "runs"
    for name, method, recipe in (("frozen", "gates", "frozen"), ("study-variant", "gates", "fast"), ("full", "full", None)):
        d = runs / name / "lr0.001" / "mrpc-s0"
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"train": {"method": method, "sparsity": 0.4}}))
        (d / "metrics.json").write_text(json.dumps({
            "task": "mrpc", "seed": 0, "dev": {"accuracy": 0.8, "f1": 0.85}, "trainable_params": 10, "total_params": 100,
            "seconds_per_step": 0.1, "peak_memory_mb": 1.0, "device": "cuda", "removable_fraction": 0.4, "recipe": recipe}))
    (tmp_path / "cfg.json").write_text(json.dumps({"methods": {"frozen": {}, "full": {}}}))
    args = argparse.Namespace(runs=str(runs), config=str(tmp_path / "cfg.json"), measure=False, threads=2,
                              results=str(tmp_path / "out" / "glue_base.json"), figures=str(tmp_path / "out" / "fig"))
    cmd_report(args)
    rows = json.loads((tmp_path / "out" / "glue_base.json").read_text())["runs"]
    assert {(r["method"], r["recipe"], r["total_params"]) for r in rows} == {("frozen", "frozen", 100), ("full", None, 100)}
    frozen = next(r for r in rows if r["method"] == "frozen")
    assert frozen["layer_params_removed_fraction"] == 0.4  # training's count until compressed


def test_run_eager_asks_it_of_every_job(tmp_path, monkeypatch):
    import argparse
    import json

    import benchmarks.runner
    from benchmarks.glue import cmd_run

    seen = []
    monkeypatch.setattr(benchmarks.runner, "run_grid", lambda jobs, *a: seen.append(jobs) or {})
    config = tmp_path / "grid.json"
    config.write_text(json.dumps(CFG))
    for eager in (False, True):
        cmd_run(argparse.Namespace(config=str(config), out=str(tmp_path / "runs"), model=None, glue=str(tmp_path),
                                   methods="full", leading=None, parallel=1, deadline=1.0, kill=None,
                                   eager=eager))
    assert seen[0] and not any("cuda_graphs" in j for j in seen[0])  # the training default: graphs on a GPU
    assert all(j["cuda_graphs"] is False for j in seen[1]) and len(seen[1]) == len(seen[0])
