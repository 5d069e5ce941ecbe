"""The GLUE benchmark: FineGates vs every baseline on MiniLM-L6, methods x tasks x seeds x lr grid.

    # 1. train, on the GPU (device tool; carry .carry from ../shared/tools/pack-for-device), resumable;
    #    each device command (<= 10 min) goes on where the last stopped (carry back runs/glue's
    #    metrics.json files when the machine went cold; --leading puts the leading lrs first):
    nvidia-cuda-mps-control -d   # many small trainings share the GPU well under MPS
    python -m benchmarks.glue run --config benchmarks/glue.json --out runs/glue \
        --model .carry/minilm --glue .carry/glue --parallel 24 --deadline 450 --kill 535
    # 2. here, on the CPU, from the run directories brought back: pick each method's lr on dev,
    #    compress what can be compressed, time dense vs compressed, write the results and the table:
    python -m benchmarks.glue report --runs runs/glue

Writes benchmarks/results/glue.json (every run) and benchmarks/results/glue.md (the table).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

from benchmarks.gate_study import MAIN_METRIC, TASK_DIRS

COST = {"sst2": 20, "cola": 3.4, "stsb": 2.3, "mrpc": 1.5, "rte": 1.0, "wnli": 0.25}  # examples / RTE's


def build_jobs(cfg: dict, out: Path, model: str | None, glue: Path, leading: dict | None = None) -> list[dict]:
    """Every (method, lr, task, seed) run of the config. Seed 0 of every run comes first, then
    seed 1, ...: a grid cut short by its deadline still has a complete table with fewer seeds.
    `leading` ({method: {task: lr}}, from the seeds run so far) puts each seed's runs at the
    leading lr before the other lrs of that seed. A method may name its `tasks` and `seeds`, its
    `task_lrs` ({task: [lr, ...]}, in place of `lrs`), and a `teacher`: another method of the grid
    whose seed-0 run of the same task it distils from (it starts once that run is complete); a
    task may name its `seeds`."""
    jobs = []
    for name, m in cfg["methods"].items():
        method = {k: v for k, v in m.items() if k not in ("lrs", "tasks", "seeds", "task_lrs", "teacher")}
        for task, t in cfg["tasks"].items():
            if task not in m.get("tasks", [task]):
                continue
            for lr in m.get("task_lrs", {}).get(task, m.get("lrs", [None])):
                settings = {k: v for k, v in t.items() if k != "seeds"}
                for seed in m.get("seeds", t.get("seeds", cfg["seeds"])):
                    job = {"out": str(out / name / f"lr{lr}" / f"{task}-s{seed}"), "model": model, "task": task,
                           "data_dir": str(glue / TASK_DIRS[task]), "seed": seed, "progress": False,
                           **cfg.get("defaults", {}), **settings, **method}
                    if lr is not None:
                        job["lr"] = lr
                    if "teacher" in m:
                        job["teacher"] = job["_after"] = _teacher_dir(cfg, out, m["teacher"], task)
                    behind = leading is not None and str(leading.get(name, {}).get(task, lr)) != str(lr)
                    job["_priority"] = seed + 0.5 * behind
                    job["_cost"] = job.get("epochs", 1) * COST[task]
                    jobs.append(job)
    return jobs


def _teacher_dir(cfg: dict, out: Path, teacher: str, task: str) -> str:
    """The run directory of method `teacher`'s seed-0 run on `task` (its first lr)."""
    t = cfg["methods"][teacher]
    lr = t.get("task_lrs", {}).get(task, t.get("lrs", [None]))[0]
    return str(out / teacher / f"lr{lr}" / f"{task}-s0")


