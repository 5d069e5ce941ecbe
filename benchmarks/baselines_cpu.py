"""Every training method on real MRPC and RTE with MiniLM, on CPU, short budget: one table.

    # train (CPU; N runs in parallel, one thread each) and time PST's merged model against dense:
    python -m benchmarks.baselines_cpu run --out runs/baselines --glue /work/shared/data/glue --parallel 14
    # the table, from the run directories (gates and magnitude runs are compressed and timed here):
    python -m benchmarks.baselines_cpu report --runs runs/baselines

Writes benchmarks/results/baselines_cpu.json and .md. The budget is short on purpose (the full
table with tuned learning rates is benchmarks/glue.py's): each method gets the same epochs, batch
and max length, at its own default learning rate.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from benchmarks.report import git_commit, write_results

METHODS = ("gates", "magnitude", "full", "lora", "bitfit", "pst", "gmp")
TASKS = {"mrpc": "MRPC", "rte": "RTE"}
MAIN = {"mrpc": "accuracy", "rte": "accuracy"}
BUDGET = {"epochs": 1, "batch_size": 16, "max_length": 128, "eval_batch_size": 64, "sparsity": 0.4}
BENCH = {"threads": 2, "batch": 8, "seq": 128, "runs": 20, "warmup": 3, "memory": False}


def jobs(out: Path, glue: Path, model: str | None) -> list[dict]:
    return [{"out": str(out / m / t), "model": model, "task": t, "data_dir": str(glue / d), "method": m,
             "device": "cpu", "progress": False, "seed": 0, **BUDGET, "_cost": {"gmp": 3, "pst": 2, "full": 2}.get(m, 1)}
            for m in METHODS for t, d in TASKS.items()]


def cmd_run(args) -> None:
    from benchmarks.runner import run_grid

    print(json.dumps(run_grid(jobs(Path(args.out), Path(args.glue), args.model), args.parallel, args.deadline,
                              Path(args.out) / "_logs"), indent=2))
    bench_pst(Path(args.out))


def bench_pst(out: Path) -> None:
    """PST's merged model is dense-shaped with zeros: time it against the dense model it came from."""
    import torch

    from finegates.bench.latency import BenchConfig, bench

    torch.set_num_threads(BENCH["threads"])
    for task in TASKS:
        run = out / "pst" / task
        if (run / "metrics.json").is_file():
            location = json.loads((run / "config.json").read_text())["model_location"]
            result = bench(run, location, BenchConfig(**BENCH))
            (run / "bench_vs_dense.json").write_text(json.dumps(result, indent=1))
            print(f"pst {task}: latency ratio {result['latency_ratio']:.3f} (dense {result['latency_ms_dense']:.0f} ms)")


def _compress_and_time(run: Path) -> dict:
    from benchmarks.runner import compress_into_run
    from finegates.bench.latency import BenchConfig, bench

    small = run / "compressed"
    report = compress_into_run(run, limit=None)
    timing = bench(small, run, BenchConfig(**BENCH))
    return {"layer_params_removed": report["layer_params_removed_fraction"], "max_abs_diff": report["max_abs_diff"],
            "latency_ratio": timing["latency_ratio"], "latency_ms_dense": timing["latency_ms_dense"],
            "latency_ms_compressed": timing["latency_ms_compressed"], "latency_machine": "report machine (see meta)"}


def collect(runs: Path) -> list[dict]:
    rows = []
    for method in METHODS:
        for task in TASKS:
            run = runs / method / task
            if not (run / "metrics.json").is_file():
                rows.append({"method": method, "task": task, "complete": False})
                continue
            m = json.loads((run / "metrics.json").read_text())
            row = {"method": method, "task": task, "complete": True, "dev": m["dev"], "score": m["dev"][MAIN[task]],
                   "trainable_params": m["trainable_params"], "gate_params": m.get("gate_params"),
                   "steps": m["steps"], "seconds_per_step": m["seconds_per_step"],
                   "peak_memory_mb": m["peak_memory_mb"], "train_device": m["device"],
                   "unstructured_sparsity": m.get("unstructured_sparsity"),
                   "removable_fraction": m.get("removable_fraction")}
            if method in ("gates", "magnitude"):
                row.update(_compress_and_time(run))
            bench_file = run / "bench_vs_dense.json"
            if bench_file.is_file():
                b = json.loads(bench_file.read_text())
                row.update(latency_ratio=b["latency_ratio"], latency_ms_dense=b["latency_ms_dense"],
                           latency_ms_compressed=b["latency_ms_compressed"], latency_machine="training machine (CPU)")
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| method | task | dev acc | trainable params | sparsity (kind) | CPU latency vs dense | "
             "peak train RSS (MB) | s/step |", "|---|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        if not r["complete"]:
            lines.append(f"| {r['method']} | {r['task']} | not run | | | | | |")
            continue
        if r.get("layer_params_removed") is not None:
            sparsity = f"{100 * r['layer_params_removed']:.0f}% of layer params physically removed"
        elif r.get("unstructured_sparsity") is not None:
            sparsity = f"{100 * r['unstructured_sparsity']:.0f}% of block weights zero (unstructured)"
        else:
            sparsity = "dense"
        latency = f"{r['latency_ratio']:.2f}" if r.get("latency_ratio") else "not timed (dense shapes)"
        lines.append(f"| {r['method']} | {r['task']} | {100 * r['score']:.1f} | {r['trainable_params']:,} | {sparsity} | "
                     f"{latency} | {r['peak_memory_mb']:.0f} | {r['seconds_per_step']:.2f} |")
    return "\n".join(lines)


def cmd_report(args) -> None:
    import torch

    from finegates.bench.latency import machine_info

    torch.set_num_threads(BENCH["threads"])
    rows = collect(Path(args.runs))
    commit = git_commit()
    meta = {"commit": commit, "report_machine": machine_info(), "platform": platform.platform(), "budget": BUDGET,
            "bench": BENCH, "note": args.note}
    md = table(rows)
    write_results(args.results, meta, rows,
        f"# Every method on MRPC and RTE, MiniLM-L6, CPU, short budget\n\n{args.note}\n\n"
        f"Budget for every method: {BUDGET}; each at its default learning rate. Commit `{commit[:12]}`.\n"
        f"Latency: PyTorch fp32, {BENCH['threads']} threads, batch {BENCH['batch']} x {BENCH['seq']} tokens, median "
        f"of {BENCH['runs']} runs. Peak train RSS is the training process's maximum resident set (CPU).\n\n{md}\n")
    print(md)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", default="runs/baselines")
    r.add_argument("--glue", default="/work/shared/data/glue")
    r.add_argument("--model", default=None, help="model folder (default: the embedded MiniLM)")
    r.add_argument("--parallel", type=int, default=2)
    r.add_argument("--deadline", type=float, default=1e9)
    r.set_defaults(fn=cmd_run)
    s = sub.add_parser("report")
    s.add_argument("--runs", default="runs/baselines")
    s.add_argument("--results", default="benchmarks/results/baselines_cpu.json")
    s.add_argument("--note", default="")
    s.set_defaults(fn=cmd_report)
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
