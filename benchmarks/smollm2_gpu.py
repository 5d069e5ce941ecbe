"""SmolLM2 LM benchmark, the GPU steps (`python3 benchmarks/smollm2_lm.py baselines|model`; see
smollm2_lm.py): the no-training baselines in one call, then one gate model per call, each alone
for a fixed budget. Every model is compressed and its perplexity measured again (fp32)."""

from __future__ import annotations

import copy
import json
import shutil
import sys
import tarfile
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.runner import quiet  # noqa: E402
from benchmarks.smollm2_lm import (  # noqa: E402
    BACK_LIMIT, CORPORA, PREFIX, ROOT, STRIDE, TEST, WINDOW, WORK, data_file, log, model_folder, work_data,
)


def _setup(args) -> tuple[str, Path, dict]:
    """(model folder, data folder, machine info) on the GPU machine; finegates importable."""
    sys.path.insert(0, str(ROOT / "src"))
    quiet()
    import torch
    import transformers

    folder = str(Path(args.model).resolve()) if args.model else str(model_folder())
    data = Path(args.data) if args.data else work_data()
    info = {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "python": sys.version.split()[0]}
    log(f"machine: {info}")
    return folder, data, info


def _device_model(model):
    import torch

    return model.cuda() if torch.cuda.is_available() else model


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


def _compressed_entry(gated, ids) -> dict:
    """Compress a copy of a gated model, measure it: counts, perplexity, max logit difference to the gated one."""
    from finegates.compression.exact import compress, layer_params, linear_params
    from finegates.core.model import count_params

    dense_layers = layer_params(gated)
    device = next(gated.parameters()).device
    small = compress(copy.deepcopy(gated).cpu()).to(device)  # compression itself runs on CPU
    entry = {"params": count_params(small), "layer_params": layer_params(small),
             "layer_params_removed_fraction": 1 - layer_params(small) / dense_layers,
             "linear_params": linear_params(small), "max_abs_logit_diff_vs_gated": _logit_check(gated, small, ids),
             "heads": sum(len(p["attn"]["heads"]) for p in small.config.finegates["layers"]),
             "mlp_units": sum(len(p["mlp"]) for p in small.config.finegates["layers"]), **_ppl(small, ids)}
    del small
    return entry


def _test_ids(tok, data: Path, limit: int | None):
    from finegates.data.text import eval_ids

    return eval_ids(data_file(TEST, data), tok, limit)


def _pack(out: Path, name: str, folders: list[Path], arcroot: Path) -> Path:
    """One tarball of run folders (no checkpoints) under $OUT, refused if it could not come back."""
    path = out / f"{name}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for d in folders:
            tar.add(d, arcname=str(d.relative_to(arcroot)), filter=lambda t: None if "/checkpoint" in t.name else t)
    if path.stat().st_size > BACK_LIMIT:
        sys.exit(f"error: {path.name} is {path.stat().st_size / 2**20:.1f} MiB, over the 16 MiB a file may come back")
    return path


# ==== baselines ======================================================================================
def _baseline_run_dir(d: Path, model, folder: str, fingerprint: str, gate_cfg, criterion: str, allocation: str,
                      sparsity: float, extra_tensors: tuple[str, ...] = ()) -> None:
    """A run directory `report` rebuilds like an LM gates run: config.json + every gate theta (+ the
    tensors whose names end in `extra_tensors`: FLAP's compensation biases)."""
    from finegates.training.checkpoint import FORMAT_VERSION, save_trainable

    d.mkdir(parents=True, exist_ok=True)
    keep = ("theta", *extra_tensors)
    tensors = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if n.endswith(keep)}
    save_trainable(d / "trainable.safetensors", model, fingerprint, 0, tensors)
    (d / "config.json").write_text(json.dumps({
        "format_version": FORMAT_VERSION, "objective": "lm", "task": "lm", "model_location": folder,
        "fingerprint": fingerprint, "method_config": {"gate": asdict(gate_cfg), "criterion": criterion,
                                                      "allocation": allocation, "added_bias": bool(extra_tensors)},
        "train": {"method": criterion, "sparsity": sparsity, "block_size": WINDOW, "eval_text_file": TEST},
    }, indent=1, default=str) + "\n")


