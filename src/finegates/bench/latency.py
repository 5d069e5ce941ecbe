"""CPU latency, memory and size of a compressed model against its dense counterpart.

    result = bench("model-dir", against=None, cfg=BenchConfig(threads=2, batch=8, seq=128))

Timing runs both models in one process, alternating blocks of runs, so a neighbour's load on a
shared machine hits both alike; latencies are medians and p90s over all timed runs after
warm-up. Peak memory is measured per model in a fresh subprocess (ru_maxrss: load + a few
forward passes; the peak counter is reset after loading), beside the process's resident memory
right after loading and its baseline before.

What `against` may be: a run directory (its gated model with the gates baked in, dense shapes:
same logits as the compressed model), a dense Hugging Face folder, or nothing: then the run
recorded in MODEL_DIR/compress_report.json.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..compression.saved import load as load_compressed
from ..core.arch import spec_for
from ..export import input_names
from ..loaders import load_any


@dataclass
class BenchConfig:
    """Benchmark settings (the CLI's `bench` options)."""

    threads: int = field(default=2, metadata={"help": "CPU threads."})
    batch: int = field(default=8, metadata={"help": "Batch size."})
    seq: int = field(default=128, metadata={"help": "Sequence length (tokens)."})
    runs: int = field(default=30, metadata={"help": "Timed forward passes per model."})
    warmup: int = field(default=5, metadata={"help": "Untimed warm-up passes per model."})
    blocks: int = field(default=5, metadata={"help": "Timed runs are split into this many alternating blocks."})
    onnx: bool = field(default=False, metadata={"help": "Also export and time ONNX Runtime."})
    int8: bool = field(default=False, metadata={
        "help": "Also time int8 ONNX Runtime (dynamic quantization; implies --onnx)."})
    memory: bool = field(default=True, metadata={"help": "Measure peak memory (subprocesses)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random token inputs."})

    def __post_init__(self) -> None:
        if min(self.threads, self.batch, self.seq, self.runs, self.blocks) < 1 or self.warmup < 0:
            raise ValueError("bench: threads, batch, seq, runs and blocks must be >= 1, warmup >= 0")
        self.onnx = self.onnx or self.int8


def default_against(model_dir) -> str:
    report = Path(model_dir) / "compress_report.json"
    if not report.is_file():
        raise ValueError(f"{model_dir}: no compress_report.json; say what to compare with (--against)")
    return json.loads(report.read_text())["run_dir"]


def make_inputs(model: nn.Module, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    vocab = getattr(model.config, "vocab_size", 1000)
    ids = torch.randint(5, max(6, vocab - 1), (batch, seq), generator=gen)
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    return {n: full[n] for n in input_names(model)}


def param_counts(model: nn.Module) -> dict[str, int]:
    from ..compression.exact import layer_params
    from ..core.model import count_params

    return {"params": count_params(model), "layer_params": layer_params(model)}


# ---- timing --------------------------------------------------------------------------------------
def _torch_runner(model: nn.Module, inputs: dict):
    extra = {"use_cache": False} if spec_for(model).decoder else {}

    def run() -> None:
        with torch.inference_mode():
            model(**inputs, **extra)

    return run


def _ort_runner(onnx_path, inputs: dict, threads: int):
    from ..export import ort_feed, ort_session

    session = ort_session(onnx_path, threads)
    feed = ort_feed(session, inputs)
    return lambda: session.run(None, feed)


def time_interleaved(runners: dict, runs: int, warmup: int, blocks: int) -> dict[str, list[float]]:
    """Milliseconds per call of each runner, timed in alternating blocks."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times = {k: [] for k in runners}
    per_block = [runs // blocks + (i < runs % blocks) for i in range(blocks)]
    for n in per_block:
        for name, run in runners.items():
            for _ in range(n):
                t0 = time.perf_counter()
                run()
                times[name].append(1e3 * (time.perf_counter() - t0))
    return times


def summarize(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    return {"median": statistics.median(s), "p90": s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))],
            "min": s[0], "mean": statistics.fmean(s)}


# ---- memory (subprocess) --------------------------------------------------------------------------
def _status_mb(key: str) -> float:
    """VmRSS / VmHWM (peak) of this process from /proc, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_worker(args: dict) -> dict:
    """Run in a fresh process: load one model (or ONNX session), reset the peak, run a few passes.

    `peak_rss_mb` is the process's peak resident memory while serving (the peak counter is reset
    after loading, via /proc/self/clear_refs, so a dense model built and then cut at load time
    does not count); `loaded_rss_mb` is the resident memory right after loading.
    """
    import gc

    torch.set_num_threads(args["threads"])
    base = _status_mb("VmRSS")
    if args.get("onnx"):
        from ..export import ort_feed, ort_session

        session = ort_session(args["onnx"], args["threads"])
        ids = torch.randint(5, 100, (args["batch"], args["seq"]))
        feed = ort_feed(session, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        run = lambda: session.run(None, feed)  # noqa: E731
    else:
        model, _ = load_any(args["model"])
        run = _torch_runner(model, make_inputs(model, args["batch"], args["seq"]))
    gc.collect()
    loaded = _status_mb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    except OSError:
        pass
    for _ in range(3):
        run()
    return {"peak_rss_mb": _status_mb("VmHWM"), "loaded_rss_mb": loaded, "baseline_rss_mb": base}


def peak_memory(model_path, cfg: BenchConfig, onnx_path=None) -> dict:
    args = {"model": str(model_path), "threads": cfg.threads, "batch": cfg.batch, "seq": cfg.seq,
            "onnx": str(onnx_path) if onnx_path else None}
    code = "import json,sys; from finegates.bench.latency import memory_worker; print(json.dumps(memory_worker(json.loads(sys.argv[1]))))"
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads), "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the benchmark ------------------------------------------------------------------------------
def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime
    import transformers

    return {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__}


def bench(model_dir, against=None, cfg: BenchConfig | None = None, onnx_dir=None, shapes_only: bool = False) -> dict:
    """Time and size the compressed model at MODEL_DIR against its dense counterpart.

    ONNX files go to `onnx_dir` (reused when already there) or a temporary folder. `shapes_only`
    times a compressed folder without its weights: random values at its recorded widths.
    """
    cfg = cfg or BenchConfig()
    against = against or default_against(model_dir)
    torch.set_num_threads(cfg.threads)
    if shapes_only:
        compressed, kind_c = load_compressed(model_dir, weights=False), "compressed (shapes only, random weights)"
    else:
        compressed, kind_c = load_any(model_dir)
    dense, kind_d = load_any(against)
    inputs = make_inputs(dense, cfg.batch, cfg.seq, cfg.seed)
    load_before = os.getloadavg()
    times = time_interleaved({"dense": _torch_runner(dense, inputs), "compressed": _torch_runner(compressed, inputs)},
                             cfg.runs, cfg.warmup, cfg.blocks)
    result = {
        "model_dir": str(model_dir), "against": str(against), "kinds": {"dense": kind_d, "compressed": kind_c},
        "settings": {**asdict(cfg), "dtype": "float32"},
        "params": {"dense": param_counts(dense), "compressed": param_counts(compressed)},
        "torch": {k: summarize(v) for k, v in times.items()},
    }
    result["latency_ms_dense"] = result["torch"]["dense"]["median"]
    result["latency_ms_compressed"] = result["torch"]["compressed"]["median"]
    result["latency_ratio"] = result["latency_ms_compressed"] / result["latency_ms_dense"]
    result["p90_ratio"] = result["torch"]["compressed"]["p90"] / result["torch"]["dense"]["p90"]
    if cfg.onnx:
        with tempfile.TemporaryDirectory() as tmp:
            _bench_onnx(result, {"dense": (dense, against), "compressed": (compressed, model_dir)},
                        inputs, cfg, Path(onnx_dir or tmp))
    if cfg.memory:
        result["memory_mb"] = {k: peak_memory(m, cfg) for k, m in (("dense", against), ("compressed", model_dir))}
    p = result["params"]
    result["params_removed_fraction"] = 1 - p["compressed"]["params"] / p["dense"]["params"]
    result["layer_params_removed_fraction"] = 1 - p["compressed"]["layer_params"] / p["dense"]["layer_params"]
    result["load_avg"] = {"before": list(load_before), "after": list(os.getloadavg())}
    result["machine"] = machine_info()
    return result


def _bench_onnx(result: dict, models: dict, inputs: dict, cfg: BenchConfig, folder: Path) -> None:
    from ..export import export_onnx, quantize_int8

    paths = {}
    for name, (model, _) in models.items():
        paths[name] = folder / f"{name}.onnx"
        if not paths[name].is_file():
            export_onnx(model, paths[name])
        if cfg.int8:
            paths[f"{name}-int8"] = folder / f"{name}-int8.onnx"
            if not paths[f"{name}-int8"].is_file():
                quantize_int8(paths[name], paths[f"{name}-int8"])
    runners = {k: _ort_runner(p, inputs, cfg.threads) for k, p in paths.items()}
    ort_times = time_interleaved(runners, cfg.runs, cfg.warmup, cfg.blocks)
    result["onnxruntime"] = {k: summarize(v) for k, v in ort_times.items()}
    result["ort_latency_ms_dense"] = result["onnxruntime"]["dense"]["median"]
    result["ort_latency_ms_compressed"] = result["onnxruntime"]["compressed"]["median"]
    result["ort_latency_ratio"] = result["ort_latency_ms_compressed"] / result["ort_latency_ms_dense"]
    if cfg.int8:
        result["ort_int8_latency_ms_dense"] = result["onnxruntime"]["dense-int8"]["median"]
        result["ort_int8_latency_ms_compressed"] = result["onnxruntime"]["compressed-int8"]["median"]
    if cfg.memory:
        result["memory_mb_onnxruntime"] = {k: peak_memory(src, cfg, paths[k]) for k, (_, src) in models.items()}
    result["onnx_mb"] = {k: p.stat().st_size / 2**20 for k, p in paths.items()}


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = result["settings"]
    table = Table(title=f"bench: batch {s['batch']} x seq {s['seq']}, {s['threads']} threads, "
                        f"{s['runs']} runs (load {result['load_avg']['before'][0]:.1f})")
    for col, just in (("", "left"), ("dense", "right"), ("compressed", "right"), ("ratio", "right")):
        table.add_column(col, justify=just)
    p = result["params"]
    for key, label in (("params", "params (whole model)"), ("layer_params", "params (transformer layers)")):
        d, c = p["dense"][key], p["compressed"][key]
        table.add_row(label, f"{d:,}", f"{c:,}", f"{c / d:.3f}")
    ort = result.get("onnxruntime", {})
    for r, suffix, label in ((result["torch"], "", "PyTorch"), (ort, "", "ONNX Runtime"),
                             (ort, "-int8", "ONNX Runtime int8")):
        if "dense" + suffix in r:
            for stat in ("median", "p90"):
                d, c = r["dense" + suffix][stat], r["compressed" + suffix][stat]
                table.add_row(f"{label} latency {stat} (ms)", f"{d:.1f}", f"{c:.1f}", f"{c / d:.3f}")
    for key, label in (("memory_mb", "peak RSS PyTorch (MB)"), ("memory_mb_onnxruntime", "peak RSS ORT (MB)")):
        m = result.get(key)
        if m and "peak_rss_mb" in m["dense"] and "peak_rss_mb" in m["compressed"]:
            d, c = m["dense"]["peak_rss_mb"], m["compressed"]["peak_rss_mb"]
            table.add_row(label, f"{d:.0f}", f"{c:.0f}", f"{c / d:.3f}")
    Console().print(table)
