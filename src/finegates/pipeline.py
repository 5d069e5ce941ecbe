"""From a run directory to what it is for: its evaluation data, the compressed model, perplexity.

    report = finegates.pipeline.compress_run("runs/mrpc", "models/mrpc-small")   # `finegates compress`
    result = finegates.pipeline.evaluate_path("runs/lm", "wiki.test.raw")         # `finegates eval`

The exact compression algorithm (compression/) needs only the model; this module brings the run's
loaders (loaders.py) and data (data/) to it, checks the compressed model against the gated one on
evaluation examples, and saves it with its report.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .compression.exact import FORMAT_VERSION, compress, layer_params, linear_params, predicted_kept
from .compression.saved import layer_summary, save_compressed
from .data.outputs import COMPRESSED, check_output
from .core.model import count_params
from .data.encoding import Encoded, load_task
from .data.text import eval_ids, pack
from .loaders import folder_kind, load_for_eval, load_lm_run, load_run
from .training.checkpoint import RunError, read_run_config
from .training.config import config_from_run
from .training.perplexity import perplexity
from .training.runtime import pick_device


def eval_examples(run_dir, limit: int | None = None, split: str | None = None):
    """(task spec, examples) of the run's evaluation split (the first one unless `split`)."""
    spec, _, evals = load_task(config_from_run(Path(run_dir)))
    key = split if split is not None else next(iter(evals))
    if key not in evals:
        raise RunError(f"no evaluation split {key!r}: the task has {', '.join(map(repr, evals))}")
    return spec, evals[key][:limit] if limit else evals[key]


def eval_batches(run_dir, tokenizer, limit: int | None = 64, batch_size: int = 32,
                 max_length: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Tokenized, padded model inputs (no labels) of the run's evaluation examples."""
    spec, examples = eval_examples(run_dir, limit)
    run = read_run_config(Path(run_dir))
    data = Encoded(examples, tokenizer, max_length or run["train"].get("max_length", 128), spec.regression)
    out = []
    for start in range(0, len(data), batch_size):
        b = data.batch(list(range(start, min(start + batch_size, len(data)))))
        b.pop("labels")
        out.append(b)
    return out


def lm_eval_batches(run_dir, tokenizer, limit: int = 8, length: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Model inputs from an LM run's evaluation text: `limit` blocks of `length` tokens (default:
    the run's block size), one per batch. What compression compares logits on."""
    run = read_run_config(Path(run_dir))
    length = length or run["train"]["block_size"]
    ids = eval_ids(Path(run["train"]["eval_text_file"]), tokenizer, limit * length)
    blocks_ = pack(ids, min(length, ids.numel()))
    return [{"input_ids": b[None]} for b in blocks_[:limit]]


def evaluate_path(path, text_file: Path, window: int = 512, stride: int = 256, eval_tokens: int | None = None,
                  batch_size: int = 8, device: str = "auto", progress: bool = False) -> dict:
    """`finegates eval --objective lm`: perplexity of any model `load_for_eval` accepts."""
    model, tok, kind = load_for_eval(path)
    model.to(pick_device(device))
    ids = eval_ids(text_file, tok, eval_tokens)
    result = perplexity(model, ids, window, stride, batch_size, progress)
    return {"model": str(path), "kind": kind, "text_file": str(text_file), **result}


@torch.no_grad()
def logits(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    model.eval()
    return torch.cat([model(**b).logits.float() for b in batches])



class CompressionMismatchError(ValueError):
    """The compressed model does not reproduce the gated model: refused, nothing written."""



def compress_run(run_dir, out_dir, limit: int = 64, tolerance: float = 1e-4, overwrite: bool = False) -> dict:
    """Rebuild a run's gated model, compress it, check it on `limit` eval examples, save it.

    The save happens only when the compressed logits are within `tolerance` x max(1, max |logit|)
    (max |diff|) of the gated model's; otherwise `CompressionMismatchError` and no OUT_DIR. OUT_DIR must be new or
    empty (or a compressed model, with `overwrite`), never the run or its model: checked first; the
    folder is built beside it and renamed into place. Returns the report (also
    OUT_DIR/compress_report.json, `REPORT`).
    """
    run_cfg = read_run_config(Path(run_dir))
    base = run_cfg.get("model_location")
    check_output(out_dir, COMPRESSED, inputs=(run_dir, base if base and Path(base).is_absolute() else None),
                 overwrite=overwrite)
    if folder_kind(run_dir) == "lm run":  # decoders: LM runs (training/lm.py, training/pretrain.py)
        gated, tokenizer, run = load_lm_run(run_dir)
        batches = lm_eval_batches(run_dir, tokenizer, limit)
    else:
        gated, tokenizer, run = load_run(run_dir)
        batches = eval_batches(run_dir, tokenizer, limit)
    before = logits(gated, batches)
    dense, dense_layers, dense_linear = count_params(gated), layer_params(gated), linear_params(gated)
    predicted = predicted_kept(gated)
    model = compress(gated)
    after = logits(model, batches)
    diff = float((before - after).abs().max())
    # relative to the logits' scale: fp32 rounding grows with it (a decoder's logits reach ~40)
    scale = max(1.0, float(before.abs().max()))
    if not diff <= tolerance * scale:  # also catches NaN
        raise CompressionMismatchError(
            f"compressed model differs from the gated one by max |logit diff| {diff:.2e} > tolerance {tolerance:.0e} "
            f"x logit scale {scale:.3g} on {before.shape[0]} eval examples; refusing to write {out_dir}")
    n, n_layers, n_linear = count_params(model), layer_params(model), linear_params(model)
    regression = bool(run.get("regression"))
    agree = (before.squeeze(-1) - after.squeeze(-1)).abs() < 1e-4 if regression else before.argmax(-1) == after.argmax(-1)
    report = {
        "run_dir": str(Path(run_dir).resolve()), "task": run.get("task"), "model_location": run["model_location"],
        "params_dense": dense, "params_compressed": n, "removed_fraction": 1 - n / dense,
        "layer_params_dense": dense_layers, "layer_params_compressed": n_layers,
        "layer_params_removed_fraction": 1 - n_layers / dense_layers,
        "layer_linear_params_dense": dense_linear, "layer_linear_params_compressed": n_linear,
        "layer_linear_removed_fraction": 1 - n_linear / dense_linear,
        "coupling_predicted_linear_params": predicted,
        "max_abs_diff": diff, "tolerance": tolerance, "logit_scale": scale, "prediction_agreement": float(agree.float().mean()),
        "n_examples": int(before.shape[0]), "layers": layer_summary(model),
        "residual_stream": "kept; its gates are baked into the weights as scaling (docs/compression.md)",
        "format_version": FORMAT_VERSION,
    }
    save_compressed(model, tokenizer, out_dir, report, overwrite=overwrite)
    return report
