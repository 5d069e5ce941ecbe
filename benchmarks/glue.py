"""The GLUE benchmark: FineGates vs every baseline on MiniLM-L6, methods x tasks x seeds x lr grid.

    # 1. train, on the GPU (device tool; carry .carry from ../shared/tools/pack-for-device), resumable:
    python -m benchmarks.glue run --config benchmarks/glue.json --out runs/glue \
        --model .carry/minilm --glue .carry/glue --parallel 12 --deadline 500
    # 2. here, on the CPU, from the run directories brought back: pick each method's lr on dev,
    #    compress what can be compressed, time dense vs compressed, write the results and the table:
    python -m benchmarks.glue report --runs runs/glue --model minilm

Writes benchmarks/results/glue.json (every run) and benchmarks/results/glue.md (the table).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
from pathlib import Path

from benchmarks.gate_study import MAIN_METRIC, TASK_DIRS

PAPER_ROBERTA = {  # METHOD.md section 4, RoBERTa-base GLUE dev (a different, larger backbone)
    "FineGates (paper)": {"cola": 65.7, "stsb": 91.0, "mrpc": 90.2, "rte": 83.4, "sst2": 94.7},
}


def build_jobs(cfg: dict, out: Path, model: str, glue: Path) -> list[dict]:
    jobs = []
    for name, m in cfg["methods"].items():
        for lr in m.get("lrs", [None]):
            for task, t in cfg["tasks"].items():
                for seed in cfg["seeds"]:
                    job = {"out": str(out / name / f"lr{lr}" / f"{task}-s{seed}"), "model": model, "task": task,
                           "data_dir": str(glue / TASK_DIRS[task]), "seed": seed, "progress": False,
                           **cfg.get("defaults", {}), **t, **{k: v for k, v in m.items() if k != "lrs"}}
                    if lr is not None:
                        job["lr"] = lr
                    job["_cost"] = job.get("epochs", 1) * {"sst2": 20, "cola": 3.4, "stsb": 2.3, "mrpc": 1.5}.get(task, 1)
                    jobs.append(job)
    return jobs


def cmd_run(args) -> None:
    from benchmarks.runner import run_grid

    cfg = json.loads(Path(args.config).read_text())
    print(json.dumps(run_grid(build_jobs(cfg, Path(args.out), args.model, Path(args.glue)),
                              args.parallel, args.deadline, Path(args.out) / "_logs"), indent=2))


def collect(runs: Path) -> list[dict]:
    rows = []
    for mfile in sorted(runs.glob("*/lr*/*/metrics.json")):
        m = json.loads(mfile.read_text())
        task = m["task"]
        rows.append({"method": mfile.parents[2].name, "lr": mfile.parents[1].name[2:], "task": task,
                     "seed": m["seed"], "run_dir": str(mfile.parent), "dev": m["dev"],
                     "score": m["dev"][MAIN_METRIC[task]], "trainable_params": m["trainable_params"],
                     "gate_params": m.get("gate_params"), "removable_fraction": m.get("removable_fraction"),
                     "unstructured_sparsity": m.get("sparsity"), "seconds_per_step": m["seconds_per_step"],
                     "peak_memory_mb": m["peak_memory_mb"], "device": m["device"]})
    return rows


def select(rows: list[dict]) -> list[dict]:
    """Each method's learning rate, chosen per task on the mean dev score over seeds."""
    chosen = []
    for method, task in sorted({(r["method"], r["task"]) for r in rows}):
        by_lr: dict[str, list[dict]] = {}
        for r in rows:
            if r["method"] == method and r["task"] == task:
                by_lr.setdefault(r["lr"], []).append(r)
        best = max(by_lr.values(), key=lambda rs: statistics.mean(r["score"] for r in rs))
        chosen.extend(best)
    return chosen


def measure(rows: list[dict], threads: int, model: str | None) -> None:
    """Compress gated runs and time them against the dense model (CPU), in place."""
    from finegates.bench import BenchConfig, bench
    from finegates.compress import compress_run

    for r in rows:
        cfg = json.loads((Path(r["run_dir"]) / "config.json").read_text())
        if (cfg.get("method_config") or {}).get("rebuild", "gates") != "gates" and r["method"] not in ("gates",):
            r.update(layer_params_removed_fraction=0.0, latency_ratio=1.0, latency_note="dense weights: no structural removal")
            continue
        out = Path(r["run_dir"]) / "compressed"
        report = compress_run(r["run_dir"], out, limit=64)
        timing = bench(out, r["run_dir"], BenchConfig(threads=threads, runs=10, warmup=2, memory=False))
        r.update(layer_params_removed_fraction=report["layer_params_removed_fraction"],
                 max_abs_diff=report["max_abs_diff"], latency_ratio=timing["latency_ratio"])


def table(rows: list[dict]) -> str:
    tasks = [t for t in TASK_DIRS if any(r["task"] == t for r in rows)]
    lines = ["| method | trainable params | " + " | ".join(tasks) + " | avg | layer params removed | CPU latency ratio |",
             "|---" * (len(tasks) + 5) + "|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        scores = [100 * statistics.mean(r["score"] for r in rs if r["task"] == t) for t in tasks]
        removed = statistics.mean(r.get("layer_params_removed_fraction", 0.0) for r in rs)
        ratio = statistics.mean(r.get("latency_ratio", 1.0) for r in rs)
        lines.append(f"| {method} | {rs[0]['trainable_params']:,} | " + " | ".join(f"{s:.1f}" for s in scores)
                     + f" | {statistics.mean(scores):.1f} | {100 * removed:.0f}% | {ratio:.2f} |")
    return "\n".join(lines)


def cmd_report(args) -> None:
    rows = collect(Path(args.runs))
    chosen = select(rows)
    if args.measure:
        measure(chosen, args.threads, args.model)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"commit": commit, "report_machine": platform.platform(), "paper_reference_roberta_base": PAPER_ROBERTA}
    Path(args.results).write_text(json.dumps({"meta": meta, "runs": rows, "chosen": chosen}, indent=1) + "\n")
    md = table(chosen)
    Path(args.results).with_suffix(".md").write_text(f"<!-- {meta['commit']} -->\n{md}\n")
    print(md)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--config", default="benchmarks/glue.json")
    r.add_argument("--out", default="runs/glue")
    r.add_argument("--model", default=None)
    r.add_argument("--glue", default="/work/shared/data/glue")
    r.add_argument("--parallel", type=int, default=4)
    r.add_argument("--deadline", type=float, default=1e9)
    r.set_defaults(fn=cmd_run)
    s = sub.add_parser("report")
    s.add_argument("--runs", default="runs/glue")
    s.add_argument("--results", default="benchmarks/results/glue.json")
    s.add_argument("--model", default=None)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--measure", action=argparse.BooleanOptionalAction, default=True)
    s.set_defaults(fn=cmd_report)
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
