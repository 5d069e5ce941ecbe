"""Where a gate-training step spends its time, next to full finetuning, in the overhead regime.

On the GPU a MiniLM step is bound by per-op launch and host work, not FLOPs; a tiny batch on one
CPU thread imitates that regime here. Times (ms per step, mean over `--steps` after 5 warm-up
steps): forward + backward, the method's extra loss (the gates' top-k penalty), optimizer step.

    python -m benchmarks.gate_step_profile --model .carry/minilm

Writes benchmarks/results/gate_step_profile.{json,md}.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from benchmarks.report import git_commit, write_results
from benchmarks.runner import quiet


def profile(method_name: str, model_location: str, batch: int, seq: int, steps: int) -> dict:
    from finegates.training.methods.registry import get_method
    from finegates.loaders import load_classifier
    from finegates.training.config import TrainConfig

    cfg = TrainConfig(out=Path("unused"), task="mrpc", data_dir="unused", model=model_location, recipe="fast")  # as measured
    model = load_classifier(model_location, 2, False, "mean").train()
    method = get_method(method_name)
    optimizer = torch.optim.AdamW(method.prepare(model, cfg, 1000))
    x = {"input_ids": torch.randint(5, 1000, (batch, seq)), "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    y = torch.arange(batch) % 2
    t = {"forward_backward_ms": 0.0, "extra_loss_ms": 0.0, "optimizer_ms": 0.0}
    for step in range(steps + 5):
        t0 = time.perf_counter()
        out = model(**x, labels=y)
        t1 = time.perf_counter()
        extra, _ = method.extra_loss(model, 500, x, out)  # step 500 of 1000: the penalty is on
        t2 = time.perf_counter()
        optimizer.zero_grad()
        (out.loss if extra is None else out.loss + extra).backward()
        t3 = time.perf_counter()
        optimizer.step()
        method.after_step(model, step)
        t4 = time.perf_counter()
        if step >= 5:
            t["forward_backward_ms"] += (t1 - t0) + (t3 - t2)
            t["extra_loss_ms"] += t2 - t1
            t["optimizer_ms"] += t4 - t3
    return {"method": method_name, **{k: 1000 * v / steps for k, v in t.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the embedded MiniLM)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--results", default="benchmarks/results/gate_step_profile.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    quiet()
    from finegates.loaders import resolve

    location = resolve(args.model)
    rows = [profile(m, location, args.batch, args.seq, args.steps) for m in ("full", "gates")]
    lines = ["| method | forward + backward ms | extra loss (penalty) ms | optimizer ms |", "|---|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['forward_backward_ms']:.1f} | {r['extra_loss_ms']:.1f} | {r['optimizer_ms']:.1f} |"
              for r in rows]
    meta = {"commit": git_commit(), "machine": platform.platform(), "batch": args.batch, "seq": args.seq,
            "steps": args.steps, "threads": 1}
    md = (f"# Gate step vs full-finetuning step (CPU, 1 thread, batch {args.batch} x {args.seq})\n\n"
          f"Commit `{meta['commit'][:12]}`. Mean over {args.steps} steps.\n\n" + "\n".join(lines) + "\n")
    write_results(args.results, meta, rows, md)
    print(md)


if __name__ == "__main__":
    main()
