"""The LM training text of issue 21, measured: token counts, `<unk>` placeholders, spacing, and how
surprising each corpus is to dense SmolLM2 next to the raw WikiText-2 it is evaluated on.

    python3 benchmarks/lm_text.py            # CPU, ~5-10 min; writes benchmarks/results/lm_text.{json,md}

Per file: bytes, words, whole-word `<unk>` placeholders, SmolLM2 tokens as read and with the
placeholders dropped (data/text.py, `drop_unk`: what training reads), and WikiText's Moses-style
spacing markers per 1,000 words (" @-@ ", " @,@ ", " @.@ ", " , ", " . "), which show that the
tokenized train split is spaced like the raw test split we evaluate on. Then the dense model's
perplexity (window 512, stride 256, fp32) on the first `--tokens` tokens of the *validation*
text in each form: raw, tokenized with `<unk>` dropped, tokenized as is, plus PTB valid and Tiny
Shakespeare: how far from the evaluation text each training form is, to the model itself.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.smollm2_lm import CORPORA, cpu_session, SHARED, TEST, log  # noqa: E402

MARKERS = (" @-@ ", " @,@ ", " @.@ ", " , ", " . ")
PERPLEXITY_TEXTS = {  # name -> (file under SHARED, drop <unk>)
    "wikitext2 valid raw (the evaluation text's form)": ("wikitext-2-raw/wiki.valid.raw", False),
    "wikitext2 valid tokens, <unk> dropped (the training form)": ("wikitext-2/wiki.valid.tokens", True),
    "wikitext2 valid tokens, <unk> kept": ("wikitext-2/wiki.valid.tokens", False),
    "ptb valid, <unk> dropped": ("ptb/ptb.valid.txt", True),
    "tinyshakespeare (first tokens)": ("tinyshakespeare/input.txt", False),
}


def file_stats(path: Path, tok) -> dict:
    from finegates.data.text import drop_unk, read_text

    text = read_text(path)
    words = len(text.split())
    unk = len(re.findall(r"(?<!\S)<unk>(?!\S)", text))
    count = lambda t: len(tok(t, add_special_tokens=False, verbose=False)["input_ids"])  # noqa: E731
    return {"file": str(path.relative_to(SHARED)), "bytes": path.stat().st_size, "words": words, "unk_words": unk,
            "unk_fraction": unk / max(words, 1), "tokens": count(text), "tokens_unk_dropped": count(drop_unk(text)),
            "markers_per_1000_words": {m.strip(): round(1000 * text.count(m) / max(words, 1), 2) for m in MARKERS}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(SHARED))
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tokens", type=int, default=4096, help="tokens of each text the dense model is scored on")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "lm_text.json"))
    args = p.parse_args(argv)
    cpu_session(args.threads)
    import torch

    from benchmarks.report import git_commit, write_results
    from finegates.bench.latency import machine_info
    from finegates.data.text import tokenize_files
    from finegates.loaders import load_causal_lm, load_tokenizer, resolve
    from finegates.training.perplexity import perplexity

    data = Path(args.data)
    folder = resolve(args.model)
    tok = load_tokenizer(folder)
    rows = []
    for name, rel in {**CORPORA, "wikitext2-test (evaluation)": TEST}.items():
        rows.append({"name": name, "kind": "corpus", **file_stats(data / rel, tok)})
        log(f"{name}: {rows[-1]['tokens_unk_dropped']} tokens with <unk> dropped")
    model = load_causal_lm(folder).eval()
    for name, (rel, drop) in PERPLEXITY_TEXTS.items():
        t0 = time.time()
        ids = tokenize_files([data / rel], tok, drop_unk_words=drop)[: args.tokens]
        r = perplexity(model, ids, 512, 256, batch_size=4, amp=False)
        rows.append({"name": name, "kind": "dense perplexity", "file": rel, "drop_unk": drop, **r})
        log(f"{name}: perplexity {r['perplexity']:.2f} on {r['tokens']} tokens ({time.time() - t0:.0f}s)")
    meta = {"commit": git_commit(), "machine": {**machine_info(), "load_average": os.getloadavg()}, "model": folder,
            "tokens": args.tokens, "threads": args.threads}
    write_results(args.json, meta, rows, _markdown(meta, rows))
    log(f"wrote {args.json}")


def _markdown(meta: dict, rows: list[dict]) -> str:
    lines = ["# LM training text: tokens, `<unk>`, spacing, and distance to the evaluation text", "",
             "SmolLM2's tokenizer; `<unk>` counted as whole words. Markers per 1,000 words.", "",
             "| corpus | file | words | `<unk>` words | tokens as read | tokens, `<unk>` dropped | "
             + " | ".join(f"`{m.strip()}`" for m in MARKERS) + " |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * len(MARKERS)]
    for r in (r for r in rows if r["kind"] == "corpus"):
        marks = " | ".join(f"{r['markers_per_1000_words'][m.strip()]:.1f}" for m in MARKERS)
        lines.append(f"| {r['name']} | {r['file']} | {r['words']:,} | {r['unk_words']:,} ({100 * r['unk_fraction']:.1f}%) "
                     f"| {r['tokens']:,} | {r['tokens_unk_dropped']:,} | {marks} |")
    lines += ["", f"Dense SmolLM2 perplexity on the first {meta['tokens']} tokens (window 512, stride 256, fp32, "
              f"{meta['threads']} CPU threads, {meta['machine']['cpu']}; commit {meta['commit'][:10]}):", "",
              "| text | perplexity | tokens scored |", "|---|---:|---:|"]
    for r in (r for r in rows if r["kind"] == "dense perplexity"):
        lines.append(f"| {r['name']} | {r['perplexity']:.2f} | {r['tokens']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
