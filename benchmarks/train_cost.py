"""What a training step costs, per method: seconds per step, samples per second, peak memory.

Each method trains alone, in its own process (the device is not shared between runs, and the CPU's
peak RSS is per process), through the project's one training loop (`finegates.training.loop.fit`, via `finegates.training.classify.train`) for
`--steps` timed steps after the loop's warm-up steps (train.WARM_STEPS, not timed), RTE, batch 16 x 128.
The loop times each step to a device synchronisation (bf16 autocast on CUDA) and records the peak:
`torch.cuda.max_memory_allocated` on a GPU, peak RSS (getrusage) on CPU. With `--rounds N` the
methods are interleaved N times and the medians reported, for a machine shared with other work.

    # this CPU (2 threads, MiniLM):
    python -m benchmarks.train_cost --glue /work/shared/data/glue --steps 30 --rounds 2 --threads 2
    # a GPU (MPNet-base from a local folder), results into OUT:
    python -m benchmarks.train_cost --glue GLUE --model MODEL_DIR --device cuda --steps 100 \\
        --results OUT/train_cost.json

Writes benchmarks/results/train_cost.json (+ .md) unless `--results` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import git_commit, write_results
from benchmarks.runner import job_env, quiet

# (method, recipe): the gate recipes, then the baselines at their defaults (LoRA: r=8 on q, v)
METHODS = (("gates", "fast"), ("gates", "frozen"), ("lora", None), ("bitfit", None), ("full", None), ("gates", "finetune"))


def run_one(job: dict, threads: int) -> None:
    """One training run in this process (the child side of `measure`)."""
    import torch

    torch.set_num_threads(threads)
    quiet()
    from finegates.training.config import TrainConfig
    from finegates.training.classify import train

    train(TrainConfig(**job))


def measure(method: str, recipe: str | None, graphs: bool, args, runs: Path, round_: int) -> dict:
    from finegates.training.loop import WARM_STEPS

    out = runs / f"{method}-{recipe or 'default'}-{'graphs' if graphs else 'eager'}-{round_}"
    job = {"out": str(out), "model": args.model, "task": "rte", "data_dir": str(Path(args.glue) / "RTE"),
           "method": method, "recipe": recipe or "finetune", "max_steps": args.steps + WARM_STEPS,
           "batch_size": args.batch_size, "max_length": args.max_length, "eval_limit": 16, "device": args.device,
           "seed": 0, "log_every": max(1, args.steps // 4), "cuda_graphs": graphs}
    t0 = time.perf_counter()
    code = subprocess.run([sys.executable, "-m", "benchmarks.train_cost", "--one", json.dumps(job),
                           "--threads", str(args.threads)], env=job_env()).returncode
    if code != 0:
        raise SystemExit(f"train_cost: {method} {recipe or ''} failed (exit {code}); its output is above")
    m = json.loads((out / "metrics.json").read_text())
    row = {"method": method, "recipe": recipe, "cuda_graphs": graphs, "graph_steps": m.get("graph_steps", 0),
           "round": round_, "device": m["device"],
           "seconds_per_step": m["steady_seconds_per_step"], "peak_memory_mb": m["peak_memory_mb"],
           "wall_seconds": time.perf_counter() - t0}
    print(f"[train_cost] round {round_} {method} {recipe or ''} {'graphs' if graphs else 'eager'}: "
          f"{row['seconds_per_step']:.4f} s/step ({row['graph_steps']} steps replayed), "
          f"peak {row['peak_memory_mb']:.0f} MB ({row['wall_seconds']:.0f} s with loading)", flush=True)
    return row


def _name(method: str, recipe: str | None) -> str:
    return f"{method}:{recipe}" if recipe else method


def summarise(rows: list[dict], chosen: list, args) -> list[dict]:
    """One row per method: medians over the rounds (the per-round values kept beside them)."""
    out = []
    for method, recipe, graphs in chosen:
        mine = [r for r in rows if (r["method"], r["recipe"], r["cuda_graphs"]) == (method, recipe, graphs)]
        sps = statistics.median(r["seconds_per_step"] for r in mine)
        out.append({"device": mine[0]["device"], "model": args.model or "minilm", "method": method,
                    "recipe": recipe, "cuda_graphs": graphs, "graph_steps": mine[0]["graph_steps"],
                    "batch_size": args.batch_size, "max_length": args.max_length,
                    "seconds_per_step": sps, "samples_per_second": args.batch_size / sps,
                    "peak_memory_mb": statistics.median(r["peak_memory_mb"] for r in mine),
                    "steps": args.steps, "rounds_seconds_per_step": [r["seconds_per_step"] for r in mine],
                    "rounds_peak_memory_mb": [r["peak_memory_mb"] for r in mine]})
    return out


def checks(summary: list[dict]) -> list[str]:
    """The issue's done-when comparisons, as measured (no verdict is written that was not measured)."""
    by = {(r["method"], r["recipe"], r["cuda_graphs"]): r for r in summary}
    pairs = [("fast / LoRA seconds per step", ("gates", "fast"), ("lora", None), "seconds_per_step"),
             ("fast / LoRA peak memory", ("gates", "fast"), ("lora", None), "peak_memory_mb"),
             ("frozen / LoRA seconds per step", ("gates", "frozen"), ("lora", None), "seconds_per_step"),
             ("frozen / LoRA peak memory", ("gates", "frozen"), ("lora", None), "peak_memory_mb"),
             ("finetune / full finetuning seconds per step", ("gates", "finetune"), ("full", None), "seconds_per_step")]
    out = []
    for text, a, b, key in pairs:  # each method in the same mode (both eager, or both replayed)
        for graphs in (False, True):
            if (*a, graphs) in by and (*b, graphs) in by:
                mode = "CUDA graphs" if graphs else "eager"
                out.append(f"{text} ({mode}): {by[(*a, graphs)][key] / by[(*b, graphs)][key]:.2f}")
    return out


