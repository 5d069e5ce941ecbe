"""`make demo`: the whole product in a few CPU minutes, offline, on real data and the real model.

    python -m finegates.demo [--data-dir data/MRPC] [--out runs/demo]

Gate-finetunes the embedded MiniLM-L6 on MRPC (the repository's data/MRPC), closes 40% of the
transformer layers' MLP units while it trains (the default `finetune` recipe), compresses the
model exactly, and prints dense vs compressed side by side: dev score, parameters, MB on disk, CPU
latency, and the largest logit difference between the gated model and the compressed one. Writes
OUT/demo.json (the numbers, the machine, the time each phase took) and OUT/demo.png (the same
picture), and leaves OUT/compressed, a folder that `finegates.load` or plain transformers
(`trust_remote_code=True`) opens.

Schedule: one epoch (230 steps) with a higher weight lr (8e-5) and head lr (1e-3) than the
full-length run (5 epochs at 2e-5), to fit in five minutes on 2 cores;
the full-length numbers are in BENCHMARKS.md (benchmarks/results/demo.json).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

DEFAULT_DATA = Path("data/MRPC")  # relative to where `make demo` runs: the repository root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="MRPC folder (train.tsv, dev.tsv)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--weight-lr", type=float, default=8e-5)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--sparsity", type=float, default=0.4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--run", type=Path, help="reuse this finished training run (skips training; its own settings count)")
    args = p.parse_args()
    if not (args.data_dir / "train.tsv").is_file() or not (args.data_dir / "dev.tsv").is_file():
        p.exit(2, f"error: no MRPC at {args.data_dir} (train.tsv, dev.tsv): run from the repository root "
                  "or pass --data-dir\n")
    t_start = time.time()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    from rich.console import Console

    from .bench import BenchConfig, bench, machine_info
    from .compression import WEIGHTS
    from .data.files import write_json
    from .loaders import load_any
    from .pipeline import compress_run
    from .training.classify import train
    from .training.config import TrainConfig

    console = Console()
    what = f"reusing the run {args.run}" if args.run else f"{args.epochs:g} epoch(s) on CPU ({args.threads} threads)"
    console.print(f"[bold]finegates demo[/]: MiniLM-L6 on MRPC ({args.data_dir}), remove {args.sparsity:.0%} of the "
                  f"layers' parameters, {what}")
    phases = {}
    t0 = time.time()
    run_dir = args.run or args.out / "run"
    if args.run is None:  # a re-run replaces the last demo
        train(TrainConfig(out=run_dir, task="mrpc", data_dir=args.data_dir, epochs=args.epochs, sparsity=args.sparsity,
                          head_lr=args.head_lr, recipe_options={"weight_lr": args.weight_lr}, device="cpu"),
              overwrite=True)
    run = json.loads((run_dir / "metrics.json").read_text())
    train_cfg = json.loads((run_dir / "config.json").read_text())["train"]
    phases["train"] = time.time() - t0 if args.run is None else run["train_seconds"]
    t0 = time.time()
    report = compress_run(run_dir, args.out / "compressed", limit=None, overwrite=True)  # checked on the whole dev set
    dense, _ = load_any(run_dir)  # the trained model with its gates baked in: dense shapes
    dense.save_pretrained(args.out / "dense")  # only to weigh it on disk
    compressed_dev = _dev_scores(args.out / "compressed", run_dir)
    phases["compress"] = time.time() - t0
    t0 = time.time()
    timing = bench(args.out / "compressed", run_dir,
                   BenchConfig(threads=args.threads, batch=8, seq=128, runs=20, warmup=3, memory=False))
    phases["bench"] = time.time() - t0
    mb = {k: (args.out / d / WEIGHTS).stat().st_size / 1e6 for k, d in (("dense", "dense"), ("compressed", "compressed"))}
    result = {
        "task": "mrpc", "run": str(run_dir), "reused_run": args.run is not None, "recipe": run["recipe"],
        "steps": run["steps"], "train": {k: train_cfg.get(k) for k in ("epochs", "head_lr", "recipe_options", "sparsity",
                                                                       "max_length", "batch_size")},
        "dev": {"dense": run["dev"], "compressed": compressed_dev},
        "params": {"dense": report["params_dense"], "compressed": report["params_compressed"]},
        "layer_params_removed_fraction": report["layer_params_removed_fraction"], "mb_on_disk": mb,
        "latency_ms": {"dense": timing["latency_ms_dense"], "compressed": timing["latency_ms_compressed"]},
        "speedup": 1 / timing["latency_ratio"], "max_abs_diff": report["max_abs_diff"],
        "prediction_agreement": report["prediction_agreement"], "n_dev": report["n_examples"],
        "layers": report["layers"], "mlp_units_dense": dense.config.intermediate_size, "threads": args.threads, "load_avg": list(os.getloadavg()),
        "seconds": {**phases, "total": time.time() - t_start + (phases["train"] if args.run else 0)},
        "machine": machine_info(),
    }
    write_json(args.out / "demo.json", result)
    _picture(result, args.out / "demo.png")
    console.print(_table(result))
    reused = " (training: the reused run's own time)" if args.run else ""
    console.print(f"{result['seconds']['total'] / 60:.1f} min in all{reused}. Compressed model: {args.out / 'compressed'} "
                  f"(finegates.load, or transformers with trust_remote_code=True); picture: {args.out / 'demo.png'}")


def _dev_scores(model_dir: Path, run_dir: Path) -> dict:
    """The compressed model's own dev metrics (measured, not carried over from the gated model)."""
    import numpy as np
    import torch

    from .compression import load
    from .data import metrics as M
    from .loaders import load_tokenizer
    from .pipeline import eval_batches, eval_examples
    from .training.checkpoint import read_run_config

    model = load(model_dir)
    batches = eval_batches(run_dir, load_tokenizer(read_run_config(run_dir)["model_location"]), limit=None)
    spec, examples = eval_examples(run_dir)
    with torch.inference_mode():
        pred = np.concatenate([model(**b).logits.argmax(-1).numpy() for b in batches])
    return M.compute(spec.metrics, [e.label for e in examples], pred)


