"""The FineGates paper's Figure 1 with a decoder: SmolLM2-135M as a classifier (MRPC, RTE), gate-finetuned
to 0/10/20/30/40% of its layer parameters removed; CPU time reduction and accuracy vs parameters removed.

  gpu     (GPU, one call after smollm2_lm.py's `receive` calls, same warm machine)  trains the ten
          classifiers at once, one process each under MPS (`LlamaForSequenceClassification`: a new
          `score` head on the last real token; the pad token is EOS, padding on the right: docs/decoders.md) with the
          `frozen` recipe (frozen weights; gates over a rank-4 update of q and v, merged before
          compression; MLP units close by Taylor importance), 3 epochs, batch 16, max length 128.
          Writes fig1_gpu.json and the run folders (gates + adapters + head, ~2 MB each) as tarballs.
  report  (here, CPU)  for each run: compress it (checked against the gated model), measure dev
          accuracy/F1 of the *compressed* model here (fp32), its latency against the dense
          classifier (2 threads, batch 8 x 128, fp32, interleaved blocks) and the decode speed of its
          backbone under SmolLM2's tied LM head (a speed measure: the classifier has no LM head of its
          own); writes benchmarks/results/smollm2_fig1.{json,md,png}.

Device call (after calls 1-2 of smollm2_lm.py, which bring the model and GLUE RTE; MRPC is in data/):

  carry []:  nvidia-cuda-mps-control -d; PYTHONUNBUFFERED=1 timeout 590 python3 benchmarks/smollm2_fig1.py gpu \
                 --out $OUT 2>&1 | tee $OUT/fig1.log

Then here: python3 benchmarks/smollm2_fig1.py report --gpu DIR  (DIR: that call's $OUT).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.smollm2_lm import BACK_LIMIT, RESULTS, SHARED, WORK, log, model_folder  # noqa: E402

TASKS = {"mrpc": "MRPC", "rte": "RTE"}
TARGETS = (0.0, 0.1, 0.2, 0.3, 0.4)


def _data_dir(task: str, there: bool) -> Path:
    name = TASKS[task]
    if task == "mrpc":
        return ROOT / "data" / name
    return WORK / "data" / name if there else SHARED / "glue" / name


# ==== gpu ==========================================================================================
def cmd_gpu(args) -> None:
    """All classifiers at once, one process each (benchmarks.runner): a SmolLM2 classifier step is bound
    by the host launching its 30 layers' kernels (0.29 s at batch 16 x 128 alone on the H200, session 4),
    so under MPS ten of them share the GPU at little cost to each."""
    t_start = time.time()
    sys.path.insert(0, str(ROOT / "src"))
    from benchmarks.runner import quiet, run_grid

    quiet()
    import torch

    folder = str(Path(args.model).resolve()) if args.model else str(model_folder())
    out, work = Path(args.out), WORK / "fig1"
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    jobs = {}
    for target in args.targets:
        for task in args.tasks:
            name = f"{task}@{target:.2f}"
            jobs[name] = {"out": str(work / "runs" / name), "model": folder, "task": task,
                          "data_dir": str(_data_dir(task, not args.local_data)), "recipe": args.recipe,
                          "sparsity": target, "epochs": args.epochs, "batch_size": args.batch_size, "max_length": 128,
                          "eval_batch_size": 64, "progress": False, "device": "auto", "seed": args.seed,
                          "max_steps": args.max_steps, "eval_limit": args.eval_limit,
                          "cuda_graphs": False}  # eager, as the session-5 runs were
    grid = run_grid(list(jobs.values()), args.parallel, deadline_s=args.budget_s, log_dir=out / "logs",
                    kill_s=args.budget_s)
    entries = []
    for name, job in jobs.items():
        path = Path(job["out"]) / "metrics.json"
        if not path.exists():
            continue
        m = json.loads(path.read_text())
        entries.append({"name": name, "task": job["task"], "target": job["sparsity"], "run_dir": f"runs/{name}",
                        "dev_gpu": m["dev"], "score_gpu": m["score"], "steps": m["steps"],
                        "train_seconds": m["train_seconds"], "removable_fraction": m.get("removable_fraction"),
                        "trainable_params": m["trainable_params"]})
        log(f"{name}: {m['steps']} steps in {m['train_seconds']:.0f}s, dev {m['dev']}, removed "
            f"{m.get('removable_fraction', 0):.3f}")
    result = {"machine": info, "recipe": args.recipe, "epochs": args.epochs, "batch_size": args.batch_size,
              "max_length": 128, "seed": args.seed, "parallel": args.parallel, "failed": grid["failed"],
              "runs": entries, "seconds": time.time() - t_start}
    (out / "fig1_gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    for i, group in enumerate(_groups([work / e["run_dir"] for e in entries])):
        path = out / f"fig1_runs{i}.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            for d in group:
                tar.add(d, arcname=str(d.relative_to(work)), filter=lambda t: None if "/checkpoint" in t.name else t)
    log(f"wrote {len(entries)} runs to {out} in {time.time() - t_start:.0f}s; failed: {grid['failed'] or 'none'}")


def _groups(folders: list[Path]) -> list[list[Path]]:
    """Run folders in groups of at most 15 MiB each (a file back from the device may be 16 MiB)."""
    groups, size = [[]], 0
    for d in folders:
        n = sum(p.stat().st_size for p in d.rglob("*") if p.is_file() and "checkpoint" not in p.parts)
        if groups[-1] and size + n > BACK_LIMIT - 2**20:
            groups.append([])
            size = 0
        groups[-1].append(d)
        size += n
    return groups


# ==== report (CPU) ================================================================================
def _relocate(run_dir: Path, folder: str, task: str) -> None:
    """Point a GPU run at the local float SmolLM2 (the run's fingerprint still checks it is the same
    model) and at this machine's copy of its task's data (the GPU read RTE from the carried pack)."""
    path = run_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg["model_location"] = folder
    cfg["train"]["model"] = folder
    cfg["train"]["data_dir"] = str(_data_dir(task, there=False))
    path.write_text(json.dumps(cfg, indent=1) + "\n")


def _dev_scores(model_dir: Path, run_dir: Path, threads: int) -> dict:
    """The compressed model's dev metrics, measured here (fp32, CPU)."""
    import torch

    from finegates.compression.saved import load
    from finegates.data import metrics as M
    from finegates.data.encoding import Encoded
    from finegates.loaders import load_tokenizer
    from finegates.pipeline import eval_examples
    from finegates.training.classify import predict

    torch.set_num_threads(threads)
    spec, examples = eval_examples(run_dir)
    model = load(model_dir)
    data = Encoded(examples, load_tokenizer(str(model_dir)), 128, spec.regression)
    pred = predict(model, data, 8, torch.device("cpu"), spec.regression)
    return M.compute(spec.metrics, data.labels.numpy(), pred)


