"""SmolLM2 LM benchmark, the GPU step (`python3 benchmarks/smollm2_lm.py gpu`; see smollm2_lm.py):
convert the GGUF, train gates at each target as concurrent workers, prune the no-training
baselines, compress everything and measure perplexity."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from benchmarks.runner import quiet  # noqa: E402
from benchmarks.smollm2_lm import (  # noqa: E402
    DATA_HERE, PACK1, PREFIX, RECIPE_OPTIONS, ROOT, SCRIPT, STRIDE, TEST_FILE, TRAIN_FILE, VARIANTS, WINDOW,
    _assemble, _convert, _env, _install_gguf, log,
)


def _ppl(model, ids, prefix: int = PREFIX) -> dict:
    from finegates.training.perplexity import perplexity

    full = perplexity(model, ids, WINDOW, STRIDE, batch_size=8, amp=False)
    pre = perplexity(model, ids[:prefix], WINDOW, STRIDE, batch_size=8, amp=False)
    return {"perplexity": full["perplexity"], "nll": full["nll"], "tokens": full["tokens"],
            "prefix_tokens": prefix, "prefix_perplexity": pre["perplexity"], "prefix_nll": pre["nll"]}


def _logit_check(a, b, ids, n: int = 2, length: int = 256) -> float:
    import torch

    dev = next(a.parameters()).device
    x = ids[: n * length].view(n, length).to(dev)
    with torch.no_grad():
        return float((a(input_ids=x, use_cache=False).logits.float() - b(input_ids=x, use_cache=False).logits.float())
                     .abs().max())


def _compressed_entry(gated, ids, full: bool) -> dict:
    """Compress a copy of a gated model, measure it; returns counts, perplexity, logit diff."""
    import copy

    from finegates.compression.exact import compress, layer_params, linear_params
    from finegates.core.model import count_params

    dense_layers = layer_params(gated)
    device = next(gated.parameters()).device
    small = compress(copy.deepcopy(gated).cpu()).to(device)  # compression itself runs on CPU
    entry = {"params": count_params(small), "layer_params": layer_params(small),
             "layer_params_removed_fraction": 1 - layer_params(small) / dense_layers,
             "linear_params": linear_params(small), "max_abs_logit_diff_vs_gated": _logit_check(gated, small, ids)}
    entry.update(_ppl(small, ids) if full else {"prefix_perplexity": _ppl_prefix(small, ids)})
    del small
    return entry


def _ppl_prefix(model, ids) -> float:
    from finegates.training.perplexity import perplexity

    return perplexity(model, ids[:PREFIX], WINDOW, STRIDE, batch_size=8, amp=False)["perplexity"]


def _baseline_run_dir(d: Path, model, folder: str, fingerprint: str, gate_cfg, method: str, allocation: str,
                      sparsity: float, test_file: Path) -> None:
    """A run directory `report` rebuilds like an LM gates run: config.json + every gate theta."""
    from dataclasses import asdict

    from finegates.training.checkpoint import FORMAT_VERSION, save_trainable

    d.mkdir(parents=True, exist_ok=True)
    thetas = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if n.endswith("theta")}
    save_trainable(d / "trainable.safetensors", model, fingerprint, 0, thetas)
    (d / "config.json").write_text(json.dumps({
        "format_version": FORMAT_VERSION, "objective": "lm", "task": "lm", "model_location": folder,
        "fingerprint": fingerprint, "method_config": {"gate": asdict(gate_cfg), "criterion": method,
                                                      "allocation": allocation},
        "train": {"method": method, "sparsity": sparsity, "block_size": WINDOW, "eval_text_file": str(test_file)},
    }, indent=1, default=str) + "\n")


def _baselines(folder: str, ids, train_ids, work: Path, deadline: float, targets, test_file: Path,
               calib_blocks: int) -> list[dict]:
    """Structured magnitude and Wanda-style pruning at each target: no training."""
    import torch

    from finegates.training.methods.magnitude import FIXED_GATES, OPEN, activation_norms, prune_structured
    from finegates.training.checkpoint import model_fingerprint
    from finegates.loaders import load_causal_lm
    from finegates.core.model import GateConfig, apply_gates, gate_parameters

    model = load_causal_lm(folder)
    fp = model_fingerprint(model)
    gate_cfg = GateConfig(param=FIXED_GATES, train_bias=False, train_head=False)
    apply_gates(model, gate_cfg)
    model.cuda().eval() if torch.cuda.is_available() else model.eval()
    calib = [{"input_ids": b[None]} for b in train_ids[: calib_blocks * WINDOW].view(-1, WINDOW)]
    t0 = time.time()
    norms = activation_norms(model, calib)
    log(f"wanda calibration: {len(calib)} x {WINDOW} tokens of the training text, {time.time() - t0:.1f}s")
    out = []
    plan = [(c, a, s) for c, a in (("magnitude", "uniform"), ("wanda", "uniform"), ("magnitude", "global"),
                                     ("wanda", "global")) for s in targets]
    for criterion, allocation, s in plan:
        if time.time() > deadline:
            log(f"deadline: skipping {criterion}-{allocation}@{s}")
            continue
        with torch.no_grad():
            for p in gate_parameters(model):
                p.fill_(OPEN)
        removed = prune_structured(model, s, allocation, norms if criterion == "wanda" else None)
        name = f"{criterion}-{allocation}@{s:.2f}"
        t0 = time.time()
        entry = {"name": name, "kind": criterion, "allocation": allocation, "target": s,
                 "removed_linear_fraction": removed, "run_dir": f"runs/{name}",
                 "gated_prefix_perplexity": _ppl_prefix(model, ids),
                 "compressed": _compressed_entry(model, ids, full=True)}
        entry["perplexity"] = entry["compressed"]["perplexity"]
        _baseline_run_dir(work / "runs" / name, model, folder, fp, gate_cfg, criterion, allocation, s, test_file)
        out.append(entry)
        log(f"{name}: removed {removed:.3f}, perplexity {entry['perplexity']:.3f} "
            f"(prefix gated {entry['gated_prefix_perplexity']:.4f} / compressed "
            f"{entry['compressed']['prefix_perplexity']:.4f}), {time.time() - t0:.0f}s")
    return out


def cmd_gpu(args) -> None:
    t_start = time.time()
    deadline = t_start + args.budget_s
    sys.path.insert(0, str(ROOT / "src"))
    out = Path(args.out)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "runs").mkdir(parents=True)
    if not args.model:
        _install_gguf(work / "site")  # before transformers is imported: it looks for gguf once, at import
    quiet()
    import torch

    out.mkdir(parents=True, exist_ok=True)
    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "python": sys.version.split()[0]}
    import transformers

    info["transformers"] = transformers.__version__
    log(f"machine: {info}")
    if args.model:
        folder = str(Path(args.model).resolve())
    else:
        gguf = _assemble(work)
        t0 = time.time()
        folder = str(_convert(gguf, work / "cache"))
        info["convert_seconds"] = round(time.time() - t0, 1)
        log(f"converted {gguf.name} -> {folder} in {info['convert_seconds']}s")
        gguf.unlink()
    data = Path(args.data) if args.data else (PACK1 / "data" if (PACK1 / "data").is_dir() else DATA_HERE)
    train_file, test_file = data / TRAIN_FILE, data / TEST_FILE

    # gate trainings: one process each, started now, training until the shared deadline
    jobs = []
    train_end = deadline - args.reserve_s
    variants = {v: VARIANTS[v] for v in args.variants}
    for variant, distill in variants.items():
        for s in args.targets:
            name = f"{variant}@{s:.2f}"
            jobs.append({"name": name, "variant": variant, "distill": distill, "sparsity": s, "folder": folder,
                         "train_file": str(train_file), "test_file": str(test_file), "out": str(work / "runs" / name),
                         "train_end": train_end, "n_jobs": len(variants) * len(args.targets),
                         "ready_dir": str(work / "ready"), "max_steps": args.max_steps, "min_steps": args.min_steps,
                         "batch_size": args.batch_size, "eval_tokens": args.eval_tokens,
                         "calib_steps": args.calib_steps})
    (work / "ready").mkdir()
    procs = []
    for job in jobs:
        logf = open(work / "runs" / f"{job['name']}.log", "w")
        procs.append((subprocess.Popen([sys.executable, str(SCRIPT), "worker", json.dumps(job)],
                                       stdout=logf, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT), job, logf))
    log(f"started {len(procs)} gate trainings; they stop training at +{train_end - t_start:.0f}s")

    # meanwhile, here: dense perplexity and the no-training baselines
    from finegates.core.model import count_params
    from finegates.compression.exact import layer_params, linear_params
    from finegates.data.text import eval_ids
    from finegates.loaders import load_causal_lm
    from finegates.loaders import load_tokenizer

    tok = load_tokenizer(folder)
    ids = eval_ids(test_file, tok, args.eval_tokens)
    train_ids = eval_ids(train_file, tok)
    dense = load_causal_lm(folder)
    if torch.cuda.is_available():
        dense.cuda()
    t0 = time.time()
    dense_entry = {"name": "dense", "kind": "dense", "target": 0.0, **_ppl(dense, ids),
                   "params": count_params(dense), "layer_params": layer_params(dense),
                   "linear_params": linear_params(dense)}
    log(f"dense: perplexity {dense_entry['perplexity']:.4f} on {dense_entry['tokens']} test tokens "
        f"(prefix {PREFIX}: {dense_entry['prefix_perplexity']:.4f}), {time.time() - t0:.0f}s")
    del dense
    baseline_targets = args.targets if args.baseline_targets is None else args.baseline_targets
    baselines = _baselines(folder, ids, train_ids, work, train_end + 30, baseline_targets, test_file,
                           args.calib_blocks) if baseline_targets else []

    # wait for the trainings (each writes runs/NAME/result.json), kill what outlives the deadline
    while any(p.poll() is None for p, _, _ in procs) and time.time() < deadline:
        time.sleep(2)
    gates = []
    for p, job, logf in procs:
        if p.poll() is None:
            p.kill()
            log(f"killed {job['name']} at the deadline")
        logf.close()
        res = Path(job["out"]) / "result.json"
        if res.is_file():
            gates.append(json.loads(res.read_text()))
            g = gates[-1]
            log(f"{job['name']}: {g['steps']} steps, removed {g['removed_linear_fraction']:.3f}, perplexity gated "
                f"{g['perplexity']:.4f} / compressed {g['compressed'].get('perplexity', float('nan')):.4f}")
        elif (Path(job["out"]) / "metrics.json").is_file():  # trained, cut off while compressing
            m = json.loads((Path(job["out"]) / "metrics.json").read_text())
            gates.append({"name": job["name"], "kind": job["variant"], "target": job["sparsity"],
                          "run_dir": f"runs/{job['name']}", "steps": m["steps"], "perplexity": m["perplexity"],
                          "removed_linear_fraction": m["removable_fraction"], "compressed": {}})
            log(f"{job['name']}: trained ({m['steps']} steps, perplexity {m['perplexity']:.4f}), compressed "
                "perplexity not measured (deadline)")
        else:
            log(f"{job['name']}: no result (exit {p.returncode}); log tail:\n" +
                "".join((work / "runs" / f"{job['name']}.log").read_text().splitlines(True)[-15:]))

    results = {"machine": info, "model_folder": folder, "train_text": TRAIN_FILE, "eval_text": TEST_FILE,
               "window": WINDOW, "stride": STRIDE, "prefix_tokens": PREFIX, "eval_precision": "fp32 (no autocast)",
               "train_precision": "bf16 autocast", "recipe": "fast", "recipe_options": RECIPE_OPTIONS,
               "seconds": round(time.time() - t_start, 1), "dense": dense_entry, "gates": gates, "baselines": baselines}
    (work / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    shutil.copyfile(work / "results.json", out / "smollm2_gpu.json")
    with tarfile.open(out / "smollm2_gpu.tar.gz", "w:gz") as tar:
        tar.add(work / "results.json", arcname="results.json")
        for d in sorted((work / "runs").iterdir()):
            tar.add(d, arcname=f"runs/{d.name}")
    log(f"wrote {out / 'smollm2_gpu.tar.gz'} ({(out / 'smollm2_gpu.tar.gz').stat().st_size / 2**20:.1f} MiB) in "
        f"{time.time() - t_start:.0f}s")


# ==== worker (one gate training, started by `gpu`) ==================================================
def _calibrate(job: dict, cfg, blocks_) -> float:
    """Seconds per training step of this configuration, measured while every worker measures."""
    import torch

    from finegates.training.runtime import autocast as _autocast
    from finegates.loaders import load_causal_lm
    from finegates.training.methods.registry import get_method
    from finegates.training.runtime import pick_device

    device = pick_device(cfg.device)
    model = load_causal_lm(str(job["folder"])).to(device)
    method = get_method("gates")
    groups = method.prepare(model, cfg, 1000)
    model.to(device)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    ready = Path(job["ready_dir"])
    (ready / job["name"]).touch()
    t0 = time.time()
    while len(list(ready.iterdir())) < job["n_jobs"] and time.time() - t0 < 90:
        time.sleep(0.5)
    times = []
    for i in range(job["calib_steps"]):
        t = time.perf_counter()
        x = blocks_[i % len(blocks_): i % len(blocks_) + cfg.batch_size].to(device)
        with _autocast(device):
            out = model(input_ids=x, labels=x, use_cache=False)
        extra, _ = method.extra_loss(model, 300, {"input_ids": x, "labels": x}, out)
        loss = out.loss.float() + extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        method.progress()
        loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    method.finish(model)
    del model, method, opt, groups
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times[min(3, len(times) - 1):])


def cmd_worker(job_json: str) -> None:
    job = json.loads(job_json)
    sys.path.insert(0, str(ROOT / "src"))
    quiet()
    import torch

    torch.set_num_threads(2)
    from finegates.training.config import LMConfig
    from finegates.data.text import eval_ids, pack, tokenize_files
    from finegates.loaders import load_lm_run
    from finegates.training.lm import train_lm
    from finegates.loaders import load_tokenizer

    def config(steps: int) -> LMConfig:
        return LMConfig(
            out=Path(job["out"]), model=job["folder"], text_files=(Path(job["train_file"]),),
            eval_text_file=Path(job["test_file"]), block_size=WINDOW, window=WINDOW, stride=STRIDE,
            eval_tokens=job["eval_tokens"], eval_dense=False, eval_amp=False, method="gates", recipe="fast",
            recipe_options=dict(RECIPE_OPTIONS), distill=job["distill"], sparsity=job["sparsity"], epochs=1e6,
            max_steps=steps, batch_size=job["batch_size"], eval_batch_size=8, schedule="constant", evals=1,
            trace_every=25, progress=False, device="auto")

    tok = load_tokenizer(job["folder"])
    blocks_ = pack(tokenize_files([Path(job["train_file"])], tok), WINDOW)
    t_step = _calibrate(job, config(1000), blocks_)
    left = job["train_end"] - time.time() - 15  # model load + tokenization in train_lm
    steps = max(job["min_steps"], min(job["max_steps"], int(left / (t_step * 1.1))))
    log(f"{job['name']}: {t_step * 1e3:.0f} ms/step measured; {left:.0f}s left -> {steps} steps")
    metrics = train_lm(config(steps), overwrite=True)  # the job's own run folder: a re-run replaces it
    log(f"{job['name']}: trained, perplexity {metrics['perplexity']:.4f}, removed {metrics['removable_fraction']:.3f}")

    # rebuild from the run directory (what `report` does), compress, measure again
    gated, tok, _ = load_lm_run(job["out"])
    if torch.cuda.is_available():
        gated.cuda()
    ids = eval_ids(Path(job["test_file"]), tok, job["eval_tokens"])
    result = {"name": job["name"], "kind": job["variant"], "target": job["sparsity"], "run_dir": f"runs/{job['name']}",
              "steps": metrics["steps"], "seconds_per_step": metrics["seconds_per_step"], "calibrated_step_s": t_step,
              "train_seconds": metrics["train_seconds"], "train_tokens": metrics["train_tokens"],
              "peak_memory_mb": metrics["peak_memory_mb"], "removed_linear_fraction": metrics["removable_fraction"],
              "perplexity": metrics["perplexity"], "tokens": metrics["dev"]["tokens"],
              "gated_prefix_perplexity": _ppl_prefix(gated, ids),
              "compressed": _compressed_entry(gated, ids, full=True)}
    (Path(job["out"]) / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    log(f"{job['name']}: compressed perplexity {result['compressed']['perplexity']:.4f}")
