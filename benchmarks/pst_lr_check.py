"""PST at the GLUE grid's learning rate and at the authors' (BENCHMARKS.md, the PST row): the same
100 STS-B steps on the CPU at lr 5e-4 and 3e-5, dev Pearson on the first 300 dev pairs.

    python -m benchmarks.pst_lr_check --data ../shared/data/glue/STS-B --model .carry/minilm

Writes benchmarks/results/pst_lr_check.{json,md} (the committed one came from this command line
run by hand at commit 4011ec5; this script runs exactly that command for each lr).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.report import git_commit, write_results
from benchmarks.runner import job_env

LRS = {"lr 5e-4 (the GLUE grid's)": 5e-4, "lr 3e-5 (the authors', our default)": 3e-5}
COMMAND = ("finegates train --method pst --task stsb --data-dir {data} --train-limit 1600 --eval-limit 300 "
           "--epochs 1 --lr LR --model {model} --out RUN --no-progress")


def run(lr: float, data: str, model: str, out: Path) -> dict:
    args = COMMAND.format(data=data, model=model).replace("LR", str(lr)).replace("RUN", str(out)).split()[1:]
    subprocess.run([sys.executable, "-m", "finegates.cli", *args], check=True, env=job_env())
    m = json.loads((out / "metrics.json").read_text())
    return {"lr": lr, "steps": m["steps"], "dev": m["dev"], "train_limit": 1600, "eval_limit": 300,
            "target_sparsity": 0.4, "unstructured_sparsity": m.get("unstructured_sparsity"), "device": m["device"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/glue/STS-B")
    p.add_argument("--model", default="minilm")
    p.add_argument("--json", default="benchmarks/results/pst_lr_check.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: run(lr, args.data, args.model, Path(tmp) / f"lr{lr}") for name, lr in LRS.items()}
    meta = {"commit": git_commit(), "machine": platform.platform(), "command": COMMAND.format(data=args.data, model=args.model),
            "why": "the GLUE grid gave PST lrs 5e-4 / 1e-3 and it never learned; same 100 steps at both lrs"}
    lines = ["# PST learning-rate check (CPU, STS-B, 100 steps, sparsity ramped to 0.4)", "",
             f"Commit `{meta['commit'][:12]}`; `{meta['command']}`.", "", "| lr | dev Pearson (first 300) |", "|---|---:|"]
    lines += [f"| {name} | {r['dev']['pearson']:.3f} |" for name, r in runs.items()]
    write_results(args.json, meta, runs, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
