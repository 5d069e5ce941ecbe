"""int8 after compression: dense fp32 PyTorch vs compressed fp32 PyTorch / ONNX Runtime / int8 ONNX Runtime.

    .venv/bin/python benchmarks/int8.py --run RUN_DIR --label NAME   # a finished classification gates run
      (the recorded results: --run runs/demo/run --label "MiniLM-L6 (embedded)", the run `make demo`
       leaves; --run runs/mpnet-rte/run --label "MPNet-base (all-mpnet-base-v2)", a GPU-trained
       frozen-recipe RTE run, see BENCHMARKS.md section 2c)

Steps: compress the run (`finegates compress`, unless OUT/compressed exists), export the compressed
model to ONNX and quantize it to int8 (`finegates export --int8`'s code; ONNX files are always made
anew), score all four variants on the whole dev set of the run's task, then time them with
`finegates bench --int8` (batch 8 x seq 128, 2 threads, all models in one process in alternating
blocks), `--repeats` times; latencies are the medians of the repeats' medians. The dense row is the
run's own model with its gates baked in at their evaluation values (dense shapes: the model
compression starts from). Writes benchmarks/results/int8.json and .md with the machine, the load
average and the commit, per model: rows of other models already in the file are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import git_commit, write_results  # noqa: E402

VARIANTS = {  # variant -> (bench backend, bench model key)
    "dense-fp32-torch": ("torch", "dense"),
    "compressed-fp32-torch": ("torch", "compressed"),
    "compressed-fp32-onnx": ("onnxruntime", "compressed"),
    "compressed-int8-onnx": ("onnxruntime", "compressed-int8"),
}


def predictions(forward, batches: list[dict]) -> np.ndarray:
    return np.concatenate([np.asarray(forward(b)).argmax(-1) for b in batches])


def scores(run_dir: Path, compressed_dir: Path, onnx: dict[str, Path]) -> dict[str, dict]:
    """Dev metrics of every variant (all dev examples)."""
    from finegates.data import metrics as M
    from finegates.loaders import load_any
    from finegates.export import ort_feed, ort_session
    from finegates.loaders import load_tokenizer
    from finegates.pipeline import eval_batches, eval_examples
    from finegates.training.checkpoint import read_run_config

    dense, _ = load_any(run_dir)
    compressed, _ = load_any(compressed_dir)
    tokenizer = load_tokenizer(read_run_config(run_dir)["model_location"])
    batches = eval_batches(run_dir, tokenizer, limit=None)
    spec, examples = eval_examples(run_dir)
    labels = np.array([e.label for e in examples])

    def torch_fn(model):
        return lambda b: model(**b).logits.float().numpy()

    def ort_fn(path):
        session = ort_session(path, 2)
        return lambda b: session.run(["logits"], ort_feed(session, b))[0]

    fns = {"dense-fp32-torch": torch_fn(dense), "compressed-fp32-torch": torch_fn(compressed),
           "compressed-fp32-onnx": ort_fn(onnx["fp32"]), "compressed-int8-onnx": ort_fn(onnx["int8"])}
    out = {}
    with torch.inference_mode():
        for name, fn in fns.items():
            metrics = M.compute(spec.metrics, labels, predictions(fn, batches))
            out[name] = {**metrics, "score": 100 * M.main_score(metrics, spec.metrics), "metric": "+".join(spec.metrics),
                         "n": len(labels)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="finished classification gates run directory")
    p.add_argument("--label", required=True, help="model name in the results (rows of this name are replaced)")
    p.add_argument("--out", type=Path, help="working folder (compressed model, ONNX files); default RUN/../int8")
    p.add_argument("--runs", type=int, default=30, help="timed passes per model per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--note", default="", help="provenance of the run, kept in the results")
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/int8.json"))
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    from finegates.bench.latency import BenchConfig, bench, machine_info
    from finegates.compression.saved import load
    from finegates.export import export_onnx, quantize_int8
    from finegates.pipeline import compress_run
    from finegates.training.checkpoint import read_run_config

    torch.set_num_threads(args.threads)
    out = args.out or args.run.parent / "int8"
    compressed_dir = out / "compressed"
    if not (compressed_dir / "config.json").is_file():
        compress_run(args.run, compressed_dir)
    onnx_dir = out / "onnx"  # anew: files of an older export would be timed otherwise
    shutil.rmtree(onnx_dir, ignore_errors=True)
    onnx = {"fp32": onnx_dir / "compressed.onnx", "int8": onnx_dir / "compressed-int8.onnx"}
    export_onnx(load(compressed_dir), onnx["fp32"])
    quantize_int8(onnx["fp32"], onnx["int8"])
    dev = scores(args.run, compressed_dir, onnx)
    print({k: round(v["score"], 2) for k, v in dev.items()}, flush=True)

    cfg = BenchConfig(threads=args.threads, batch=8, seq=128, runs=args.runs, warmup=5, int8=True, memory=False)
    repeats = []
    for i in range(args.repeats):
        repeats.append(bench(compressed_dir, args.run, cfg, onnx_dir=onnx_dir))
        print(f"repeat {i + 1}/{args.repeats}: load {repeats[-1]['load_avg']['before'][0]:.1f}", flush=True)
    latency = {v: statistics.median(r[b][k]["median"] for r in repeats) for v, (b, k) in VARIANTS.items()}
    extra = {f"{k}-onnx": statistics.median(r["onnxruntime"][k]["median"] for r in repeats) for k in ("dense", "dense-int8")}

    run_cfg = read_run_config(args.run)
    task = run_cfg["train"].get("task") or "own data"
    rows = [{"model": args.label, "task": task, "variant": v, "latency_ms": latency[v],
             "score": dev[v]["score"], "metrics": {k: dev[v][k] for k in dev[v] if k not in ("score", "metric", "n")},
             "speedup_vs_dense": latency["dense-fp32-torch"] / latency[v]} for v in VARIANTS]
    report = repeats[-1]
    meta = {
        "commit": git_commit(), "machine": machine_info(),
        "command": " ".join(["python", "benchmarks/int8.py", *sys.argv[1:]]), "note": args.note,
        "run": str(args.run), "model_location": run_cfg.get("model_location"),
        "train": {k: run_cfg["train"].get(k) for k in ("task", "epochs", "max_length", "batch_size", "recipe",
                                                         "sparsity", "lr", "head_lr", "recipe_options")},
        "score": f"dev {dev['dense-fp32-torch']['metric']} mean x 100, all {dev['dense-fp32-torch']['n']} dev examples",
        "settings": {"threads": args.threads, "batch": 8, "seq": 128, "runs_per_repeat": args.runs,
                     "repeats": args.repeats, "warmup": 5, "timing": "one process, models in alternating blocks"},
        "layer_params_removed_fraction": report["layer_params_removed_fraction"],
        "params": report["params"], "onnx_mb": report["onnx_mb"],
        "load_avg_per_repeat": [r["load_avg"] for r in repeats],
        "latency_per_repeat": [{v: r[b][k]["median"] for v, (b, k) in VARIANTS.items()} for r in repeats],
        "also_timed_ms": extra,
        "shared_machine": "2 cores shared with other jobs while this ran (see load averages)",
    }
    models, rows = merged(args.results, args.label, meta, rows)
    all_meta = {"benchmark": "int8 after compression", "models": models}
    write_results(args.results, all_meta, rows, markdown(all_meta, rows))
    print(markdown(all_meta, rows))


def merged(path: Path, label: str, meta: dict, rows: list[dict]) -> tuple[dict, list[dict]]:
    """(per-model meta, rows) of the results at `path` with model `label`'s replaced by these."""
    old = json.loads(path.read_text()) if path.is_file() else {"meta": {}, "runs": []}
    models = old["meta"].get("models")
    if models is None:  # the one-model format of earlier versions
        models = {old["runs"][0]["model"]: old["meta"]} if old["runs"] else {}
    models = {k: v for k, v in models.items() if k != label} | {label: meta}
    return models, [r for r in old["runs"] if r["model"] != label] + rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = ["# int8 after compression, CPU", ""]
    for label, m in meta["models"].items():
        lines += _model_markdown(label, m, [r for r in rows if r["model"] == label])
    return "\n".join(lines)


