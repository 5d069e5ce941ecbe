"""Data-parallel scaling: SST-2 with MiniLM on 1 vs 2 GPUs at the same global batch.

    # on a 2-GPU machine (device tool, kind nvidia-h100-x2 / nvidia-h200-x2), data + model in .carry/:
    python -m benchmarks.multi_gpu run --model .carry/minilm --glue .carry/glue --out runs/mgpu
    # here, from the run directories brought back:
    python -m benchmarks.multi_gpu report --runs runs/mgpu

The 2-GPU runs are `accelerate launch --multi_gpu --num_processes 2 -m finegates.cli train ...`,
exactly the command the README documents. Writes benchmarks/results/multi_gpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.report import git_commit, write_results
from benchmarks.runner import job_env

CASES = (("gates", 64), ("lora", 64), ("full", 64), ("gates", 256), ("full", 256))
TRAIN = ["--task", "sst2", "--epochs", "1", "--max-length", "64", "--seed", "0",
         "--no-progress"]
LAUNCH_2 = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no"]


def cmd_run(args) -> None:
    env = job_env(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    for method, batch in CASES:
        for gpus in (1, 2):
            out = Path(args.out) / f"{method}-b{batch}-g{gpus}"
            if (out / "metrics.json").is_file():
                continue
            launcher = [sys.executable, *(LAUNCH_2 if gpus == 2 else [])]
            cmd = [*launcher, "-m", "finegates.cli", "train", "--method", method, "--batch-size", str(batch),
                   "--model", args.model, "--data-dir", str(Path(args.glue) / "SST-2"), "--out", str(out), *TRAIN]
            t0 = time.time()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            print(f"{out.name}: exit {proc.returncode} in {time.time() - t0:.0f} s", flush=True)
            if proc.returncode:
                print(proc.stderr[-2000:], flush=True)


def collect(runs: Path) -> list[dict]:
    rows = []
    for method, batch in CASES:
        for gpus in (1, 2):
            f = runs / f"{method}-b{batch}-g{gpus}" / "metrics.json"
            if not f.is_file():
                continue
            m = json.loads(f.read_text())
            rows.append({"method": method, "global_batch": batch, "gpus": gpus, "processes": m["processes"],
                         "samples_per_second": m["samples_per_second"], "seconds_per_step": m["seconds_per_step"],
                         "steps": m["steps"], "accuracy": m["dev"]["accuracy"],
                         "removable_fraction": m.get("removable_fraction"), "peak_memory_mb": m["peak_memory_mb"]})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| method | global batch | GPUs | samples/s | speed-up | dev acc | layer params removed |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    one = {(r["method"], r["global_batch"]): r["samples_per_second"] for r in rows if r["gpus"] == 1}
    for r in rows:
        base = one.get((r["method"], r["global_batch"]))
        speed = f"{r['samples_per_second'] / base:.2f}x" if base else "-"
        removed = f"{100 * r['removable_fraction']:.0f}%" if r["removable_fraction"] is not None else "-"
        lines.append(f"| {r['method']} | {r['global_batch']} | {r['gpus']} | {r['samples_per_second']:.0f} | {speed} | "
                     f"{100 * r['accuracy']:.1f} | {removed} |")
    return "\n".join(lines)


def cmd_report(args) -> None:
    rows = collect(Path(args.runs))
    commit = git_commit()
    meta = {"commit": commit, "device": args.device, "train_args": TRAIN, "note": args.note}
    md = table(rows)
    write_results(args.results, meta, rows,
        f"# Data-parallel scaling: SST-2, MiniLM-L6, 1 vs 2 GPUs\n\nDevice: {args.device}. Commit `{commit[:12]}`. "
        f"One epoch of SST-2 (max length 64), seed 0, each method at its default learning rate; the 2-GPU runs use "
        f"`accelerate launch --multi_gpu --num_processes 2`, each GPU taking half of the same global batch. "
        f"samples/s counts training steps only (evaluation excluded).\n\n{args.note}\n\n{md}\n")
    print(md)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", default="runs/mgpu")
    r.add_argument("--model", required=True)
    r.add_argument("--glue", required=True)
    r.set_defaults(fn=cmd_run)
    s = sub.add_parser("report")
    s.add_argument("--runs", default="runs/mgpu")
    s.add_argument("--results", default="benchmarks/results/multi_gpu.json")
    s.add_argument("--device", default="")
    s.add_argument("--note", default="")
    s.set_defaults(fn=cmd_report)
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
