"""What a training step keeps for its backward pass, per method: bytes of activations saved.

A GPU's peak training memory is the weights, the optimizer state and, above all at a training batch,
the activations autograd saves between forward and backward. Those can be counted exactly on any
device: every tensor saved for backward goes through `torch.autograd.graph.saved_tensors_hooks`;
summing the distinct storages (a tensor saved by several nodes counts once; parameters, which exist
anyway, count zero) gives the activation bytes of one step. This runs on the CPU under bf16 autocast,
the GPU recipe's precision, with MPNet-base's architecture (random weights: the count does not depend
on them), batch 16 x 128, the method's training forward and its extra loss.

    python -m benchmarks.saved_activations --config .gpu/meta/mpnet   # a folder with MPNet's config.json

Writes benchmarks/results/saved_activations.{json,md}.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from benchmarks.report import git_commit, write_results

METHODS = (("gates", "fast"), ("gates", "frozen"), ("gates", "finetune"), ("lora", None), ("full", None))


def saved_bytes(config_dir: str, method_name: str, recipe: str | None, batch: int, seq: int) -> dict:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from finegates.training.config import TrainConfig
    from finegates.training.methods.registry import get_method

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(config_dir, num_labels=2)).train()
    cfg = TrainConfig(out=Path("unused"), task="rte", data_dir="unused", method=method_name, recipe=recipe or "finetune")
    method = get_method(method_name)
    method.prepare(model, cfg, 1000)
    method.before_step(model, 500)
    params = {p.data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    x = {"input_ids": torch.randint(5, 1000, (batch, seq)), "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**x, labels=torch.arange(batch) % 2)
        extra, _ = method.extra_loss(model, 500, x, out)
    return {"method": method_name, "recipe": recipe, "saved_mb": sum(storages.values()) / 2**20,
            "saved_tensors": len(storages), "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a folder with the model's config.json (MPNet-base)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--results", default="benchmarks/results/saved_activations.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    rows = [saved_bytes(args.config, m, r, args.batch, args.seq) for m, r in METHODS]
    meta = {"commit": git_commit(), "machine": platform.platform(), "torch": torch.__version__,
            "model_config": args.config, "batch": args.batch, "seq": args.seq, "precision": "bf16 autocast (CPU)"}
    md = (f"# Activations saved for backward per training step ({args.batch} x {args.seq}, bf16 autocast)\n\n"
          f"Commit `{meta['commit'][:12]}`; model config `{args.config}` (random weights); distinct storages "
          "saved by autograd in one forward (parameters not counted).\n\n"
          "| method | recipe | saved MB | saved tensors | trainable params |\n|---|---|---:|---:|---:|\n"
          + "".join(f"| {r['method']} | {r['recipe'] or ''} | {r['saved_mb']:.0f} | {r['saved_tensors']} | "
                    f"{r['trainable_params'] / 1e6:.2f}M |\n" for r in rows))
    write_results(args.results, meta, rows, md)
    print(md)


if __name__ == "__main__":
    main()