def _model_markdown(label: str, meta: dict, rows: list[dict]) -> list[str]:
    m = meta["machine"]
    loads = [r["before"][0] for r in meta["load_avg_per_repeat"]]
    names = list(rows[0]["metrics"])
    lines = [
        f"## {label} on {rows[0]['task'].upper()}", "",
        f"Commit `{meta['commit']}`. Machine: {m['cpu']}, {m['cpus']} CPUs, torch {m['torch']}, onnxruntime "
        f"{m['onnxruntime']}. Shared machine: load average {min(loads):.1f}-{max(loads):.1f} while timing.",
        f"Run `{meta['run']}` ({meta['train']}); {100 * meta['layer_params_removed_fraction']:.1f}% of transformer-layer "
        "parameters removed." + (f" {meta['note']}" if meta.get("note") else ""),
        f"Latency: batch 8 x 128 tokens, {meta['settings']['threads']} threads, median of {meta['settings']['repeats']} "
        f"repeats' medians ({meta['settings']['runs_per_repeat']} runs each, all models in alternating blocks). "
        f"Score: {meta['score']}.", "",
        f"| variant | latency (ms) | speed-up vs dense fp32 PyTorch | dev score | {' / '.join(names)} |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        values = " / ".join(f"{100 * r['metrics'][k]:.1f}" for k in names)
        lines.append(f"| {r['variant']} | {r['latency_ms']:.1f} | {r['speedup_vs_dense']:.2f}x | {r['score']:.2f} | {values} |")
    mb = meta["onnx_mb"]
    lines += ["", f"ONNX files: compressed fp32 {mb['compressed']:.1f} MiB, int8 {mb['compressed-int8']:.1f} MiB "
              f"(dense fp32 {mb['dense']:.1f} MiB, dense int8 {mb['dense-int8']:.1f} MiB). Also timed: dense fp32 ONNX "
              f"{meta['also_timed_ms']['dense-onnx']:.1f} ms, dense int8 ONNX {meta['also_timed_ms']['dense-int8-onnx']:.1f} ms.",
              ""]
    return lines


if __name__ == "__main__":
    main()
