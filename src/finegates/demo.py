"""`make demo`: gate-finetune the embedded MiniLM on real MRPC, compress it, time it. CPU, offline.

    python -m finegates.demo [--epochs 2] [--out runs/demo]

Prints the dev accuracy/F1, trainable parameters, the fraction of layer parameters removed, the
gated-vs-compressed logit difference and the CPU latency of the dense and compressed models, and
writes the same numbers, with the machine they came from, to OUT/demo.json.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

REPO_DATA = Path(__file__).resolve().parents[2] / "data" / "MRPC"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=REPO_DATA, help="MRPC folder (train.tsv, dev.tsv)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--epochs", type=float, default=5.0)
    p.add_argument("--sparsity", type=float, default=0.4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    from rich.console import Console
    from rich.table import Table

    from .bench import BenchConfig, bench, machine_info
    from .compress import compress_run
    from .files import write_json
    from .train import TrainConfig, train

    console = Console()
    console.print(f"[bold]finegates demo[/]: MiniLM-L6 on MRPC ({args.data_dir}), target sparsity {args.sparsity}, "
                  f"{args.epochs:g} epochs on CPU")
    t0 = time.time()
    run = train(TrainConfig(out=args.out / "run", task="mrpc", data_dir=args.data_dir, epochs=args.epochs,
                            sparsity=args.sparsity, device="cpu"), overwrite=True)  # a re-run replaces the last demo
    t_train = time.time() - t0
    report = compress_run(args.out / "run", args.out / "compressed", limit=64, overwrite=True)
    timing = bench(args.out / "compressed", args.out / "run",
                   BenchConfig(threads=args.threads, batch=8, seq=128, runs=20, warmup=3, memory=False))

    table = Table(title="finegates demo: MiniLM-L6 on MRPC (dev set, 408 pairs)")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("dev accuracy / F1", f"{100 * run['dev']['accuracy']:.1f} / {100 * run['dev']['f1']:.1f}")
    table.add_row("majority-class accuracy", "68.4")
    table.add_row("trainable parameters (gates only / all)", f"{run['gate_params']:,} / {run['trainable_params']:,}")
    table.add_row("gated off (paper count, gated layers)", f"{100 * run['gated_off_fraction']:.1f}%")
    table.add_row("transformer-layer params physically removed", f"{100 * report['layer_params_removed_fraction']:.1f}%")
    table.add_row("whole-model params dense -> compressed",
                  f"{report['params_dense']:,} -> {report['params_compressed']:,}")
    table.add_row("max |logit diff| gated vs compressed", f"{report['max_abs_diff']:.1e}")
    table.add_row(f"CPU latency, {args.threads} threads, batch 8 x 128 tokens (median)",
                  f"{timing['latency_ms_dense']:.0f} ms -> {timing['latency_ms_compressed']:.0f} ms")
    table.add_row("speedup", f"{1 / timing['latency_ratio']:.2f}x")
    table.add_row("training time", f"{t_train / 60:.1f} min")
    console.print(table)
    write_json(args.out / "demo.json", {
        "recipe": run["recipe"], "epochs": args.epochs, "dev": run["dev"], "trainable_params": run["trainable_params"],
        "gate_params": run["gate_params"], "gated_off_fraction": run["gated_off_fraction"],
        "layer_params_removed_fraction": report["layer_params_removed_fraction"],
        "params_dense": report["params_dense"], "params_compressed": report["params_compressed"],
        "max_abs_diff": report["max_abs_diff"], "threads": args.threads,
        "latency_ms_dense": timing["latency_ms_dense"], "latency_ms_compressed": timing["latency_ms_compressed"],
        "latency_ratio": timing["latency_ratio"], "train_minutes": t_train / 60, "machine": machine_info(),
    })
    console.print(f"compressed model: {args.out / 'compressed'} (reload: finegates.load('{args.out / 'compressed'}'))")


if __name__ == "__main__":
    main()