def markdown(summary: list[dict], meta: dict) -> str:
    gpu = meta["device"].startswith("cuda")
    memory = "peak GPU memory (max allocated)" if gpu else "peak RSS"
    regime = "bf16 autocast" if gpu else f"{meta['threads']} threads"
    lines = [f"# Training cost per method ({summary[0]['model']}, RTE, batch {meta['batch_size']} x {meta['max_length']}, "
             f"{meta['device']})", "",
             f"Commit `{meta['commit'][:12]}`; machine: {meta['machine']}. Each method alone in its own process, "
             f"{meta['steps']} timed steps after {meta['warm_steps']} warm-up steps, "
             f"{regime}; "
             f"median of {meta['rounds']} interleaved round(s). {meta['note']}".rstrip(), "",
             f"| method | recipe | steps | seconds/step | samples/s | {memory}, MB | s/step per round |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in summary:
        rounds = ", ".join(f"{s:.3f}" for s in r["rounds_seconds_per_step"])
        mode = "CUDA graph" if r["graph_steps"] else "eager"
        lines.append(f"| {r['method']} | {r['recipe'] or ''} | {mode} | {r['seconds_per_step']:.3f} | "
                     f"{r['samples_per_second']:.1f} | "
                     f"{r['peak_memory_mb']:,.0f} | {rounds} |")
    return "\n".join(lines + ["", *(f"- {c}" for c in checks(summary))]) + "\n"


def machine(device: str) -> str:
    from finegates.bench.latency import machine_info

    info = machine_info()
    text = f"{info['cpu']} ({info['cpus']} CPUs), torch {info['torch']}"
    if device.startswith("cuda"):
        import torch

        text = f"{torch.cuda.get_device_name(0)}; {text}"
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--glue", default="/work/shared/data/glue", help="GLUE folder (with RTE/)")
    p.add_argument("--model", default=None, help="model folder or name (default: the embedded MiniLM)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--steps", type=int, default=30, help="timed steps per run")
    p.add_argument("--rounds", type=int, default=1, help="interleaved repetitions (medians reported)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--methods", default=",".join(_name(m, r) for m, r in METHODS),
                   help="comma-separated subset, e.g. gates:fast,lora (default: all)")
    p.add_argument("--cuda-graphs", choices=("on", "off", "both"), default="both",
                   help="on a GPU: steps replayed as CUDA graphs (finegates train --cuda-graphs), eager steps "
                   "(the default of finegates train), or both")
    p.add_argument("--note", default="", help="a sentence for the table's header (e.g. that the machine was shared)")
    p.add_argument("--results", default="benchmarks/results/train_cost.json", help="JSON to write (.md beside it)")
    p.add_argument("--runs", default=None, help="keep the run directories here (default: a temporary folder)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one run, in a child process
    args = p.parse_args()
    if args.one is not None:
        return run_one(json.loads(args.one), args.threads)
    from finegates.training.loop import WARM_STEPS

    modes = {"on": (True,), "off": (False,), "both": (False, True)}[args.cuda_graphs] if args.device != "cpu" else (False,)
    chosen = [(m, r, g) for m, r in METHODS if _name(m, r) in args.methods.split(",") for g in modes]
    if not chosen:
        raise SystemExit(f"train_cost: --methods names none of {', '.join(_name(m, r) for m, r in METHODS)}")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for method, recipe, graphs in chosen:
                rows.append(measure(method, recipe, graphs, args, Path(args.runs or tmp), r))
                # after every run: a command cut off by a time limit still leaves what it measured
                md = report(rows, [c for c in chosen if any((x["method"], x["recipe"], x["cuda_graphs"]) == c for x in rows)],
                            args, WARM_STEPS)
    print(md, flush=True)


def report(rows: list[dict], chosen: list, args, warm_steps: int) -> str:
    summary = summarise(rows, chosen, args)
    rounds = max(r["round"] for r in rows) + 1
    meta = {"commit": git_commit(), "machine": machine(args.device), "device": summary[0]["device"],
            "steps": args.steps, "warm_steps": warm_steps, "rounds": rounds, "threads": args.threads,
            "batch_size": args.batch_size, "max_length": args.max_length, "note": args.note, "task": "rte",
            "per_round": rows}
    md = markdown(summary, meta)
    write_results(args.results, meta, summary, md)
    return md


if __name__ == "__main__":
    main()