def _table(r: dict):
    from rich.table import Table

    t = Table(title=f"finegates demo: MiniLM-L6 on MRPC, {r['steps']} training steps (dev set: {r['n_dev']} pairs)")
    for col, just in (("", "left"), ("dense (trained, gated)", "right"), ("compressed", "right")):
        t.add_column(col, justify=just)
    dev = r["dev"]
    t.add_row("dev accuracy / F1 (%)", *(f"{100 * dev[k]['accuracy']:.1f} / {100 * dev[k]['f1']:.1f}"
                                        for k in ("dense", "compressed")))
    t.add_row("parameters", f"{r['params']['dense']:,}", f"{r['params']['compressed']:,}")
    t.add_row("transformer-layer parameters removed", "", f"{100 * r['layer_params_removed_fraction']:.1f}%")
    t.add_row("MB on disk (model.safetensors)", f"{r['mb_on_disk']['dense']:.1f}", f"{r['mb_on_disk']['compressed']:.1f}")
    t.add_row(f"CPU latency, batch 8 x 128, {r['threads']} threads (ms)",
              f"{r['latency_ms']['dense']:.0f}", f"{r['latency_ms']['compressed']:.0f} ({r['speedup']:.2f}x faster)")
    t.add_row("max |logit diff| gated vs compressed (all dev)", "", f"{r['max_abs_diff']:.1e}")
    t.add_row("majority-class accuracy (for scale)", "68.4", "")
    return t


def _picture(r: dict, path: Path) -> None:
    """Dense vs compressed bars (relative to dense) and the MLP width each layer kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    labels = ["dev accuracy", "parameters", "MB on disk", "CPU latency"]
    dense = [r["dev"]["dense"]["accuracy"], r["params"]["dense"], r["mb_on_disk"]["dense"], r["latency_ms"]["dense"]]
    comp = [r["dev"]["compressed"]["accuracy"], r["params"]["compressed"], r["mb_on_disk"]["compressed"],
            r["latency_ms"]["compressed"]]
    x = range(len(labels))
    a.bar([i - 0.2 for i in x], [1.0] * 4, 0.4, label="dense", color="#9aa5b1")
    a.bar([i + 0.2 for i in x], [c / d for c, d in zip(comp, dense)], 0.4, label="compressed", color="#2b7bba")
    for i, (c, d) in enumerate(zip(comp, dense)):
        a.text(i + 0.2, c / d + 0.02, f"{c / d:.2f}", ha="center", fontsize=9)
    a.set_xticks(list(x), labels)
    a.set_ylabel("compressed / dense")
    a.set_ylim(0, 1.2)
    a.legend(loc="lower left")
    a.set_title(f"MiniLM-L6, MRPC: {100 * r['layer_params_removed_fraction']:.0f}% of layer parameters removed, "
                f"max |logit diff| {r['max_abs_diff']:.0e}", fontsize=9)
    units = [layer["mlp_units"] for layer in r["layers"]]
    b.bar(range(len(units)), units, color="#2b7bba")
    b.axhline(r["mlp_units_dense"], color="#9aa5b1", linestyle="--", label="dense")
    b.legend(loc="lower left")
    b.set_xlabel("layer")
    b.set_ylabel("MLP units kept")
    b.set_title("what each layer kept (per-layer shapes)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
