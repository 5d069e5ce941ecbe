"""Issue 10, rounds 7-19: what lifts the gates' accuracy at 40% removed: distillation from a
finetuned teacher (`--teacher`), finetuning the gated layers' weights too (`--train-weights`),
what the weak tasks (RTE, CoLA) need (rounds 7-15), and closing units by Taylor importance instead
of by gate drift (rounds 16-19: the `taylor` schedule, the default `finetune` recipe).

    # on the GPU (device tool; carry .carry/glue and .carry/minilm), each config in turn:
    nvidia-cuda-mps-control -d
    python -m benchmarks.glue run --config benchmarks/archive/capacity.json --out runs/capacity \
        --model .carry/minilm --glue .carry/glue --parallel 24 --deadline 480 --kill 555
    #   ... then archive/capacity2.json (round 8), capacity3.json (9), ..., capacity13.json (round 19)
    # here, on the CPU, from the run directories brought back:
    python -m benchmarks.capacity report

Runs that train the weights are compressed on the GPU machine (the runner's `_compress`: their
trainable file holds every block weight, too large to bring back); their compress_report.json
comes back, their weights do not, so they are not timed here. The default recipe's small-task
runs and full finetuning's are the GLUE grid's (benchmarks/results/glue.json, same settings).
Writes benchmarks/results/capacity.{json,md} and docs/figures/r7/*.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

from benchmarks.gate_study import MAIN_METRIC, steps_to_target
from benchmarks.glue import add_report_parser, collect, measure, select

TASKS = ["mrpc", "stsb", "sst2", "rte", "cola", "wnli"]
REFERENCE = {"mrpc": 81.6, "stsb": 86.8, "sst2": 90.5, "rte": 62.8}  # the full-finetuning reference
ORDER = ["full FT", "finetune", "finetune-s50", "tay-qft", "tay-qft-lr1e-5", "tay-qft-s36", "tay-qft-early",
         "tay-qft-lr5e-5", "tay", "tay-w", "gates", "gates-kd", "gates-w", "gates-w-lr5e-5", "gates-w-kd", "gwkd-ft", "gwkd-norm", "gwkd-head",
         "gwkd-lr5e-5", "gwkd-warm40", "gwkd-lr5e-5-warm40", "gwkd-s0", "gwkd-head-s0", "gw-s0", "gw-s0-quiet",
         "gw-s0-quiet-ft", "gw-quiet-ft", "gw-quiet-ft-lr1e-2", "qft-warm50", "qft-s20", "qft-warm50-s20", "qft-lr3e-3",
         "teacher"]
QUIET_FT = "gates start at 1, no gate noise, LayerNorms trainable, head/biases/LayerNorms at 2e-5"
TAYLOR = "units closed by Taylor importance (schedule taylor)"
WHAT = {
    "full FT": "full finetuning (GLUE grid, 3 seeds; MRPC seeds 3-4 here; SST-2: the teacher run, 3 epochs)",
    "finetune": "the default recipe (--recipe finetune; SST-2 at 2 epochs; STS-B, RTE, CoLA: tay-qft's runs, the "
                "same configuration)",
    "finetune-s50": "the default recipe at a 50% target (SST-2 at 2 epochs)",
    "tay-qft": f"gates-w, {QUIET_FT}, gate lr 1e-3, {TAYLOR} (= finetune)",
    "tay-qft-lr1e-5": "tay-qft at gate lr 1e-5 (gates barely move: close to pure masks)",
    "tay-qft-s36": "tay-qft at a 36% target",
    "tay-qft-early": "tay-qft closing from 10% to 60% of steps (not 20% to 70%)",
    "tay-qft-lr5e-5": "tay-qft with weights, head, biases and LayerNorms at 5e-5",
    "tay": f"default recipe of rounds 1-15 (fast, frozen weights), {TAYLOR}",
    "tay-w": f"gates-w, {TAYLOR}",
    "gates": "the fast recipe (the default of rounds 1-15), frozen weights (GLUE grid; SST-2 here at 3 epochs)",
    "gates-kd": "+ logit distillation from the teacher (kd_weight 0.5, T 2)",
    "gates-w": "+ gated layers' weights finetune (lr 2e-5)",
    "gates-w-lr5e-5": "gates-w at weight lr 5e-5 (full finetuning's SST-2 lr)",
    "gates-w-kd": "weights + distillation",
    "gwkd-ft": "weights + distillation, LayerNorms trainable, head/biases/LayerNorms at 2e-5",
    "gwkd-norm": "weights + distillation, LayerNorms trainable at 1e-3",
    "gwkd-head": "weights + distillation, head lr 2e-5",
    "gwkd-lr5e-5": "weights (lr 5e-5) + distillation",
    "gwkd-warm40": "weights + distillation, penalty-free 40%, ramp 40%",
    "gwkd-lr5e-5-warm40": "both of the above",
    "gwkd-s0": "weights + distillation, unpruned (target 0)",
    "gwkd-head-s0": "weights + distillation, head lr 2e-5, unpruned (target 0)",
    "gw-s0": "gates-w unpruned (target 0)",
    "gw-s0-quiet": "gates-w unpruned, gates start at 1, no gate noise, gate lr 1e-3",
    "gw-s0-quiet-ft": f"gates-w unpruned, {QUIET_FT}, gate lr 1e-3",
    "gw-quiet-ft": f"gates-w, {QUIET_FT}, gate lr 1e-3",
    "gw-quiet-ft-lr1e-2": f"gates-w, {QUIET_FT}, gate lr 1e-2",
    "qft-warm50": "gw-quiet-ft-lr1e-2, no penalty for 50% of steps, ramp over 30%",
    "qft-s20": "gw-quiet-ft-lr1e-2 at a 20% target",
    "qft-warm50-s20": "qft-warm50 at a 20% target",
    "qft-lr3e-3": f"gates-w, {QUIET_FT}, gate lr 3e-3",
    "teacher": "full finetuning, seed 0 (the teacher)",
}


def rows_with_grid(runs: Path, grid: Path) -> list[dict]:
    """This study's runs, plus the GLUE grid's runs of the old default recipe (`gates`) and of full
    finetuning for the seeds this study did not run (SST-2 is this study's: 3 epochs), plus
    tay-qft's runs as the `finetune` recipe's on the tasks that recipe was not re-run on under its name."""
    rows = [{**r, "method": "full FT"} if r["method"] == "full" else r for r in select(collect(runs))]
    own = {(r["method"], r["task"], r["seed"]) for r in rows}
    for r in json.loads(grid.read_text())["runs"]:
        name = {"gates": "gates", "full": "full FT"}.get(r["method"])
        if name and r["task"] in TASKS and r["task"] != "sst2" and (name, r["task"], r["seed"]) not in own:
            rows.append({**r, "method": name, "source": "glue grid"})
    rows += [{**r, "method": "full FT", "source": "teacher"} for r in rows if r["method"] == "teacher" and r["task"] == "sst2"]
    recipe_tasks = {r["task"] for r in rows if r["method"] == "finetune"}
    rows += [{**r, "method": "finetune", "source": "tay-qft"} for r in rows
             if r["method"] == "tay-qft" and r["task"] not in recipe_tasks]
    return rows


def add_steps_to_target(rows: list[dict]) -> None:
    """Each gates run's first evaluation at which the hard removed fraction was within a point of the
    target (evaluations are once per epoch), and its total steps; None where it never got there."""
    for r in rows:
        log = Path(r["run_dir"]) / "metrics.jsonl"
        target = r.get("sparsity_target") or 0.0
        if not log.is_file() or not target or r["method"] in ("teacher", "full FT"):
            continue
        history = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        r.update(steps_to_target=steps_to_target(history, target), total_steps=history[-1]["step"])


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for method in [m for m in ORDER if any(r["method"] == m for r in rows)]:
        line = {"method": method, "what": WHAT.get(method, ""), "tasks": {}}
        for task in TASKS:
            rs = [r for r in rows if r["method"] == method and r["task"] == task]
            if not rs:
                continue
            scores = [100 * r["score"] for r in rs]
            removed = [r.get("layer_params_removed_fraction", r.get("removable_fraction")) for r in rs]
            line["tasks"][task] = {
                "mean": statistics.mean(scores), "sd": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                "n": len(scores), "removed": statistics.mean(x or 0.0 for x in removed),
                "max_abs_diff": max((r["max_abs_diff"] for r in rs if r.get("max_abs_diff") is not None), default=None),
                "latency_ratio": next((r["latency_ratio"] for r in rs if r.get("latency_ratio") is not None), None),
                "steps_to_target": [r.get("steps_to_target") for r in rs if "total_steps" in r],
                "total_steps": next((r["total_steps"] for r in rs if "total_steps" in r), None),
            }
        out.append(line)
    return out


def table(lines: list[dict]) -> str:
    head = "| variant | " + " | ".join(f"{t} (removed)" for t in TASKS) + " | what |"
    out = [head, "|---" * (len(TASKS) + 2) + "|",
           "| *issue's reference (full FT)* | " + " | ".join(f"*{REFERENCE[t]}*" if t in REFERENCE else "" for t in TASKS) + " | |"]
    for ln in lines:
        cells = []
        for t in TASKS:
            c = ln["tasks"].get(t)
            cells.append("-" if c is None else f"{c['mean']:.1f} ± {c['sd']:.1f} (n={c['n']}, {100 * c['removed']:.0f}%)")
        out.append(f"| {ln['method']} | " + " | ".join(cells) + f" | {ln['what']} |")
    return "\n".join(out)


def steps_table(lines: list[dict]) -> str:
    """When each variant reached its target: the mean step over seeds that did / total steps."""
    out = ["| variant | " + " | ".join(TASKS) + " |", "|---" * (len(TASKS) + 1) + "|"]
    for ln in lines:
        cells = []
        for t in TASKS:
            c = ln["tasks"].get(t)
            if c is None or c["total_steps"] is None:
                cells.append("-")
                continue
            hit = [s for s in c["steps_to_target"] if s is not None]
            missed = len(c["steps_to_target"]) - len(hit)
            cells.append((f"{statistics.mean(hit):.0f}" if hit else "never") + f" / {c['total_steps']}"
                         + (f" ({missed} of {len(c['steps_to_target'])} missed)" if missed and hit else ""))
        if any(cell != "-" for cell in cells):
            out.append(f"| {ln['method']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def gap_table(lines: list[dict], methods: list[str], reference: dict[str, float]) -> str:
    by = {ln["method"]: ln for ln in lines}
    out = ["| task | reference | " + " | ".join(methods) + " |", "|---" * (len(methods) + 2) + "|"]
    for t, ref in reference.items():
        cells = [f"{by[m]['tasks'][t]['mean'] - ref:+.1f}" if t in by.get(m, {"tasks": {}})["tasks"] else "-" for m in methods]
        out.append(f"| {t} | {ref} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def own_full_ft(lines: list[dict]) -> dict[str, float]:
    """Full finetuning's mean score per reference task, as measured here."""
    full = next(ln for ln in lines if ln["method"] == "full FT")["tasks"]
    return {t: round(full[t]["mean"], 1) for t in REFERENCE if t in full}


def curve_plot(runs: Path, folder: Path) -> str:
    """RTE dev accuracy per epoch (seed 0): what learns RTE (full finetuning, the unpruned full-finetuning-like
    gate setup) and what does not (the default gate setup, pruned or not; any pruning)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method in ("teacher", "gates-w", "gw-s0", "gw-s0-quiet", "gw-s0-quiet-ft", "gw-quiet-ft-lr1e-2", "qft-warm50-s20",
                   "tay-w", "tay-qft"):
        for log in sorted(runs.glob(f"{method}/lr*/rte-s0/metrics.jsonl")):
            hist = [json.loads(line) for line in log.read_text().splitlines()]
            ax.plot([h["epoch"] for h in hist], [100 * h["dev"][MAIN_METRIC["rte"]] for h in hist], marker="o", ms=3,
                    label=method)
    ax.axhline(52.7, color="gray", lw=0.8, ls="--", label="majority class")
    ax.set(title="RTE dev accuracy per epoch (seed 0)", xlabel="epoch", ylabel="accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, folder / "rte_curves.png")


def bar_plot(lines: list[dict], folder: Path, methods: list[str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {ln["method"]: ln for ln in lines}
    fig, axes = plt.subplots(1, len(TASKS), figsize=(15, 3.8))
    for ax, task in zip(axes, TASKS):
        ms = [m for m in methods if task in by.get(m, {"tasks": {}})["tasks"]]
        cells = [by[m]["tasks"][task] for m in ms]
        ax.bar(range(len(ms)), [c["mean"] for c in cells], yerr=[c["sd"] for c in cells], capsize=3,
               color=["gray" if m == "full FT" else "C0" for m in ms])
        if task in REFERENCE:
            ax.axhline(REFERENCE[task] - 1, color="C3", lw=0.8, ls="--", label="reference - 1")
        ax.set_xticks(range(len(ms)), ms, rotation=45, ha="right", fontsize=7)
        lo = min(c["mean"] - c["sd"] for c in cells)
        ax.set_ylim(max(0, lo - 5), None)
        ax.set_title(task)
    axes[0].set_ylabel("dev score (mean ± sd over seeds)")
    return _save(fig, folder / "capacity_scores.png")


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def cmd_report(args) -> None:
    from benchmarks.report import git_commit, write_results
    from benchmarks.runner import quiet

    quiet()
    rows = rows_with_grid(Path(args.runs), Path(args.grid))
    own = [r for r in rows if "source" not in r]
    add_steps_to_target(rows)
    if args.measure:
        measure(own, args.threads, args.runs_per_model, args.dense)
    lines = summary(rows)
    main = ["full FT", "finetune", "gates", "tay", "gates-w", "tay-w", "gates-w-kd"]
    figures = [bar_plot(lines, Path(args.figures), main), curve_plot(Path(args.runs), Path(args.figures))]
    meta = {"commit": git_commit(), "report_machine": platform.platform(),
            "train_device": sorted({r["device"] for r in own}), "summary": lines, "reference": REFERENCE}
    diffs = [r["max_abs_diff"] for r in own if r.get("max_abs_diff") is not None]
    md = (f"<!-- commit {meta['commit']} -->\n## Dev score, mean ± sd over seeds (layer params removed)\n\n{table(lines)}\n\n"
          f"## Gap to the issue's reference (points)\n\n{gap_table(lines, main, REFERENCE)}\n\n"
          f"## Gap to full finetuning in this harness (points)\n\n{gap_table(lines, main[1:], own_full_ft(lines))}\n\n"
          f"## Steps to the target (first per-epoch evaluation within a point of it; mean over seeds / all steps)"
          f"\n\n{steps_table(lines)}\n\n"
          f"Compressed vs gated, max |logit diff| over {len(diffs)} compressed runs: {max(diffs):.2g}.\n\n"
          + "".join(f"![]({os.path.relpath(f, Path(args.results).parent)})\n" for f in figures))
    write_results(args.results, meta, rows, md)
    print(md)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = add_report_parser(sub, cmd_report, runs="runs/capacity", results="benchmarks/results/capacity.json",
                          figures="docs/figures/r7")
    s.add_argument("--grid", default="benchmarks/results/glue.json", help="the GLUE grid's results")
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