def _decode(model_dir: Path, folder: str, args) -> dict:
    """Greedy decode speed of the compressed backbone under SmolLM2's (tied) LM head."""
    from transformers import AutoModelForCausalLM

    from finegates.bench.decoder import bench_generation
    from finegates.compression.saved import load
    from finegates.loaders import load_tokenizer

    cls = load(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(folder)
    lm.model = cls.model  # the compressed blocks; embeddings (and so the tied head) are unchanged
    return bench_generation(lm.eval(), load_tokenizer(folder), prompt_tokens=args.prompt, new_tokens=args.new_tokens,
                            threads=args.threads, runs=args.decode_runs, warmup=1)


def cmd_report(args) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from benchmarks.runner import quiet

    quiet()
    import torch

    from benchmarks.report import git_commit, write_results
    from finegates.bench.latency import BenchConfig, bench, machine_info
    from finegates.loaders import resolve
    from finegates.pipeline import compress_run

    src, tmp = Path(args.gpu), Path(args.work)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gpu = json.loads((src / "fig1_gpu.json").read_text())
    for tarball in sorted(src.glob("fig1_runs*.tar.gz")):
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, filter="data")
    folder = resolve(args.model)
    torch.set_num_threads(args.threads)
    cfg = BenchConfig(threads=args.threads, batch=8, seq=128, runs=args.runs, warmup=2, blocks=5, memory=False)
    rows = []
    for e in gpu["runs"]:
        t0 = time.time()
        run_dir, model_dir = tmp / e["run_dir"], tmp / "models" / e["name"]
        _relocate(run_dir, folder, e["task"])
        report = compress_run(run_dir, model_dir, limit=32)
        timing = bench(model_dir, against=folder, cfg=cfg)
        row = {**e, "dev_cpu": _dev_scores(model_dir, run_dir, args.threads),
               "layer_params_removed_fraction": report["layer_params_removed_fraction"],
               "params_removed_fraction": report["removed_fraction"], "max_abs_logit_diff": report["max_abs_diff"],
               "layers": report["layers"], "latency_ms_dense": timing["latency_ms_dense"],
               "latency_ms_compressed": timing["latency_ms_compressed"],
               "cpu_time_reduction": 1 - timing["latency_ms_compressed"] / timing["latency_ms_dense"],
               "decode": _decode(model_dir, folder, args)}
        row["decode_tokens_per_s"] = row["decode"]["decode_tokens_per_s"]
        rows.append(row)
        shutil.rmtree(model_dir)
        log(f"{e['name']}: dev {row['dev_cpu']}, {100 * row['layer_params_removed_fraction']:.1f}% removed, "
            f"CPU time reduction {100 * row['cpu_time_reduction']:.1f}%, decode {row['decode_tokens_per_s']:.1f} tok/s "
            f"({time.time() - t0:.0f}s)")
    dense_decode = bench_dense_decode(folder, args)
    meta = {"commit": git_commit(), "machine": machine_info(), "gpu_run": gpu["machine"], "recipe": gpu["recipe"],
            "epochs": gpu["epochs"], "batch_size": gpu["batch_size"], "seed": gpu["seed"], "model": folder,
            "latency": {"threads": args.threads, "batch": 8, "seq": 128, "runs": args.runs, "dtype": "float32"},
            "decode": {"prompt_tokens": args.prompt, "new_tokens": args.new_tokens, "runs": args.decode_runs,
                       "dense_tokens_per_s": dense_decode}}
    write_results(args.json, meta, rows, _markdown(meta, rows))
    _plot(rows, Path(args.json).with_suffix(".png"))
    log(f"wrote {args.json}, .md and .png")