def cmd_baselines(args) -> None:
    """Dense perplexity, then magnitude / Wanda-style (uniform and global) and FLAP-style at each target."""
    t_start = time.time()
    folder, data, info = _setup(args)
    out, work = Path(args.out), WORK / "baselines"
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    (work / "runs").mkdir(parents=True)
    import torch

    from finegates.compression.exact import layer_params, linear_params
    from finegates.core.model import GateConfig, apply_gates, count_params, gate_parameters
    from finegates.data.text import tokenize_files
    from finegates.loaders import load_causal_lm, load_tokenizer
    from finegates.training.checkpoint import model_fingerprint
    from finegates.training.methods.flap import FLAP_GATES, fluctuation_stats, prune_flap
    from finegates.training.methods.magnitude import FIXED_GATES, OPEN, activation_norms, prune_structured

    tok = load_tokenizer(folder)
    ids = _test_ids(tok, data, args.eval_tokens)
    train_ids = tokenize_files([data_file(CORPORA["wikitext2-train"], data)], tok, drop_unk_words=True)
    calib = [{"input_ids": b[None]} for b in train_ids[: args.calib_blocks * WINDOW].view(-1, WINDOW)]
    dense = _device_model(load_causal_lm(folder).eval())
    t0 = time.time()
    dense_entry = {"name": "dense", "kind": "dense", "target": 0.0, **_ppl(dense, ids), "params": count_params(dense),
                   "layer_params": layer_params(dense), "linear_params": linear_params(dense)}
    log(f"dense: perplexity {dense_entry['perplexity']:.4f} on {dense_entry['tokens']} test tokens, {time.time() - t0:.0f}s")
    fp = model_fingerprint(dense)
    del dense

    def measure(model, name, kind, allocation, s, removed, gate_cfg, extra=()) -> dict:
        t0 = time.time()
        entry = {"name": name, "kind": kind, "target": s, "allocation": allocation, "removed_linear_fraction": removed,
                 "run_dir": f"runs/{name}", "recipe": None, "train_tokens": 0, "steps": 0,
                 "compressed": _compressed_entry(model, ids)}
        entry["perplexity"] = entry["compressed"]["perplexity"]
        _baseline_run_dir(work / "runs" / name, model, folder, fp, gate_cfg, kind, allocation, s, extra)
        log(f"{name}: removed {removed:.3f}, perplexity {entry['perplexity']:.3f}, {time.time() - t0:.0f}s")
        return entry

    rows, skipped = [], []
    gate_cfg = GateConfig(param=FIXED_GATES, train_bias=False, train_head=False)
    model = _device_model(apply_gates(load_causal_lm(folder), gate_cfg).eval())
    t0 = time.time()
    norms = activation_norms(model, calib)
    log(f"wanda calibration: {len(calib)} x {WINDOW} tokens of WikiText-2 train, {time.time() - t0:.1f}s")
    stats = None
    # the report's rows first (uniform allocation, FLAP), the global allocations last: a call that
    # nears its budget skips what is left and still writes everything it measured
    jobs = [(c, a, s) for c, a in (("magnitude", "uniform"), ("wanda", "uniform"), ("flap", "adaptive"),
                                   ("flap-mlp", "adaptive"), ("magnitude", "global"), ("wanda", "global"))
            for s in args.targets]
    for criterion, allocation, s in jobs:
        name = f"{criterion}-{allocation}@{s:.2f}" if allocation != "adaptive" else f"{criterion}@{s:.2f}"
        if time.time() > t_start + args.budget_s:
            skipped.append(name)
            continue
        if criterion.startswith("flap"):  # FLAP adds biases: a fresh model for each
            flap_model = _device_model(apply_gates(load_causal_lm(folder), FLAP_GATES).eval())
            stats = stats or fluctuation_stats(flap_model, calib)  # of the dense model: the same for every one
            removed = prune_flap(flap_model, s, stats, heads=criterion == "flap")
            rows.append(measure(flap_model, name, criterion, allocation, s, removed, FLAP_GATES, ("bias",)))
            del flap_model
            continue
        with torch.no_grad():
            for p in gate_parameters(model):
                p.fill_(OPEN)
        removed = prune_structured(model, s, allocation, norms if criterion == "wanda" else None)
        rows.append(measure(model, name, criterion, allocation, s, removed, gate_cfg))
    del model
    if skipped:
        log(f"budget of {args.budget_s:.0f}s reached: skipped {', '.join(skipped)}")
    results = {"machine": info, "model_folder": folder, "eval_text": TEST, "window": WINDOW, "stride": STRIDE,
               "prefix_tokens": PREFIX, "eval_precision": "fp32 (no autocast)", "calib_blocks": len(calib),
               "seconds": round(time.time() - t_start, 1), "dense": dense_entry, "baselines": rows,
               "skipped": skipped}
    (work / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    shutil.copyfile(work / "results.json", out / "baselines.json")
    path = _pack(out, "baselines", sorted((work / "runs").iterdir()), work)
    log(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) in {time.time() - t_start:.0f}s")


# ==== one gate model ===================================================================================
def _options(items: list[str]) -> dict:
    """`--opt KEY=VALUE` recipe overrides, values read as JSON (`kd_weight=1.0`, `reg.units=["mlp","vo"]`)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"error: --opt {item!r}: expected KEY=VALUE")
        out[key] = json.loads(value)
    return out


def _lm_config(args, folder: str, data: Path, out: Path, steps: int, eval_tokens: int | None):
    from finegates.training.config import LMConfig

    return LMConfig(
        out=out, model=folder, text_files=tuple(data_file(CORPORA[c], data) for c in args.corpora),
        eval_text_file=data_file(TEST, data), block_size=WINDOW, window=WINDOW, stride=STRIDE, eval_tokens=eval_tokens,
        eval_dense=False, eval_amp=False, method="gates", recipe=args.recipe, recipe_options=_options(args.opt),
        sparsity=args.target, epochs=1e6, max_steps=steps, batch_size=args.batch_size, eval_batch_size=8,
        schedule="cosine", warmup_steps=max(1, steps // 50), evals=1, trace_every=50, log_every=100,
        progress=False, device="auto", cuda_graphs=False)  # eager, as every measured run was (sessions 3-5)


def _cached_tokenization():
    """The calibration run and the real one tokenize the same text: once per process (~10-20 s)."""
    import finegates.training.lm as lm

    real, cache = lm.tokenize_corpus, {}

    def cached(paths, tokenizer, drop):
        key = (tuple(str(p) for p in paths), drop)
        if key not in cache:
            cache[key] = real(paths, tokenizer, drop)
        return cache[key]

    lm.tokenize_corpus = cached


def cmd_model(args) -> None:
    """Train one recipe at one target alone, sized to `--minutes`; compress and measure it."""
    t_start = time.time()
    deadline = t_start + 60 * args.minutes
    folder, data, info = _setup(args)
    import torch

    from finegates.loaders import load_lm_run
    from finegates.training.lm import train_lm

    name = f"{args.recipe}@{args.target:.2f}" + ("+" + "+".join(args.opt) if args.opt else "")
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    out, work = Path(args.out), WORK / "models"
    out.mkdir(parents=True, exist_ok=True)
    _cached_tokenization()
    t0 = time.time()  # calibration: the same configuration for a few steps, on a short evaluation
    calib = train_lm(_lm_config(args, folder, data, work / "calib" / safe, args.calib_steps, 2 * WINDOW), overwrite=True)
    t_step = calib["steady_seconds_per_step"] or calib["seconds_per_step"]
    overhead = time.time() - t0 - calib["train_seconds"]  # load, tokenize, teacher copy, short evaluation
    left = deadline - time.time() - overhead - args.reserve_s
    if left <= t_step * args.calib_steps:
        log(f"{name}: warning: loading and measuring leave no time for training within {args.minutes} min; "
            f"training the minimum of {args.calib_steps} steps (the JSON's minutes show the overrun)")
    steps = max(args.calib_steps, int(left / (t_step * args.step_margin)))
    steps = min(steps, args.max_steps) if args.max_steps else steps
    log(f"{name}: {t_step * 1e3:.0f} ms/step measured over {args.calib_steps} steps, overhead {overhead:.0f}s; "
        f"{left:.0f}s left for training -> {steps} steps of {args.batch_size} x {WINDOW} tokens")
    run_dir = work / "runs" / safe
    metrics = train_lm(_lm_config(args, folder, data, run_dir, steps, args.eval_tokens), overwrite=True)
    t_trained = time.time()
    log(f"{name}: trained {metrics['steps']} steps in {metrics['train_seconds']:.0f}s, perplexity "
        f"{metrics['perplexity']:.4f}, removed {metrics['removable_fraction']:.3f}")
    gated, tok, _ = load_lm_run(run_dir)  # rebuilt from the run directory, as `report` will
    gated = _device_model(gated)
    ids = _test_ids(tok, data, args.eval_tokens)
    result = {
        "name": name, "kind": args.recipe, "recipe": args.recipe, "recipe_options": _options(args.opt), "target": args.target,
        "run_dir": f"runs/{safe}", "corpora": {c: n for c, n in zip(args.corpora, metrics["train_file_tokens"])},
        "train_tokens": metrics["train_tokens"], "tokens_seen": metrics["tokens_seen"], "steps": metrics["steps"],
        "batch_size": args.batch_size, "block_size": WINDOW, "kd_weight": metrics["kd_weight"],
        "seconds_per_step": metrics["seconds_per_step"], "calibrated_step_s": t_step,
        "train_seconds": metrics["train_seconds"], "train_minutes": metrics["train_seconds"] / 60,
        "budget_minutes": args.minutes, "peak_memory_mb": metrics["peak_memory_mb"],
        "removed_linear_fraction": metrics["removable_fraction"], "perplexity_gated": metrics["perplexity"],
        "compressed": _compressed_entry(gated, ids), "trainable_params": metrics["trainable_params"],
    }
    result["perplexity"] = result["compressed"]["perplexity"]
    del gated
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    result["minutes"] = (time.time() - t_start) / 60  # the whole command: calibration, training, measuring
    result["measure_seconds"] = time.time() - t_trained
    (run_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{safe}.json").write_text(json.dumps({"machine": info, **result}, indent=1) + "\n")
    path = _pack(out, safe, [run_dir], work)
    log(f"{name}: compressed perplexity {result['perplexity']:.4f} (gated {result['perplexity_gated']:.4f}), "
        f"{result['compressed']['layer_params_removed_fraction']:.3f} of layer params removed; {path.name} "
        f"{path.stat().st_size / 2**20:.1f} MiB; {result['minutes']:.1f} min in all")
