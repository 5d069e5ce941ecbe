"""Data-parallel scaling: SST-2 on 1 vs 2 GPUs at the same global batch, per model and method.

    # on a 2-GPU machine (device tool, kind nvidia-h200-x2), data + models in .carry/:
    python -m benchmarks.multi_gpu run --glue .carry/glue --out runs/mgpu \
        --model minilm --model .carry/all-mpnet-base-v2 --model smollm2
    # here, from the run directories brought back:
    python -m benchmarks.multi_gpu report --runs runs/mgpu --device "nvidia-h200-x2 (...)"

Methods: the frozen-weight recipe (`fast`), `finetune` (the default gate recipe), LoRA and full
finetuning. `--model` takes what `finegates train --model` takes (a folder, `minilm`, `smollm2`, or
`mpnet` where finegates knows that name); a row's `model` is that name or the folder's name. The
2-GPU runs are `accelerate launch --multi_gpu --num_processes 2 -m finegates.cli train ...`, exactly
the command the README documents. A run folder that is complete is skipped, one killed part-way is
resumed (`--resume`), so the grid can be run again after the 10-minute command limit.
Writes benchmarks/results/multi_gpu.{json,md}: per row `model`, `method`, `gpus`,
`samples_per_second`, the peak GPU memory of each process, and the dev accuracy.
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

METHODS = {  # row label -> `finegates train` options
    "fast": ["--method", "gates", "--recipe", "fast"],
    "finetune": ["--method", "gates", "--recipe", "finetune"],
    "lora": ["--method", "lora"],
    "full": ["--method", "full"],
}
TRAIN = ["--task", "sst2", "--epochs", "1", "--max-length", "64", "--seed", "0", "--no-progress"]
LAUNCH_2 = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no"]


def model_name(model: str) -> str:
    """The row label of a `--model` value: a name as given, a folder by its own name."""
    return Path(model).name if "/" in model else model


def run_dir(runs: Path, model: str, method: str, batch: int, gpus: int) -> Path:
    return runs / f"{model_name(model)}__{method}__b{batch}__g{gpus}"


def command(model: str, method: str, batch: int, gpus: int, out: Path, args) -> list[str]:
    """The `finegates train` command of one run: resumed where a killed run left a checkpoint."""
    launcher = [sys.executable, *(LAUNCH_2 if gpus == 2 else []), "-m", "finegates.cli", "train"]
    if (out / "config.json").is_file():
        return [*launcher, "--resume", str(out)]
    limit = ["--max-steps", str(args.max_steps)] if args.max_steps else []
    return [*launcher, *METHODS[method], "--batch-size", str(batch), "--model", model,
            "--data-dir", str(Path(args.glue) / "SST-2"), "--out", str(out), *TRAIN, *limit]


def cmd_run(args) -> None:
    env = job_env(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    for model in args.model:
        for method in args.methods.split(","):
            for gpus in (1, 2):
                out = run_dir(Path(args.out), model, method, args.batch, gpus)
                if (out / "metrics.json").is_file():
                    continue
                t0 = time.time()
                proc = subprocess.run(command(model, method, args.batch, gpus, out, args), env=env,
                                      capture_output=True, text=True)
                print(f"{out.name}: exit {proc.returncode} in {time.time() - t0:.0f} s", flush=True)
                if proc.returncode:
                    print(proc.stderr[-2000:], flush=True)


def collect(runs: Path) -> list[dict]:
    rows = []
    for f in sorted(runs.glob("*__*__b*__g*/metrics.json")):
        model, method, batch, gpus = f.parent.name.split("__")
        m = json.loads(f.read_text())
        rows.append({"model": model, "method": method, "global_batch": int(batch[1:]), "gpus": int(gpus[1:]),
                     "processes": m["processes"], "samples_per_second": m["samples_per_second"],
                     "seconds_per_step": m["seconds_per_step"], "steps": m["steps"],
                     "accuracy": m["dev"]["accuracy"], "removable_fraction": m.get("removable_fraction"),
                     "peak_memory_mb_per_gpu": m.get("peak_memory_mb_per_process", [m["peak_memory_mb"]]),
                     "trainable_params": m["trainable_params"]})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | method | global batch | GPUs | samples/s | speed-up | peak MB per GPU | dev acc | "
             "layer params removed |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    one = {(r["model"], r["method"], r["global_batch"]): r["samples_per_second"] for r in rows if r["gpus"] == 1}
    for r in rows:
        base = one.get((r["model"], r["method"], r["global_batch"]))
        speed = f"{r['samples_per_second'] / base:.2f}x" if base else "-"
        removed = f"{100 * r['removable_fraction']:.0f}%" if r["removable_fraction"] is not None else "-"
        memory = " / ".join(f"{mb:.0f}" for mb in r["peak_memory_mb_per_gpu"])
        lines.append(f"| {r['model']} | {r['method']} | {r['global_batch']} | {r['gpus']} | "
                     f"{r['samples_per_second']:.0f} | {speed} | {memory} | {100 * r['accuracy']:.1f} | {removed} |")
    return "\n".join(lines)


def cmd_report(args) -> None:
    rows = collect(Path(args.runs))
    if not rows:
        sys.exit(f"no complete runs under {args.runs}")
    commit = git_commit()
    steps = sorted({r["steps"] for r in rows})
    meta = {"commit": commit, "device": args.device, "train_args": TRAIN, "steps": steps, "note": args.note}
    md = table(rows)
    write_results(args.results, meta, rows,
        f"# Data-parallel scaling: SST-2, 1 vs 2 GPUs\n\nDevice: {args.device}. Commit `{commit[:12]}`. "
        f"SST-2 (max length 64, {', '.join(map(str, steps))} steps), seed 0, each method at its default learning "
        f"rate; the 2-GPU runs use `accelerate launch --multi_gpu --num_processes 2`, each GPU taking half of the "
        f"same global batch. samples/s counts training steps only (evaluation excluded); peak memory is "
        f"`torch.cuda.max_memory_allocated` of each process.\n\n{args.note}\n\n{md}\n")
    print(md)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", default="runs/mgpu")
    r.add_argument("--model", action="append", required=True,
                   help="Repeatable: a model folder, minilm, smollm2 (or mpnet where finegates knows it).")
    r.add_argument("--glue", required=True)
    r.add_argument("--methods", default=",".join(METHODS), help=f"Comma-separated, of {', '.join(METHODS)}.")
    r.add_argument("--batch", type=int, default=64, help="Global batch (split over the GPUs).")
    r.add_argument("--max-steps", type=int, default=300, help="Steps per run (0: one epoch, 1053 at batch 64).")
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
