"""Where a training step's cost goes: operators per step (any device) and profiler tables (GPU).

Issue 19's tools. A small model's GPU step is bound by the host issuing operators, each costing
host time whether or not it launches a kernel, so the number of operators a step dispatches is the
quantity to cut; it is deterministic, so it can be counted on this noisy CPU.

  count   Operators per training step, per method: the outermost `aten::` operators torch.profiler
          records in a run of N2 steps minus those of a run of N1 steps, divided by N2 - N1 (so
          loading, the evaluation and the first steps cancel). Batch 2 x 16 keeps the arithmetic small;
          the operator count does not depend on it. Writes benchmarks/results/step_ops.{json,md}.
  table   torch.profiler's operator table by device time, one method at a time (eager steps, or
          replayed ones with --cuda-graphs).

    python -m benchmarks.step_profile count --model mpnet --glue GLUE
    python -m benchmarks.step_profile table --glue GLUE --model MODEL_DIR --device cuda --out DIR
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

from benchmarks.report import git_commit, write_results
from benchmarks.runner import quiet

METHODS = "gates:fast,gates:frozen,gates:finetune,lora,full,bitfit"


def _train(method: str, recipe: str | None, args, steps: int, batch: int, length: int, profile_kw: dict,
           graphs: bool = False):
    import torch
    from torch.profiler import profile

    from finegates.training.classify import train
    from finegates.training.config import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(out=Path(tmp) / "run", model=args.model, task="rte", data_dir=Path(args.glue) / "RTE",
                          method=method, recipe=recipe or "finetune", max_steps=steps, batch_size=batch,
                          max_length=length, eval_limit=4, device=args.device, seed=0, log_every=10**6,
                          trace_every=0, cuda_graphs=graphs, progress=False)
        torch.manual_seed(0)
        with profile(**profile_kw) as prof:
            train(cfg, overwrite=True)
    return prof


def _outermost(prof) -> collections.Counter:
    """aten operators not called from inside another aten operator: what Python and autograd dispatch."""
    counts = collections.Counter()
    for e in prof.events():
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")):
            counts[e.name] += 1
    return counts


def cmd_count(args) -> None:
    import torch
    from torch.profiler import ProfilerActivity

    torch.set_num_threads(args.threads)
    kw = {"activities": [ProfilerActivity.CPU]}
    rows = []
    for item in args.methods.split(","):
        method, _, recipe = item.partition(":")
        short = _outermost(_train(method, recipe or None, args, args.steps[0], 2, 16, kw))
        long = _outermost(_train(method, recipe or None, args, args.steps[1], 2, 16, kw))
        n = args.steps[1] - args.steps[0]
        per_step = {k: (long[k] - short[k]) / n for k in long if long[k] != short[k]}
        top = dict(sorted(per_step.items(), key=lambda kv: -kv[1])[:args.top])
        rows.append({"method": method, "recipe": recipe or None, "ops_per_step": sum(per_step.values()),
                     "top": top})
        print(f"[step_profile] {item}: {rows[-1]['ops_per_step']:.0f} operators per step", flush=True)
    import finegates

    meta = {"commit": git_commit(), "finegates_src": str(Path(finegates.__file__).parent), "model": args.model,
            "device": args.device, "steps": args.steps, "batch_size": 2, "max_length": 16, "note": args.note}
    write_results(args.results, meta, rows, _markdown(meta, rows))


def _markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# Operators dispatched per training step", "",
        f"Model `{meta['model']}`, RTE, batch 2 x 16, eager steps on {meta['device']}; outermost `aten::` operators "
        f"of a {meta['steps'][1]}-step run minus a {meta['steps'][0]}-step run, per step. Commit "
        f"{meta['commit'][:10]}. {meta['note']}", "",
        "| method | recipe | operators per step | most frequent |", "|---|---|---:|---|",
    ]
    for r in rows:
        top = ", ".join(f"{k.removeprefix('aten::')} {v:.0f}" for k, v in list(r["top"].items())[:6])
        lines.append(f"| {r['method']} | {r['recipe'] or ''} | {r['ops_per_step']:.0f} | {top} |")
    return "\n".join(lines) + "\n"


def cmd_table(args) -> None:
    from torch.profiler import ProfilerActivity

    cuda = args.device == "cuda"
    kw = {"activities": [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    for item in args.methods.split(","):
        method, _, recipe = item.partition(":")
        prof = _train(method, recipe or None, args, args.steps[0], 16, 128, kw, args.cuda_graphs)
        table = prof.key_averages().table(sort_by=key, row_limit=args.top)
        (out / f"{method}-{recipe or 'default'}{'-graphs' if args.cuda_graphs else ''}.txt").write_text(table)
        print(table[:6000], flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, default_steps in (("count", [4, 12]), ("table", [30])):
        s = sub.add_parser(name)
        s.add_argument("--glue", default="/work/shared/data/glue", help="GLUE folder (with RTE/)")
        s.add_argument("--model", default="mpnet", help="model folder or name")
        s.add_argument("--device", default="cpu")
        s.add_argument("--methods", default=METHODS, help="comma-separated method[:recipe]")
        s.add_argument("--steps", type=int, nargs="+", default=default_steps,
                       help="count: the two run lengths N1 N2; table: the run length")
        s.add_argument("--top", type=int, default=40, help="operators listed per method")
        s.add_argument("--threads", type=int, default=2)
    sub.choices["count"].add_argument("--results", default="benchmarks/results/step_ops.json")
    sub.choices["count"].add_argument("--note", default="", help="a sentence for the table's header")
    sub.choices["table"].add_argument("--out", required=True, help="folder for one table per method")
    sub.choices["table"].add_argument("--cuda-graphs", action="store_true",
                                      help="replay the steps as CUDA graphs (the table then shows the replayed kernels)")
    args = p.parse_args(argv)
    quiet()
    (cmd_count if args.cmd == "count" else cmd_table)(args)


if __name__ == "__main__":
    main()
