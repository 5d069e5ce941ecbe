"""The no-training criteria on real SmolLM2, on this CPU: is the FLAP-style baseline right, and does
closing attention heads pay?

    python3 benchmarks/smollm2_prune_cpu.py      # ~20-30 min on 2 shared cores; benchmarks/results/smollm2_prune_cpu.*

On the first `--tokens` tokens of WikiText-2 raw test (window 512, stride 256, fp32), calibrated on
`--calib-blocks` x 512 tokens of WikiText-2 train (`<unk>` dropped), compressed models:
  * dense; Wanda-style structured (uniform allocation) at each target;
  * FLAP-style (heads + MLP units, one adaptive ranking, bias compensation), the same without the
    compensation (biases zeroed: it should be far worse if the compensation is implemented right),
    and FLAP-style over MLP units only (the same parameter budget, attention left whole);
then prefill / decode timing (bench-one processes, 1 thread: this machine is shared) of dense,
FLAP and FLAP-MLP at the last target, in `--rounds` alternating rounds. A prefix and a small
calibration set keep it to CPU minutes: the GPU benchmark (smollm2_lm.py) measures the full test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.smollm2_lm import CORPORA, SCRIPT, SHARED, TEST, cpu_session, env, log  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", type=float, nargs="+", default=[0.2, 0.3])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--calib-blocks", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "smollm2_prune_cpu.json"))
    args = p.parse_args(argv)
    cpu_session(args.threads)
    import torch

    from benchmarks.report import git_commit, write_results
    from finegates.bench.latency import machine_info
    from finegates.compression.exact import compress, layer_params
    from finegates.compression.saved import save_compressed
    from finegates.core.gates import GatedLinear
    from finegates.core.model import GateConfig, apply_gates
    from finegates.data.text import eval_ids, tokenize_files
    from finegates.loaders import load_causal_lm, load_tokenizer, resolve
    from finegates.training.methods.flap import FLAP_GATES, fluctuation_stats, prune_flap
    from finegates.training.methods.magnitude import FIXED_GATES, activation_norms, prune_structured
    from finegates.training.perplexity import perplexity

    folder = resolve("smollm2")
    tok = load_tokenizer(folder)
    test = eval_ids(SHARED / TEST, tok, args.tokens)
    train = tokenize_files([SHARED / CORPORA["wikitext2-train"]], tok, drop_unk_words=True)
    calib = [{"input_ids": b[None]} for b in train[: args.calib_blocks * 512].view(-1, 512)]
    dense_layers = layer_params(load_causal_lm(folder))
    rows, saved = [], {}

    def measure(name: str, kind: str, target: float, small) -> None:
        t0 = time.time()
        r = perplexity(small, test, 512, 256, batch_size=4, amp=False)
        rows.append({"name": name, "kind": kind, "target": target, "perplexity": r["perplexity"], "tokens": r["tokens"],
                     "layer_params_removed_fraction": 1 - layer_params(small) / dense_layers,
                     "heads": sum(len(q["attn"]["heads"]) for q in small.config.finegates["layers"])
                     if getattr(small.config, "finegates", None) else None})
        log(f"{name}: perplexity {r['perplexity']:.2f} ({time.time() - t0:.0f}s)")

    measure("dense", "dense", 0.0, load_causal_lm(folder).eval())
    stats = None
    for s in args.targets:
        model = apply_gates(load_causal_lm(folder), GateConfig(param=FIXED_GATES, train_bias=False, train_head=False))
        prune_structured(model.eval(), s, "uniform", activation_norms(model, calib))
        measure(f"wanda-uniform@{s:.2f}", "wanda", s, compress(model))
        for name, heads, compensate in (("flap", True, True), ("flap, no compensation", True, False),
                                        ("flap-mlp", False, True)):
            model = apply_gates(load_causal_lm(folder), FLAP_GATES).eval()
            stats = stats or fluctuation_stats(model, calib)
            prune_flap(model, s, stats, heads=heads)
            if not compensate:
                with torch.no_grad():
                    for m in model.modules():
                        if isinstance(m, GatedLinear):
                            m.base.bias.zero_()
            small = compress(model)
            measure(f"{name}@{s:.2f}", name, s, small)
            if compensate and s == args.targets[-1]:
                saved[name] = small
    timing: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"dense": folder}
        for name, small in saved.items():
            dirs[name] = save_compressed(small, tok, Path(tmp) / name)
        for _ in range(args.rounds):
            for name, d in dirs.items():
                out = Path(tmp) / "bench.json"
                subprocess.run([sys.executable, str(SCRIPT), "bench-one", str(d), "--json", str(out), "--threads",
                                str(args.threads), "--runs", "5", "--new-tokens", "16", "--prompt", "256"],
                               check=True, env=env())
                b = json.loads(out.read_text())
                timing.setdefault(name, []).append({"prefill_ms": b["prefill_ms"]["median"],
                                                    "decode_ms_per_token": b["decode_ms_per_token"]["median"]})
                log(f"{name}: {timing[name][-1]}")
    meta = {"commit": git_commit(), "machine": {**machine_info(), "load_average": os.getloadavg()},
            "eval": f"first {args.tokens} tokens of WikiText-2 raw test, window 512, stride 256, fp32",
            "calibration": f"{len(calib)} x 512 tokens of WikiText-2 train (<unk> dropped)",
            "timing": f"target {args.targets[-1]}, prompt 256, 16 new tokens, {args.threads} thread(s), median of 5 "
                      f"runs, {args.rounds} alternating rounds", "timing_rounds": timing}
    write_results(args.json, meta, rows, _markdown(meta, rows, timing))
    log(f"wrote {args.json}")


def _markdown(meta: dict, rows: list[dict], timing: dict) -> str:
    lines = ["# No-training criteria on SmolLM2 (CPU check)", "",
             f"Perplexity on the {meta['eval']}; calibration {meta['calibration']}; compressed models; "
             f"{meta['machine']['cpu']}, commit {meta['commit'][:10]}.", "",
             "| model | perplexity | layer params removed | attention heads kept (of 270) |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['perplexity']:.2f} | {100 * r['layer_params_removed_fraction']:.1f}% | "
                     f"{r['heads'] if r['heads'] is not None else 270} |")
    lines += ["", f"Timing ({meta['timing']}; the machine is shared: each round is listed):", "",
              "| model | prefill ms | decode ms/token |", "|---|---|---|"]
    for name, rounds in timing.items():
        prefill = " / ".join(f"{t['prefill_ms']:.0f}" for t in rounds)
        decode = " / ".join(f"{t['decode_ms_per_token']:.1f}" for t in rounds)
        lines.append(f"| {name} | {prefill} | {decode} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
