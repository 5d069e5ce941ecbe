"""Issue 20: what makes frozen-weight gates learn every GLUE task at base scale (MPNet-base).

Rounds 1-2 (benchmarks/archive/base_study1.json, base_study2.json) ran on one H200 under MPS, each config one
device command, from the bf16 MPNet-base parts (docs/gpu.md) upcast to fp32 there:

    nvidia-cuda-mps-control -d
    python -m benchmarks.glue run --config benchmarks/archive/base_study1.json --out runs/base1 \
        --model /tmp/m/mpnet --glue .gpu/glue --parallel 24 --deadline 400 --kill 515
    python -m benchmarks.glue run --config benchmarks/archive/base_study2.json --out runs/base1 ...   # same folder: round 1's runs are skipped
    # here, from the runs' JSON files brought back:
    python -m benchmarks.base_study report --runs runs/base1

Writes benchmarks/results/base_study.{json,md}: every run, each variant's mean ± sd per task (every
lr shown), and the frozen recipe against LoRA with each one's lr chosen on dev as in the GLUE grid.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

from benchmarks.glue import TASK_ORDER, collect, seeds_table, select, summarize
from benchmarks.report import git_commit, write_results


def cmd_report(args) -> None:
    rows = collect(Path(args.runs))
    for r in rows:
        r["layer_params_removed_fraction"] = r.get("removable_fraction") or 0.0  # the exact count compress deletes
    tasks = [t for t in TASK_ORDER if any(r["task"] == t for r in rows)]
    every = summarize([{**r, "method": f"{r['method']} lr {r['lr']}"} for r in rows], tasks)
    head = [r for r in select(rows) if r["method"] in ("frozen", "lora")]
    versus = summarize(head, tasks)
    meta = {"commit": git_commit(), "report_machine": platform.platform(),
            "train_device": sorted({r["device"] for r in rows}), "every_variant": every, "frozen_vs_lora": versus}
    md = (f"<!-- commit {meta['commit']} -->\n## Frozen recipe vs LoRA (lr chosen on dev; mean ± sd, seeds)\n\n"
          f"{seeds_table(versus, tasks)}\n\n"
          "| method | trainable | layer params removed |\n|---|---|---|\n"
          + "".join(f"| {ln['method']} | {ln['trainable_params'] / 1e6:.2f}M | {100 * ln['layer_params_removed']:.0f}% |\n"
                    for ln in versus)
          + f"\n## Every variant and lr (mean ± sd, seeds)\n\n{seeds_table(every, tasks)}\n")
    write_results(args.results, meta, rows, md)
    print(md)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(required=True)
    s = sub.add_parser("report")
    s.add_argument("--runs", default="runs/base1")
    s.add_argument("--results", default="benchmarks/results/base_study.json")
    s.set_defaults(fn=cmd_report)
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
