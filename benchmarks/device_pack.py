"""Take a model larger than one device transfer to the GPU machine: bf16 parts, one per call.

The device takes 64 MiB of files per call (working tree included) and a warm machine keeps files
between back-to-back calls. So `pack` (here) writes a prepared model's weights as one bf16
safetensors file, cut into parts of at most 55 MB, each in its own git-ignored folder
`.devpack/N/`, with the small files (config, tokenizer, pooling) and a manifest (sha256 of every
part and of the whole) in each; optionally GLUE task folders ride with part 1. On the GPU
machine, `receive` (the same command in every call) copies the carried part to
/tmp/devpack/parts, and once all are there, joins them, checks the sha256 and writes the model
folder /tmp/devpack/<name> (bf16 weights: `finegates train` loads them as fp32 master weights).

    python3 benchmarks/device_pack.py pack mpnet --glue RTE      # here; prints the device calls
    python3 benchmarks/device_pack.py receive                    # there, once per part (docs/gpu.md)

`join_parts` and `tree_bytes` are shared with benchmarks/smollm2_lm.py (a GGUF in halves).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / ".devpack"
THERE = Path("/tmp/devpack")  # on the GPU machine: outside the repo copy, kept while the machine is warm
TRAVEL_LIMIT = 64 * 2**20  # one device call: working tree + carried folders
PART_BYTES = 55_000_000
WEIGHTS = "model.safetensors"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"




def sha256(path: Path) -> str:
    """Standard library only: `receive` runs before anything is installed or imported there."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tree_bytes() -> int:
    """Bytes of the working tree that travels with every call (tracked + untracked, not ignored)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    return sum((ROOT / f).stat().st_size for f in set(out.splitlines()) if (ROOT / f).is_file())


def join_parts(parts: list[Path], out: Path, expected_sha256: str) -> Path:
    """Concatenate `parts` into `out` and check its sha256 (a stale or cut part stops here)."""
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise SystemExit(f"missing parts {missing}: each device call must carry its own part on the same warm machine")
    with open(out, "wb") as f:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 22)
    got = sha256(out)
    if got != expected_sha256:
        out.unlink()
        raise SystemExit(f"reassembled {out.name}: sha256 {got} != {expected_sha256} (a part is stale or cut)")
    return out


# ==== pack (here) ====================================================================================
def _bf16_weights(folder: Path, out: Path) -> int:
    """All *.safetensors of `folder` as one file, floating tensors in bf16. Returns its size."""
    import torch
    from safetensors.torch import load_file, save_file

    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    save_file({k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in state.items()},
              str(out), metadata={"format": "pt"})
    return out.stat().st_size


def cmd_pack(args) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from finegates.loaders import resolve

    folder = Path(resolve(args.model))
    name = args.name or (args.model if not Path(args.model).exists() else folder.name)
    shutil.rmtree(PACK, ignore_errors=True)
    PACK.mkdir()
    if subprocess.run(["git", "check-ignore", "-q", str(PACK)], cwd=ROOT).returncode != 0:
        sys.exit(f"error: {PACK.name}/ must be git-ignored (.gitignore) so that only `carry` takes it")
    whole = PACK / WEIGHTS
    size = _bf16_weights(folder, whole)
    n = -(-size // args.part_bytes)
    small = [f for f in folder.rglob("*") if f.is_file() and f.suffix != ".safetensors" and f.name != "README.md"]
    manifest = {"name": name, "source": str(folder), "weights_sha256": sha256(whole), "weights_bytes": size,
                "parts": [], "files": [str(f.relative_to(folder)) for f in small],
                "glue": list(args.glue), "dtype": "bfloat16"}
    with open(whole, "rb") as src:
        for i in range(1, n + 1):
            d = PACK / str(i)
            d.mkdir()
            part = d / f"{WEIGHTS}.{i:03d}"
            part.write_bytes(src.read(args.part_bytes))
            manifest["parts"].append({"file": part.name, "sha256": sha256(part), "bytes": part.stat().st_size})
    whole.unlink()
    for i in range(1, n + 1):
        d = PACK / str(i)
        for f in small:
            (d / "files" / f.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, d / "files" / f.relative_to(folder))
        (d / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for task in args.glue:
        shutil.copytree(DATA / task, PACK / "1" / "glue" / task)
    tree = tree_bytes()
    worst = max(sum(p.stat().st_size for p in (PACK / str(i)).rglob("*") if p.is_file()) for i in range(1, n + 1))
    ok = tree + worst < TRAVEL_LIMIT
    print(f"packed {name}: {size / 1e6:.1f} MB bf16 weights in {n} parts of <= {args.part_bytes / 1e6:.0f} MB; "
          f"largest call {(tree + worst) / 2**20:.1f} MiB with the working tree "
          f"({'ok' if ok else 'OVER the 64 MiB limit: use a smaller --part-bytes'})")
    print(f"device calls, back to back on one warm machine (the model is then at {THERE / name}):")
    for i in range(1, n + 1):
        tail = " && <your command, reading the model from " + str(THERE / name) + ">" if i == n else ""
        print(f"  call {i}/{n}: carry [\".devpack/{i}\"]  command: python3 benchmarks/device_pack.py receive{tail}")
    if not ok:
        sys.exit(1)


# ==== receive (on the GPU machine) =====================================================================
def cmd_receive(args) -> None:
    carried = sorted(d for d in PACK.iterdir() if (d / "manifest.json").is_file()) if PACK.is_dir() else []
    if not carried:
        sys.exit(f"error: no {PACK.name}/N folder here: carry [\".devpack/N\"] in this call")
    manifest = json.loads((carried[0] / "manifest.json").read_text())
    parts_dir = THERE / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    for d in carried:
        for f in d.glob(f"{WEIGHTS}.*"):
            shutil.copy(f, parts_dir / f.name)
        if (d / "glue").is_dir():
            shutil.copytree(d / "glue", THERE / "glue", dirs_exist_ok=True)
        shutil.copytree(d / "files", THERE / "files", dirs_exist_ok=True)
    have = [p for p in manifest["parts"] if (parts_dir / p["file"]).is_file()]
    print(f"{manifest['name']}: {len(have)}/{len(manifest['parts'])} parts in {parts_dir}")
    if len(have) < len(manifest["parts"]):
        return
    model = THERE / manifest["name"]
    shutil.rmtree(model, ignore_errors=True)
    shutil.copytree(THERE / "files", model)
    join_parts([parts_dir / p["file"] for p in manifest["parts"]], model / WEIGHTS, manifest["weights_sha256"])
    print(f"ready: {model} (bf16 weights, sha256 checked)" + (f"; GLUE data in {THERE / 'glue'}" if manifest["glue"] else ""))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="here: write .devpack/1..N (one bf16 part each) and print the device calls")
    p.add_argument("model", help="a prepared model name (mpnet, smollm2, minilm) or a model folder")
    p.add_argument("--name", help="folder name on the GPU machine (default: the model name)")
    p.add_argument("--part-bytes", type=int, default=PART_BYTES, help="largest part, bytes (default 55 MB)")
    p.add_argument("--glue", nargs="*", default=[], help="GLUE task folders to take along with part 1 (e.g. RTE)")
    sub.add_parser("receive", help="there: keep the carried part in /tmp/devpack; the last one rebuilds the model")
    args = ap.parse_args(argv)
    cmd_pack(args) if args.cmd == "pack" else cmd_receive(args)


if __name__ == "__main__":
    main()