def cmd_run(args) -> None:
    from benchmarks.runner import run_grid

    cfg = json.loads(Path(args.config).read_text())
    if args.methods:
        unknown = set(args.methods.split(",")) - set(cfg["methods"])
        if unknown:
            raise SystemExit(f"glue run: --methods names {', '.join(sorted(unknown))}, not in {args.config}")
        cfg["methods"] = {k: v for k, v in cfg["methods"].items() if k in args.methods.split(",")}
    leading = json.loads(Path(args.leading).read_text()) if args.leading else None
    jobs = build_jobs(cfg, Path(args.out), args.model, Path(args.glue), leading)
    if args.eager:
        for job in jobs:
            job["cuda_graphs"] = False
    print(json.dumps(run_grid(jobs, args.parallel, args.deadline, Path(args.out) / "_logs", args.kill), indent=2))


def collect(runs: Path) -> list[dict]:
    rows = []
    for mfile in sorted(runs.glob("*/lr*/*/metrics.json")):
        m = json.loads(mfile.read_text())
        task = m["task"]
        cfg = json.loads((mfile.parent / "config.json").read_text())
        rows.append({"method": mfile.parents[2].name, "lr": mfile.parents[1].name[2:], "task": task,
                     "seed": m["seed"], "run_dir": str(mfile.parent), "dev": m["dev"],
                     "score": m["dev"][MAIN_METRIC[task]], "trainable_params": m["trainable_params"],
                     "total_params": m.get("total_params"),
                     "recipe": m.get("recipe") if cfg["train"]["method"] == "gates" else None,
                     "gate_params": m.get("gate_params"), "removable_fraction": m.get("removable_fraction"),
                     "unstructured_sparsity": m.get("sparsity"), "train_seconds": m.get("train_seconds"),
                     "seconds_per_step": m["seconds_per_step"], "peak_memory_mb": m["peak_memory_mb"],
                     "device": m["device"], "structured": cfg["train"]["method"] in STRUCTURED,
                     # what training counted as removable; `measure` replaces it by what compress deleted
                     "layer_params_removed_fraction": m.get("removable_fraction") or 0.0,
                     "sparsity_target": cfg["train"].get("sparsity")})
    return rows


STRUCTURED = ("gates", "magnitude")  # methods whose closed rows/columns `compress` deletes


def select(rows: list[dict]) -> list[dict]:
    """Each method's learning rate per task: the best mean dev score over the seeds that every lr
    of that method and task has run (the grid runs seeds 0 and 1 of every lr; seed 2 only of the
    lr leading after them). The chosen lr's runs, all its seeds, are returned."""
    chosen = []
    for method, task in sorted({(r["method"], r["task"]) for r in rows}):
        by_lr: dict[str, list[dict]] = {}
        for r in rows:
            if r["method"] == method and r["task"] == task:
                by_lr.setdefault(r["lr"], []).append(r)
        common = set.intersection(*({r["seed"] for r in rs} for rs in by_lr.values()))
        best = max(by_lr, key=lambda lr: statistics.mean(r["score"] for r in by_lr[lr] if r["seed"] in common))
        for r in by_lr[best]:
            chosen.append({**r, "lr_chosen_on_seeds": sorted(common), "lrs_tried": sorted(by_lr, key=float)})
    return chosen