def bench_dense_decode(folder: str, args) -> float:
    from finegates.bench.decoder import bench_generation
    from finegates.loaders import load_causal_lm, load_tokenizer

    r = bench_generation(load_causal_lm(folder).eval(), load_tokenizer(folder), prompt_tokens=args.prompt,
                         new_tokens=args.new_tokens, threads=args.threads, runs=args.decode_runs, warmup=1)
    return r["decode_tokens_per_s"]


def _metric(row: dict) -> tuple[str, float]:
    dev = row["dev_cpu"]
    key = "accuracy" if "accuracy" in dev else next(iter(dev))
    return key, dev[key]


def _markdown(meta: dict, rows: list[dict]) -> str:
    lat, dec = meta["latency"], meta["decode"]
    lines = [
        "# SmolLM2-135M as a classifier: the paper's Figure 1 with a decoder", "",
        f"Recipe `{meta['recipe']}`, {meta['epochs']} epochs, batch {meta['batch_size']}, seed {meta['seed']}, trained on "
        f"the GPU ({meta['gpu_run']['device']}); everything below measured on this CPU ({meta['machine']['cpu']}) on "
        f"the compressed models: dev metrics in fp32; latency {lat['threads']} threads, batch {lat['batch']} x "
        f"{lat['seq']}, fp32, median of {lat['runs']} interleaved with the dense classifier; decode: prompt "
        f"{dec['prompt_tokens']}, {dec['new_tokens']} greedy tokens, the compressed backbone under SmolLM2's tied LM "
        f"head (dense: {dec['dense_tokens_per_s']:.1f} tokens/s). Commit {meta['commit'][:10]}.", "",
        "| task | target | layer params removed | dev (CPU) | dev (GPU, gated) | dense ms | compressed ms | "
        "CPU time reduction | decode tokens/s | max logit diff |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fmt = lambda d: ", ".join(f"{k} {100 * v:.1f}" for k, v in d.items())  # noqa: E731
        lines.append(f"| {r['task']} | {r['target']:.1f} | {100 * r['layer_params_removed_fraction']:.1f}% | "
                     f"{fmt(r['dev_cpu'])} | {fmt(r['dev_gpu'])} | {r['latency_ms_dense']:.0f} | "
                     f"{r['latency_ms_compressed']:.0f} | {100 * r['cpu_time_reduction']:.1f}% | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['max_abs_logit_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    acc_ax = ax.twinx()
    for task, style in zip(TASKS, ("o", "s")):
        rs = sorted((r for r in rows if r["task"] == task), key=lambda r: r["layer_params_removed_fraction"])
        if not rs:
            continue
        x = [100 * r["layer_params_removed_fraction"] for r in rs]
        ax.plot(x, [100 * r["cpu_time_reduction"] for r in rs], style + "-", color="tab:blue",
                label=f"{task.upper()} CPU time reduction")
        acc_ax.plot(x, [100 * _metric(r)[1] for r in rs], style + "--", color="tab:red", label=f"{task.upper()} accuracy")
    ax.set_xlabel("layer parameters removed (%)")
    ax.set_ylabel("CPU time reduction (%)", color="tab:blue")
    acc_ax.set_ylabel("dev accuracy (%)", color="tab:red")
    ax.set_title("SmolLM2-135M classifier: CPU time reduction and accuracy vs parameters removed", fontsize=9)
    handles = ax.get_legend_handles_labels()[0] + acc_ax.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gpu", help="train the classifiers (GPU, one call)")
    g.add_argument("--out", required=True)
    g.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    g.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    g.add_argument("--recipe", default="frozen")
    g.add_argument("--epochs", type=float, default=3.0)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--budget-s", type=float, default=520, help="runs still going after this many seconds are killed")
    g.add_argument("--parallel", type=int, default=10, help="runs sharing the GPU at once (start MPS first)")
    g.add_argument("--max-steps", type=int, default=None, help="cap (dry runs)")
    g.add_argument("--eval-limit", type=int, default=None, help="first N dev examples (dry runs)")
    g.add_argument("--model", help="a float SmolLM2 folder (default: the received one)")
    g.add_argument("--local-data", action="store_true", help="read GLUE RTE from the shared data folder (dry runs here)")
    r = sub.add_parser("report", help="CPU: compress, measure, plot")
    r.add_argument("--gpu", required=True, help="the GPU call's $OUT folder")
    r.add_argument("--model", default="smollm2")
    r.add_argument("--work", default=str(ROOT / "runs" / "smollm2_fig1_report"))
    r.add_argument("--json", default=str(RESULTS / "smollm2_fig1.json"))
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--runs", type=int, default=10, help="timed forward passes per model (and of the dense one)")
    r.add_argument("--decode-runs", type=int, default=3)
    r.add_argument("--prompt", type=int, default=128)
    r.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args(argv)
    (cmd_gpu if args.cmd == "gpu" else cmd_report)(args)


if __name__ == "__main__":
    main()
