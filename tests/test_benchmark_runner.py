"""The benchmark grid runner: jobs spread over the GPUs of one machine."""

import subprocess

import benchmarks.runner as runner


class _Done:
    """A child process that has already exited cleanly."""
    returncode = 0

    def poll(self):
        return 0

    def kill(self):
        pass


def _grid(tmp_path, monkeypatch, gpus, n_jobs=5, parallel=4):
    envs = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, env=None, **k: envs.append(env) or _Done())
    jobs = [{"out": str(tmp_path / f"run{i}")} for i in range(n_jobs)]
    result = runner.run_grid(jobs, parallel, deadline_s=60, log_dir=tmp_path / "logs", gpus=gpus)
    assert result["done"] == n_jobs and not result["failed"]
    return [env.get("CUDA_VISIBLE_DEVICES") for env in envs]


def test_jobs_go_to_the_least_loaded_gpu(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _grid(tmp_path, monkeypatch, ["0", "1"])[:4] == ["0", "1", "0", "1"]
    assert _grid(tmp_path, monkeypatch, ["2", "5", "7"], n_jobs=3, parallel=3) == ["2", "5", "7"]


def test_one_gpu_leaves_the_environment_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _grid(tmp_path, monkeypatch, ["0"]) == [None] * 5
    assert _grid(tmp_path, monkeypatch, []) == [None] * 5


def test_least_loaded_breaks_ties_in_order():
    assert runner.least_loaded(["0", "1", "2"], ["0", "1", "0"]) == "2"
    assert runner.least_loaded(["0", "1"], ["1"]) == "0"