def measure(rows: list[dict], threads: int, runs: int, dense: str | None = None) -> None:
    """Compress every structured run (all seeds: removed fraction, exactness) and time one run of
    each method and task (the lowest seed that can be timed) against the dense model on the CPU.
    Results are cached in the run dir.

    A run compressed on the GPU machine comes back without weights (a base model's are too large to
    carry) but with its compressed config, which records every layer's widths. With `dense` (the
    dense model here) such a run is timed at those widths with random weights: latency depends on
    the shapes, not the values. Its row says so (`latency_from`)."""
    from benchmarks.runner import compress_into_run
    from finegates.bench.latency import BenchConfig, bench
    from finegates.compression.saved import REPORT, WEIGHTS
    from finegates.data.files import write_json

    todo = sorted((r for r in rows if r["structured"]), key=lambda r: r["seed"])
    timed = set()  # (method, task) pairs with a timed run
    for i, r in enumerate(todo):
        run_dir = Path(r["run_dir"])
        out = run_dir / "compressed"
        report_file = out / REPORT
        if not report_file.is_file() and not (run_dir / "trainable.safetensors").is_file():
            print(f"{r['method']} {r['task']} seed {r['seed']}: neither compressed nor brought back: not compressed")
            continue
        report = json.loads(report_file.read_text()) if report_file.is_file() else compress_into_run(run_dir, limit=64)
        r.update(layer_params_removed_fraction=report["layer_params_removed_fraction"],
                 params_removed_fraction=report["removed_fraction"], max_abs_diff=report["max_abs_diff"])
        if (r["method"], r["task"]) in timed:
            continue
        timing_file = run_dir / "latency.json"
        shapes_only = not (out / WEIGHTS).is_file()
        if not timing_file.is_file() and shapes_only and dense is None:
            print(f"{r['method']} {r['task']} seed {r['seed']}: compressed on the GPU machine, weights not brought "
                  "back: not timed (--dense MODEL times it at its widths)")
            continue
        timed.add((r["method"], r["task"]))
        if not timing_file.is_file():
            t = bench(out, dense if shapes_only else run_dir, BenchConfig(threads=threads, runs=runs, warmup=3,
                                                                           memory=False), shapes_only=shapes_only)
            write_json(timing_file, {**{k: t[k] for k in ("latency_ms_dense", "latency_ms_compressed",
                                                          "latency_ratio", "settings", "machine", "load_avg")},
                                     "latency_from": "shapes" if shapes_only else "weights"})
        t = json.loads(timing_file.read_text())
        r.update(latency_ratio=t["latency_ratio"], latency_ms_dense=t["latency_ms_dense"],
                 latency_ms_compressed=t["latency_ms_compressed"], latency_from=t.get("latency_from", "weights"))
        print(f"[{i + 1}/{len(todo)}] {r['method']} {r['task']} s{r['seed']}: removed "
              f"{r['layer_params_removed_fraction']:.3f}, latency x{r['latency_ratio']:.3f}", flush=True)


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def summarize(rows: list[dict], tasks: list[str]) -> list[dict]:
    """One line per method: mean dev score per task (x100), averages, removal, latency, costs."""
    lines = []
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        per_task = {t: [r["score"] for r in rs if r["task"] == t] for t in tasks}
        scores = {t: 100 * statistics.mean(v) for t, v in per_task.items() if v}
        five = [t for t in tasks if t != "wnli"]
        lines.append({
            "method": method, "trainable_params": statistics.median(r["trainable_params"] for r in rs),
            "scores": scores, "std": {t: 100 * statistics.stdev(v) if len(v) > 1 else 0.0 for t, v in per_task.items() if v},
            "seeds": {t: len(v) for t, v in per_task.items()},
            "lr": {t: next(r["lr"] for r in rs if r["task"] == t) for t in scores},
            "avg": statistics.mean(scores.values()) if len(scores) == len(tasks) else None,
            "avg_no_wnli": statistics.mean(scores[t] for t in five) if all(t in scores for t in five) else None,
            "layer_params_removed": _mean(r.get("layer_params_removed_fraction", 0.0) for r in rs),
            "latency_ratio": _mean(r.get("latency_ratio") for r in rs),
            "seconds_per_step": _mean(r["seconds_per_step"] for r in rs),
            "peak_memory_mb": _mean(r["peak_memory_mb"] for r in rs),
        })
    return lines


PAPER_ROWS = [  # METHOD.md section 4: RoBERTa-base (125M), 8 GLUE tasks (with MNLI, QNLI, QQP), not MiniLM
    ("FineGates (paper, RoBERTa-base)", "0.17M", {"cola": 65.7, "sst2": 94.7, "mrpc": 90.2, "stsb": 91.0, "rte": 83.4}, 86.6),
    ("LoRA r=4 (paper, RoBERTa-base)", "", {}, 86.6),
    ("full FT (paper, RoBERTa-base)", "125M", {}, 86.5),
    ("BitFit (paper, RoBERTa-base)", "", {}, 84.6),
]


