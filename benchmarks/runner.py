"""Run many small trainings concurrently (one process each), resumable, with a deadline.

Used by the GPU benchmarks: a small model leaves a big GPU mostly idle, so N processes share it.
A job whose RUN_DIR/metrics.json exists (and, with `_compress`, its compress report, or no trained
tensors to compress: a run brought back as JSON only) is skipped, so a killed or timed-out grid resumes.

    python -m benchmarks.runner one '{"out": "...", "task": "mrpc", ...}'   # one TrainConfig as JSON
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def job_env(**extra: str) -> dict:
    """The environment of a benchmark's child process: finegates from this checkout's src/ (the GPU
    machine has no install) and the `benchmarks` package importable, whatever the working dir."""
    path = [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), "TOKENIZERS_PARALLELISM": "false",
            **extra}


def quiet() -> None:
    """No transformers warnings or progress bars in a benchmark process's log."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def run_one(cfg_json: str) -> None:
    import torch

    torch.set_num_threads(1)
    quiet()
    from finegates.training.config import TrainConfig
    from finegates.training.classify import train

    from finegates.training.checkpoint import is_run_dir

    job = json.loads(cfg_json)
    compress = job.pop("_compress", False)
    cfg = TrainConfig(**job)
    # a grid killed at its deadline goes on; a run killed after training (before compressing) is not redone
    train(cfg, resume=is_run_dir(cfg.out))
    if compress:  # runs too large to bring back: check the compression here, keep only its report
        from finegates.compression.saved import WEIGHTS

        compress_into_run(cfg.out, limit=64)  # writes compressed/REPORT
        (cfg.out / "compressed" / WEIGHTS).unlink()


def compress_into_run(run: Path, limit: int | None) -> dict:
    """Compress a benchmark run into RUN/compressed, where the reports look for it. finegates never
    writes inside its input, so the model is written beside the run and moved in: both folders are
    the benchmark's own."""
    from finegates.pipeline import compress_run
    from finegates.data.outputs import replace_folder

    beside = run.parent / f".{run.name}.compressed"
    report = compress_run(run, beside, limit, overwrite=True)
    replace_folder(beside, run / "compressed")
    return report


def _finished(job: dict) -> bool:
    """Trained, and compressed where the job asks for it (a kill may fall between the two). A run
    brought to this machine without its trained tensors (only its JSON files travelled) cannot be
    compressed here: it counts as finished rather than failing again at every call."""
    from finegates.compression.saved import REPORT

    out = Path(job["out"])
    if not (out / "metrics.json").exists() or not job.get("_compress"):
        return (out / "metrics.json").exists()
    return (out / "compressed" / REPORT).exists() or not (out / "trainable.safetensors").exists()


def _startable(job: dict, todo: list[dict], running: list) -> bool | None:
    """Whether `job` may start now: True; False while the run it needs (`_after`) is still to come;
    None when that run is neither complete nor pending (it failed): the job cannot run."""
    after = job.get("_after")
    if after is None or (Path(after) / "metrics.json").exists():
        return True
    pending = {j["out"] for j in todo} | {j["out"] for _, j, *_ in running}
    return False if after in pending else None


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them ([] without CUDA)."""
    try:
        import torch
    except ImportError:
        return []
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    named = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return named[:n] if named else [str(i) for i in range(n)]


def least_loaded(gpus: list[str], busy: list[str]) -> str:
    """The GPU running the fewest of our jobs (the first such, in order)."""
    return min(gpus, key=lambda g: (busy.count(g), gpus.index(g)))


def run_grid(jobs: list[dict], parallel: int, deadline_s: float, log_dir: Path, kill_s: float | None = None,
             gpus: list[str] | None = None) -> dict:
    """Run TrainConfig dicts, `parallel` at a time, in the given order (`_cost`: longest first
    among equal `_priority`); start no new job after `deadline_s`, kill what still runs at `kill_s`
    (default: the deadline). A killed job resumes from its last checkpoint when run again. A job
    with `_after` (a run directory) waits until that run is complete, while later jobs go first.
    On a machine of several GPUs (`gpus`, default: every visible one) each job goes to the least
    loaded one (CUDA_VISIBLE_DEVICES), so `parallel` counts jobs on all of them together: one
    device allowance then buys as many runs as there are GPUs (issue 20's grid)."""
    gpus = visible_gpus() if gpus is None else gpus
    log_dir.mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if not _finished(j)]
    todo.sort(key=lambda j: (j.pop("_priority", 0), -j.pop("_cost", 1)))
    kill_s = deadline_s if kill_s is None else max(kill_s, deadline_s)
    start, running, done, failed = time.time(), [], 0, []
    env = job_env()
    while todo or running:
        while todo and len(running) < parallel and time.time() - start < deadline_s:
            ready = [(j, _startable(j, todo, running)) for j in todo]
            failed += [{"out": j["out"], "error": f"needs {j['_after']}, which failed"} for j, ok in ready if ok is None]
            todo = [j for j, ok in ready if ok is not None]
            job = next((j for j, ok in ready if ok), None)
            if job is None:
                break
            todo.remove(job)
            job = {k: v for k, v in job.items() if k != "_after"}
            name = Path(job["out"]).as_posix().replace("/", "_")
            log = open(log_dir / f"{name}.log", "w")
            gpu = least_loaded(gpus, [g for *_, g in running]) if len(gpus) > 1 else None
            proc = subprocess.Popen([sys.executable, "-m", "benchmarks.runner", "one", json.dumps(job)],
                                    stdout=log, stderr=subprocess.STDOUT,
                                    env=env if gpu is None else {**env, "CUDA_VISIBLE_DEVICES": gpu})
            running.append((proc, job, log, gpu))
        if todo and time.time() - start > deadline_s:
            failed += [{"out": j["out"], "error": "not started"} for j in todo]
            todo = []
        if time.time() - start > kill_s:
            for proc, job, log, _ in running:
                proc.kill()
                failed.append({"out": job["out"], "error": "killed at the deadline"})
            running = []
            break
        for item in list(running):
            proc, job, log, _ = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                if proc.returncode == 0:
                    done += 1
                else:
                    failed.append({"out": job["out"], "error": f"exit {proc.returncode}"})
                print(f"[{time.time() - start:6.0f}s] {'ok ' if proc.returncode == 0 else 'FAIL'} {job['out']}", flush=True)
        time.sleep(0.5)
    return {"done": done, "failed": failed, "seconds": time.time() - start}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "one":
        run_one(sys.argv[2])
    else:
        sys.exit("usage: python -m benchmarks.runner one JSON")
