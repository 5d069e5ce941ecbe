"""Sparse pretraining on WikiText-2 (issue 11): dense vs gated vs dense at the compressed size.

On the GPU machine (device tool; no finegates install there, so PYTHONPATH=src), with the three
WikiText-2 token files copied into the git-ignored .carry/wikitext-2/ and `carry: [".carry/wikitext-2"]`:

    PYTHONPATH=src:. PYTHONUNBUFFERED=1 python3 -m benchmarks.pretrain run --data .carry/wikitext-2 \
        --out /tmp/pretrain --deadline 480 --pack "$OUT"

`run` trains one BPE tokenizer (8,192 tokens) on wiki.train.tokens, then, as two processes sharing the
GPU, the dense model and the gated model (sparsity 0.4) of configs/small-llama.json for the same step
budget; it compresses the gated run (`compress_run`, the code of `finegates compress`), evaluates the
compressed model's test perplexity, and trains a dense model whose intermediate_size is shrunk to the
compressed model's parameter count, with the same budget. `--deadline` (seconds, whole command) bounds
it: each training process gets a time limit and, if it hits it, stops, evaluates and saves (the run
records `stopped_early`). Weights are saved bf16-rounded (lossless reload; GPU autocast runs the
linears in bf16 anyway), so the three run directories fit the device tool's 64 MiB of returned files:
`--pack` writes them as pretrain.tar.partNN (<= 15 MiB each) plus summary.json.

Estimated on an H100: ~10M-parameter model, 64 x 256 tokens per step (~1 TFLOP), ~30-50 ms per step
with two processes sharing the GPU; 1,200 steps (~7 epochs of the 2.7M training tokens) take ~1-1.5 min
per phase, plus ~30 s of start-up/tokenization per process and ~2 s per validation: ~4-5 min in all.

Here (CPU), from the returned files:

    .venv/bin/python -m benchmarks.pretrain report --bundle FILES_AT --data .carry/wikitext-2

`report` unpacks into runs/pretrain-gpu, points the runs at their new place (`pretrain.relocate`),
compresses the gated run again here (gated vs compressed logits must agree), measures test perplexity on
the first `--test-tokens` test tokens on this CPU (the full-test numbers come from the GPU), CPU
prefill/decode latency (bench_decoder), and writes benchmarks/results/pretrain.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from benchmarks.runner import job_env, quiet

PART_BYTES = 15 * 2**20
RUNS = ("dense", "gated", "small")
LABELS = {"dense": "dense", "gated": "gated (sparsity 0.4)", "small": "dense at the compressed size"}


# ---- GPU side ------------------------------------------------------------------------------------
def run_one(cfg_json: str) -> None:
    """One training process (a fresh interpreter: two share the GPU)."""
    import torch

    torch.set_num_threads(4 if torch.cuda.is_available() else 1)  # two processes share the CPU too
    quiet()
    from finegates.training.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(**json.loads(cfg_json))
    resume = (cfg.out / "checkpoint" / "state.pt").is_file()
    pretrain(cfg, resume=resume, overwrite=not resume)  # a run killed before its first checkpoint starts again


def _launch(jobs: dict[str, dict], log_dir: Path, kill_at: float) -> dict[str, int]:
    """Run the jobs as concurrent processes; kill any still running at `kill_at` (time.time())."""
    env = job_env()
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = {name: subprocess.Popen([sys.executable, "-m", "benchmarks.pretrain", "one", json.dumps(job)],
                                    stdout=open(log_dir / f"{name}.log", "w"), stderr=subprocess.STDOUT, env=env)
             for name, job in jobs.items()}
    while any(p.poll() is None for p in procs.values()) and time.time() < kill_at:
        time.sleep(1)
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()
    return {name: p.returncode for name, p in procs.items()}


def run(args) -> None:
    import torch

    from finegates.pipeline import compress_run
    from finegates.pipeline import evaluate_path
    from finegates.training.scratch import train_tokenizer

    t0, out, data = time.time(), Path(args.out), Path(args.data)
    files = {s: data / f"wiki.{s}.tokens" for s in ("train", "valid", "test")}
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "tokenizer" / "tokenizer.json").is_file():
        train_tokenizer([files["train"]], args.vocab_size).save_pretrained(out / "tokenizer")
    base = {"model_config": str(args.config), "text_files": [str(files["train"])], "tokenizer": str(out / "tokenizer"),
            "valid_text_file": str(files["valid"]), "test_text_file": str(files["test"]), "max_steps": args.steps,
            "batch_size": args.batch_size, "block_size": args.block_size, "eval_every": args.eval_every,
            "eval_batch_size": 64, "warmup_steps": args.warmup_steps, "lr": args.lr, "save_dtype": "bfloat16",
            "progress": False, "seed": args.seed}
    left = args.deadline - (time.time() - t0)
    limit1 = max(30.0, 0.55 * left - 45)  # phase 2 trains one model alone: faster than two sharing
    jobs = {"dense": {**base, "out": str(out / "dense"), "mode": "dense", "time_limit_s": limit1},
            "gated": {**base, "out": str(out / "gated"), "mode": "gated", "sparsity": args.sparsity,
                      "time_limit_s": limit1}}
    codes = _launch(jobs, out / "logs", t0 + args.deadline)
    phase1 = time.time() - t0
    print(f"[{phase1:.0f}s] dense and gated: exit codes {codes}", flush=True)
    report = compress_run(out / "gated", out / "gated-compressed", limit=16, overwrite=True)
    compressed = evaluate_path(out / "gated-compressed", files["test"], args.block_size, args.block_size // 2,
                               batch_size=64)
    print(f"[{time.time() - t0:.0f}s] compressed: {report['params_dense']:,} -> {report['params_compressed']:,} "
          f"params, max |logit diff| {report['max_abs_diff']:.2e}", flush=True)
    limit2 = max(30.0, args.deadline - (time.time() - t0) - 60)
    small = {**base, "out": str(out / "small"), "mode": "dense", "match_params": report["params_compressed"],
             "time_limit_s": limit2}
    codes |= _launch({"small": small}, out / "logs", t0 + args.deadline + 30)
    summary = {"seconds": time.time() - t0, "phase1_seconds": phase1, "exit_codes": codes, "args": vars(args),
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "compress_report": report, "compressed_test": compressed,
               "metrics": {n: _read(out / n / "metrics.json") for n in RUNS}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"[{summary['seconds']:.0f}s] done: " + ", ".join(
        f"{n} test ppl {(m or {}).get('test_perplexity')}" for n, m in summary["metrics"].items()), flush=True)
    if args.pack:
        pack(out, Path(args.pack))


def _read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def pack(out: Path, dest: Path) -> None:
    """The run directories (no checkpoints, no compressed weights) as tar parts of <= 15 MiB."""
    dest.mkdir(parents=True, exist_ok=True)
    tar_path = dest / "pretrain.tar"
    skip = lambda ti: None if "/checkpoint" in ti.name or ("gated-compressed/" in ti.name  # noqa: E731
                                                         and not ti.name.endswith("compress_report.json")) else ti
    with tarfile.open(tar_path, "w") as tar:
        tar.add(out, arcname="pretrain", filter=skip)
    with open(tar_path, "rb") as f:
        for i, chunk in enumerate(iter(lambda: f.read(PART_BYTES), b"")):
            (dest / f"pretrain.tar.part{i:02d}").write_bytes(chunk)
    tar_path.unlink()
    (dest / "summary.json").write_text((out / "summary.json").read_text())


# ---- report (CPU) ----------------------------------------------------------------------------------
def unpack(bundle: Path, runs: Path) -> Path:
    parts = sorted(bundle.glob("pretrain.tar.part*"))
    if not parts:
        sys.exit(f"{bundle}: no pretrain.tar.part* files")
    runs.mkdir(parents=True, exist_ok=True)
    joined = runs / "pretrain.tar"
    with open(joined, "wb") as f:
        for p in parts:
            f.write(p.read_bytes())
    with tarfile.open(joined) as tar:
        tar.extractall(runs, filter="data")
    joined.unlink()
    return runs / "pretrain"


def curves(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def plot(root: Path, path: Path, sparsity_run: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in RUNS:
        rows = curves(root / name)
        ax.plot([r["step"] for r in rows], [r["valid"]["perplexity"] for r in rows], label=LABELS[name])
    ax.set(xlabel="step", ylabel="validation perplexity (WikiText-2, log)", yscale="log",
           title="Validation perplexity during pretraining")
    ax.legend()
    rows = [r for r in curves(root / "gated") if "removed_fraction" in r]
    ax2.plot([r["step"] for r in rows], [r["removed_fraction"] for r in rows], color="C1")
    ax2.axhline(sparsity_run.get("sparsity", 0.4), ls="--", color="gray", label="target")
    ax2.set(xlabel="step", ylabel="fraction of block linear params removable", title="Gated run: what compress deletes")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(args) -> None:
    import torch

    from benchmarks.report import git_commit, write_results
    from finegates.bench.latency import machine_info
    from finegates.bench.decoder import bench_generation
    from finegates.pipeline import compress_run
    from finegates.pipeline import evaluate_path
    from finegates.loaders import load_for_eval
    from finegates.training.pretrain import relocate

    root = unpack(Path(args.bundle), Path(args.runs)) if args.bundle else Path(args.runs) / "pretrain"
    summary = json.loads((root / "summary.json").read_text())
    data = Path(args.data)
    for name in RUNS:
        relocate(root / name, data)
    test_file = data / "wiki.test.tokens"
    cr = compress_run(root / "gated", root / "gated-compressed", limit=16, overwrite=True)
    torch.set_num_threads(args.threads)
    m = {n: json.loads((root / n / "metrics.json").read_text()) for n in RUNS}
    where = {"dense": root / "dense" / "model", "gated": root / "gated", "compressed": root / "gated-compressed",
             "small": root / "small" / "model"}
    rows = []
    for key, path in where.items():
        run = m["gated" if key == "compressed" else key]
        cpu = evaluate_path(path, test_file, run["window"], run["stride"], eval_tokens=args.test_tokens,
                            batch_size=16, device="cpu")
        model, tok, kind = load_for_eval(path)
        lat = None if key == "gated" else bench_generation(  # the gated model is not what one deploys
            model, tok, prompt_tokens=args.prompt_tokens, new_tokens=32, threads=args.threads, runs=5)
        test_gpu = summary["compressed_test"]["perplexity"] if key == "compressed" else run["test_perplexity"]
        rows.append({
            "model": {"compressed": "gated, compressed"}.get(key, LABELS.get(key)), "kind": kind,
            "params": cr["params_compressed"] if key == "compressed" else run["params"],
            "steps": run["steps"], "max_steps": run["max_steps"], "stopped_early": run["stopped_early"],
            "valid_perplexity": run["perplexity"], "test_perplexity_gpu_full": test_gpu,
            "test_perplexity_cpu_prefix": cpu["perplexity"], "cpu_prefix_tokens": cpu["tokens"],
            "removed_fraction": cr["removed_fraction"] if key == "compressed" else None,
            "layer_linear_removed_fraction": cr["layer_linear_removed_fraction"] if key == "compressed" else None,
            "prefill_ms": lat["prefill_ms"]["median"] if lat else None,
            "decode_ms_per_token": lat["decode_ms_per_token"]["median"] if lat else None,
            "train_seconds": run["train_seconds"], "model_config": run.get("model_config"),
        })
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(root, out.with_suffix(".png"), m["gated"])
    meta = {"commit": git_commit(), "report_machine": machine_info(), "platform": platform.platform(),
            "gpu": summary["device"], "gpu_seconds": summary["seconds"], "args": summary["args"],
            "compress_here": {k: cr[k] for k in ("max_abs_diff", "prediction_agreement", "params_dense",
                                                 "params_compressed", "layer_linear_removed_fraction")},
            "compress_gpu_max_abs_diff": summary["compress_report"]["max_abs_diff"], "window": m["dense"]["window"],
            "stride": m["dense"]["stride"], "prompt_tokens": args.prompt_tokens, "threads": args.threads}
    write_results(out, meta, rows, markdown(rows, meta, out.with_suffix(".png").name))
    print(markdown(rows, meta, out.with_suffix(".png").name))


def markdown(rows: list[dict], meta: dict, png: str) -> str:
    fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
    lines = [
        "# Sparse pretraining on WikiText-2 (benchmarks/pretrain.py)", "",
        f"Commit `{meta['commit'][:12]}`. Trained on {meta['gpu']} ({meta['gpu_seconds']:.0f} s for all runs); "
        f"CPU numbers on {meta['report_machine']['cpu']} ({meta['report_machine']['cpus']} CPUs, shared), "
        f"{rows[0].get('cpu_prefix_tokens', 0):,} test tokens, latency with {meta['threads']} thread(s). "
        f"Perplexity: window {meta['window']}, stride {meta['stride']}, per token of our "
        f"{rows[0]['model_config']['vocab_size']:,}-token BPE (not per word).", "",
        "| model | params | removed (whole model / block linears) | steps | valid ppl | test ppl (GPU, full) "
        f"| test ppl (CPU, prefix) | prefill {meta['prompt_tokens']} tok (ms) | decode (ms/token) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        removed = f"{100 * r['removed_fraction']:.1f}% / {100 * r['layer_linear_removed_fraction']:.1f}%" \
            if r["removed_fraction"] is not None else "-"
        steps = f"{r['steps']}" + (" (time limit)" if r["stopped_early"] else "")
        lines.append(f"| {r['model']} | {r['params']:,} | {removed} | {steps} | {fmt(r['valid_perplexity'])} | "
                     f"{fmt(r['test_perplexity_gpu_full'])} | {fmt(r['test_perplexity_cpu_prefix'])} | "
                     f"{fmt(r['prefill_ms'], '{:.1f}')} | {fmt(r['decode_ms_per_token'], '{:.2f}')} |")
    lines += ["", f"Compression checked here: max |logit diff| gated vs compressed "
              f"{meta['compress_here']['max_abs_diff']:.1e} (on the GPU machine's CPU: "
              f"{meta['compress_gpu_max_abs_diff']:.1e}).", "", f"![validation perplexity]({png})", ""]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "one":
        return run_one(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="GPU: train dense, gated, compress, train dense at the compressed size")
    r.add_argument("--data", required=True, help="Folder with wiki.{train,valid,test}.tokens")
    r.add_argument("--out", required=True)
    r.add_argument("--config", default="configs/small-llama.json")
    r.add_argument("--steps", type=int, default=1200)
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--block-size", type=int, default=256)
    r.add_argument("--eval-every", type=int, default=50)
    r.add_argument("--warmup-steps", type=int, default=100)
    r.add_argument("--lr", type=float, default=2e-3)
    r.add_argument("--sparsity", type=float, default=0.4)
    r.add_argument("--vocab-size", type=int, default=8192)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--deadline", type=float, default=480, help="Seconds for the whole command")
    r.add_argument("--pack", default=None, help="Write the runs as tar parts here (the device tool's $OUT)")
    p = sub.add_parser("report", help="CPU: compress, perplexity, latency, plot, results files")
    p.add_argument("--bundle", default=None, help="Folder with pretrain.tar.part* and summary.json (files_at)")
    p.add_argument("--runs", default="runs/pretrain-gpu")
    p.add_argument("--data", required=True)
    p.add_argument("--test-tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=128, help="CPU latency: prompt length (+32 decoded)")
    p.add_argument("--results", default="benchmarks/results/pretrain.json")
    args = ap.parse_args()
    run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    main()
