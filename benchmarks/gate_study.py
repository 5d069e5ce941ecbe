"""The gate-training recipe study (issue: gates that close selectively and fast).

    # on the GPU machine (device tool), data + fp16 MiniLM carried in .carry/:
    python -m benchmarks.gate_study run --grid benchmarks/archive/gate_study.json --out runs/study \
        --model .carry/minilm --glue .carry/glue --parallel 14 --deadline 500
    # here, from the run directories brought back:
    python -m benchmarks.gate_study report --runs runs/study

`report` writes benchmarks/results/gate_study.json (every run: variant, task, dev metric, physical
parameters removed, steps to reach the target, traces) and the plots in docs/figures/.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from benchmarks.report import git_commit, write_results

TASK_DIRS = {"mrpc": "MRPC", "rte": "RTE", "stsb": "STS-B", "sst2": "SST-2", "cola": "CoLA", "wnli": "WNLI"}
REFERENCE_FULL_FT = {"mrpc": 0.816, "rte": 0.628, "stsb": 0.868, "sst2": 0.905, "cola": 0.329}  # METHOD.md s.5
MAIN_METRIC = {"mrpc": "accuracy", "rte": "accuracy", "stsb": "pearson", "sst2": "accuracy", "cola": "mcc", "wnli": "accuracy"}


def build_jobs(grid: dict, out: Path, model: str, glue: Path, only: list[str] | None) -> list[dict]:
    jobs = []
    for vname, variant in grid["variants"].items():
        if only and vname not in only:
            continue
        for task, tcfg in grid["tasks"].items():
            if variant.get("tasks") and task not in variant["tasks"]:
                continue
            for seed in variant.get("seeds", grid.get("seeds", [0])):
                job = {
                    "out": str(out / vname / f"{task}-s{seed}"), "model": model, "task": task,
                    "data_dir": str(glue / TASK_DIRS[task]), "seed": seed, "progress": False,
                    "trace_every": grid.get("trace_every", 25), **grid.get("defaults", {}), **tcfg,
                    **{k: v for k, v in variant.items() if k not in ("tasks", "seeds", "description")},
                }
                job["_cost"] = job.get("epochs", 1) * {"sst2": 20, "stsb": 2.3, "mrpc": 1.5, "rte": 1, "cola": 3.4}.get(task, 1)
                jobs.append(job)
    return jobs


def cmd_run(args) -> None:
    from benchmarks.runner import run_grid

    grid = json.loads(Path(args.grid).read_text())
    jobs = build_jobs(grid, Path(args.out), args.model, Path(args.glue), args.only)
    summary = run_grid(jobs, args.parallel, args.deadline, Path(args.out) / "_logs")
    print(json.dumps(summary, indent=2))


def steps_to_target(trace: list[dict], target: float) -> int | None:
    for t in trace:
        if float(t.get("removed", 0)) >= target - 0.01:
            return t["step"]
    return None


def collect(runs: Path) -> list[dict]:
    """Every run under RUNS/<variant>/<task>-s<seed>; runs stopped early use their last evaluation."""
    rows = []
    for run in sorted(p.parent for p in runs.glob("*/*/metrics.jsonl")):
        cfg = json.loads((run / "config.json").read_text())
        epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        trace_file = run / "trace.jsonl"
        trace = [json.loads(line) for line in trace_file.read_text().splitlines()] if trace_file.exists() else []
        complete = (run / "metrics.json").exists()
        m = json.loads((run / "metrics.json").read_text()) if complete else {}
        task = cfg["task"]
        metric = MAIN_METRIC[task]
        target = cfg["train"]["sparsity"]
        last = epochs[-1]
        removed = m.get("removable_fraction", float(last.get("removed", 0)))
        rows.append({
            "variant": run.parent.name, "task": task, "seed": cfg["train"]["seed"], "complete": complete,
            "steps": m.get("steps", last["step"]), "metric": metric, "dev": m.get("dev", last["dev"]),
            "score": m.get("dev", last["dev"])[metric], "best_score": max(e["dev"][metric] for e in epochs),
            "removable_fraction": removed, "gated_off_fraction": m.get("gated_off_fraction"),
            # without a trace (not brought back), the evaluations' removed fractions: a coarser answer
            "target": target, "steps_to_target": steps_to_target(trace or epochs, target) if target > 0 else 0,
            "trainable_params": m.get("trainable_params"), "gate_params": m.get("gate_params"),
            "seconds_per_step": m.get("seconds_per_step"), "device": m.get("device"),
            "epochs": [{"step": e["step"], "score": e["dev"][metric], "removed": e.get("removed")} for e in epochs],
            "trace": [{k: t[k] for k in ("step", "task_loss", "removed", "lambda", "target", "gate_q", "gate_closed",
                                         "gate_grad_norm", "gate_hist") if k in t} for t in trace],
            "config": cfg["train"], "recipe": cfg.get("method_config"),
        })
    return rows


def cmd_report(args) -> None:
    rows = collect(Path(args.runs))
    meta = {"commit": git_commit(), "report_machine": platform.platform(), "runs_dir": args.runs,
            "reference_full_ft": REFERENCE_FULL_FT, "note": args.note}
    md = table(rows)
    write_results(args.results, meta, rows,
        f"<!-- {meta} -->\n{md}\n\nscore / physically removable layer parameters / steps until the hard count "
        f"reached the target (of all steps); * = stopped at the deadline, last evaluation shown\n")
    print(md)
    plots(rows, Path(args.figures))


def table(rows: list[dict]) -> str:
    tasks = sorted({r["task"] for r in rows}, key=list(TASK_DIRS).index)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    head = "| variant | " + " | ".join(f"{t} score / removed / steps-to-target" for t in tasks) + " |"
    lines = [head, "|" + "---|" * (len(tasks) + 1)]
    for v in variants:
        cells = []
        for t in tasks:
            rs = [r for r in rows if r["variant"] == v and r["task"] == t]
            if not rs:
                cells.append("-")
                continue
            r = rs[0]
            stt = r["steps_to_target"] if r["steps_to_target"] is not None else "never"
            mark = "" if r["complete"] else "*"
            cells.append(f"{100 * r['score']:.1f}{mark} / {100 * (r['removable_fraction'] or 0):.0f}% / {stt} of {r['steps']}")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(rows: list[dict], fig_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig_dir.mkdir(parents=True, exist_ok=True)
    tasks = sorted({r["task"] for r in rows}, key=list(TASK_DIRS).index)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    color = {v: plt.cm.tab20(i % 20) for i, v in enumerate(variants)}  # one colour per variant in every panel
    for key, ylabel, fname in (("removed", "layer parameters removable (hard count)", "removed_vs_step.png"),
                               ("gate_closed", "fraction of gates closed", "closed_vs_step.png")):
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for r in rows:
                if r["task"] == task and r["trace"]:
                    ax.plot([t["step"] for t in r["trace"]], [float(t.get(key, 0)) for t in r["trace"]],
                            label=r["variant"], color=color[r["variant"]])
            ax.set_title(task)
            ax.set_xlabel("step")
        axes[0][0].set_ylabel(ylabel)
        handles = [plt.Line2D([], [], color=color[v], label=v) for v in variants]
        fig.legend(handles=handles, loc="center right", fontsize=7)
        fig.subplots_adjust(right=0.85)
        fig.savefig(fig_dir / fname, dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for task in tasks:
        rs = [r for r in rows if r["task"] == task]
        ax.scatter([100 * (r["removable_fraction"] or 0) for r in rs], [100 * r["score"] for r in rs], label=task)
        for r in rs:
            ax.annotate(r["variant"], (100 * (r["removable_fraction"] or 0), 100 * r["score"]), fontsize=5)
    ax.set_xlabel("layer parameters physically removable (%)")
    ax.set_ylabel("dev score")
    ax.legend()
    fig.tight_layout()
    fig.savefig(fig_dir / "score_vs_removed.png", dpi=110)
    plt.close(fig)
    # gate-value histograms over training, one panel per variant (MRPC or first task)
    task = "mrpc" if "mrpc" in tasks else tasks[0]
    rs = [r for r in rows if r["task"] == task and r["trace"] and "gate_hist" in r["trace"][0]]
    if rs:
        fig, axes = plt.subplots(1, len(rs), figsize=(3 * len(rs), 3), squeeze=False)
        for ax, r in zip(axes[0], rs):
            hist = [t["gate_hist"] for t in r["trace"]]
            ax.imshow(np.log1p(np.array(hist).T), aspect="auto", origin="lower", extent=(0, r["trace"][-1]["step"], 0, 1))
            ax.set_title(r["variant"], fontsize=7)
            ax.set_xlabel("step")
        axes[0][0].set_ylabel("gate value (log-count histogram)")
        fig.tight_layout()
        fig.savefig(fig_dir / f"gate_hist_{task}.png", dpi=110)
        plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--grid", default="benchmarks/archive/gate_study.json")
    r.add_argument("--out", default="runs/study")
    r.add_argument("--model", default=None)
    r.add_argument("--glue", default="/work/shared/data/glue")
    r.add_argument("--parallel", type=int, default=4)
    r.add_argument("--deadline", type=float, default=1e9, help="seconds after which no job starts and running ones stop")
    r.add_argument("--only", nargs="*")
    r.set_defaults(fn=cmd_run)
    s = sub.add_parser("report")
    s.add_argument("--runs", default="runs/study")
    s.add_argument("--results", default="benchmarks/results/gate_study.json")
    s.add_argument("--figures", default="docs/figures")
    s.add_argument("--note", default="")
    s.set_defaults(fn=cmd_report)
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