def _f(x, fmt: str, none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def table(lines: list[dict], tasks: list[str]) -> str:
    names = {"cola": "CoLA (MCC)", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B (r)", "rte": "RTE", "wnli": "WNLI"}
    out = ["| method | TP | " + " | ".join(names[t] for t in tasks) + " | avg | avg w/o WNLI | layer params removed "
           "| CPU latency (x dense) | s/step (GPU) | peak GPU MB |", "|---" * (len(tasks) + 8) + "|"]
    for ln in lines:
        cells = [f"{ln['scores'][t]:.1f}" if t in ln["scores"] else "-" for t in tasks]
        removed = ln["layer_params_removed"]
        out.append(f"| {ln['method']} | {ln['trainable_params'] / 1e6:.2f}M | " + " | ".join(cells)
                   + f" | {_f(ln['avg'], '.1f')} | {_f(ln['avg_no_wnli'], '.1f')} | {100 * (removed or 0):.1f}% "
                   f"| {_f(ln['latency_ratio'], '.3f', 'dense (1.0, not timed)')} | {ln['seconds_per_step']:.3f} "
                   f"| {ln['peak_memory_mb']:.0f} |")
    for name, tp, scores, avg in PAPER_ROWS:
        cells = [f"{scores[t]:.1f}" if t in scores else "" for t in tasks]
        out.append(f"| *{name}* | {tp} | " + " | ".join(cells) + f" | *{avg} (8 tasks)* | | | | | |")
    return "\n".join(out)


def seeds_table(lines: list[dict], tasks: list[str]) -> str:
    out = ["| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for ln in lines:
        out.append(f"| {ln['method']} | " + " | ".join(
            f"{ln['scores'][t]:.1f} ± {ln['std'][t]:.1f} (n={ln['seeds'][t]}, lr {ln['lr'][t]})" if t in ln["scores"] else "-"
            for t in tasks) + " |")
    return "\n".join(out)


def plots(chosen: list[dict], lines: list[dict], folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, task in zip(axes, ("mrpc", "sst2")):
        for method in dict.fromkeys(r["method"] for r in chosen):
            rs = [r for r in chosen if r["method"] == method and r["task"] == task]
            if rs:
                x = 100 * statistics.mean(r.get("layer_params_removed_fraction", 0.0) for r in rs)
                y = 100 * statistics.mean(r["score"] for r in rs)
                sweep = method.startswith("gates") and method not in ("gates-squarehead", "gates-paper")
                ax.scatter(x, y, marker="o" if sweep else "s", color="C0" if sweep else None, label=method)
                ax.annotate(method, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(title=f"{task}: dev score vs layer params removed", xlabel="layer params physically removed (%)",
               ylabel="dev accuracy (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    files.append(str(folder / "glue_score_vs_removed.png"))
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    timed = [r for r in chosen if r.get("latency_ratio") is not None]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for method in dict.fromkeys(r["method"] for r in timed):
        rs = [r for r in timed if r["method"] == method]
        ax.scatter([100 * r["layer_params_removed_fraction"] for r in rs], [r["latency_ratio"] for r in rs], label=method)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(title="CPU latency (2 threads, batch 8 x 128) vs removal", xlabel="layer params physically removed (%)",
           ylabel="latency / dense latency")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.append(str(folder / "glue_latency_vs_removed.png"))
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    fig, ax1 = plt.subplots(figsize=(8, 4))
    names = [ln["method"] for ln in lines]
    ax1.bar(range(len(names)), [ln["peak_memory_mb"] for ln in lines])
    ax1.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
    ax1.set(ylabel="peak GPU memory (MB, torch allocated)", title="Training memory per method (mean over runs)")
    fig.tight_layout()
    files.append(str(folder / "glue_training_memory.png"))
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    return files


def cmd_report(args) -> None:
    from benchmarks.report import git_commit, write_results

    rows = collect(Path(args.runs))
    if args.config:  # a runs folder shared with a study: only the config's methods
        methods = json.loads(Path(args.config).read_text())["methods"]
        rows = [r for r in rows if r["method"] in methods]
    chosen = select(rows)
    if args.measure:
        measure(chosen, args.threads, args.runs_per_model, args.dense)
    main = [r for r in chosen if r["method"] not in SWEEP]
    tasks = [t for t in TASK_ORDER if any(r["task"] == t for r in main)]
    lines = summarize(main, tasks)
    sweep_rows = [r for r in chosen if r["method"] in SWEEP or r["method"] == "gates"]
    sweep_tasks = [t for t in TASK_ORDER if any(r["task"] == t for r in chosen if r["method"] in SWEEP)]
    sweep = summarize([r for r in sweep_rows if r["task"] in sweep_tasks], sweep_tasks)
    meta = {"commit": git_commit(), "report_machine": platform.platform(), "train_device": sorted({r["device"] for r in rows}),
            "threads": args.threads, "paper_reference_roberta_base": PAPER_ROWS, "summary": lines, "sweep": sweep}
    figures = plots(chosen, lines, Path(args.figures))
    md = (f"<!-- commit {meta['commit']} -->\n## Main table (mean over seeds, lr chosen on dev)\n\n{table(lines, tasks)}\n\n"
          f"## Per task: mean ± sd, seeds, chosen lr\n\n{seeds_table(lines, tasks)}\n\n"
          + (f"## Sparsity sweep (gates, our recipe)\n\n{table(sweep, sweep_tasks)}\n\n" if sweep_tasks else "")
          + "".join(f"![]({Path(f).relative_to(Path(args.results).parent)})\n" for f in figures))
    write_results(args.results, meta, chosen, md)
    print(md)


SWEEP = ("gates-s20", "gates-s30", "gates-s50")
TASK_ORDER = ["cola", "sst2", "mrpc", "stsb", "rte", "wnli"]


def add_report_parser(sub, fn, runs: str, results: str, figures: str) -> argparse.ArgumentParser:
    """The `report` subcommand of every report over GLUE-harness runs: where the runs are, where the
    results and figures go, and `measure`'s options."""
    s = sub.add_parser("report")
    s.add_argument("--runs", default=runs)
    s.add_argument("--results", default=results)
    s.add_argument("--figures", default=figures)
    add_measure_options(s)
    s.set_defaults(fn=fn)
    return s


def add_measure_options(parser: argparse.ArgumentParser) -> None:
    """The options of `measure` (compression and CPU timing), for every report that calls it."""
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs-per-model", type=int, default=12, help="timed forward passes per model")
    parser.add_argument("--measure", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--dense", default=None, help="the dense model here (folder or name, e.g. mpnet): runs "
                        "compressed on the GPU machine, without their weights, are timed at their widths against it")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--config", default="benchmarks/glue.json")
    r.add_argument("--out", default="runs/glue")
    r.add_argument("--model", default=None)
    r.add_argument("--glue", default="/work/shared/data/glue")
    r.add_argument("--parallel", type=int, default=4)
    r.add_argument("--deadline", type=float, default=1e9, help="seconds after which no new run starts")
    r.add_argument("--kill", type=float, default=None, help="seconds after which running runs are killed "
                   "(they resume from their last checkpoint next time); default: --deadline")
    r.add_argument("--leading", default=None, help="JSON {method: {task: lr}}: run these lrs first within a seed")
    r.add_argument("--methods", default=None, help="comma-separated subset of the config's methods (default: all)")
    r.add_argument("--eager", action="store_true",
                   help="every run's steps eagerly (finegates train --no-cuda-graphs), as the runs of sessions 1-4 "
                   "were; by default a GPU run replays its steps as CUDA graphs")
    r.set_defaults(fn=cmd_run)
    s = add_report_parser(sub, cmd_report, runs="runs/glue", results="benchmarks/results/glue.json",
                          figures="benchmarks/results/figures")
    s.add_argument("--config", default=None, help="report only this grid config's methods (a runs folder shared "
                   "with a study, e.g. runs/base1 with benchmarks/glue_base.json)")
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
