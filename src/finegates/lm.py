"""The language-modelling objective: gate a decoder on plain text, measure perplexity.

The paper's "post-training" mode for Llama: gates on every linear layer of the blocks, trained
on the causal-LM loss (no task head), cosine learning-rate schedule; evaluated by perplexity.
This is a code path of its own next to train.py's classification loop; it shares the `Method`
abstraction, so `--method gates` (and any method that only needs the model) works unchanged.

Data: plain text files, read as they are (`.gz` too), tokenized without special tokens and
concatenated (an EOS token between files); training cuts the stream into blocks of
`block_size` tokens (the last partial block is dropped).

Perplexity (`perplexity`): the sliding-window evaluation of the HF docs, exact. Windows of
`window` tokens start every `stride` tokens; each token is scored once, by the first window that
reaches it, with the window's earlier tokens as context (at least `window - stride` of them,
except at the start). The first token has no context and is not scored; with stride == window
(independent chunks) neither is the first token of each chunk. Result: exp(sum NLL / scored
tokens), with the scored count reported. The same function serves dense, gated and compressed
models.

RUN_DIR (the layout of train.py, plus "objective": "lm" in config.json):
  config.json, metrics.jsonl (one line per evaluation), trace.jsonl, trainable.safetensors,
  metrics.json (final; dev.perplexity, dense perplexity, window/stride).
"""

from __future__ import annotations

import gzip
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .files import append_jsonl, write_json


class LMDataError(ValueError):
    """Text data that cannot be used; the message says which file and why."""


# ---- config -------------------------------------------------------------------------------------
@dataclass
class LMConfig:
    """A language-modelling run; `finegates train --objective lm` options map onto these fields.

    The gate fields (recipe, sparsity, lr, lam, ...) mean what they mean in `TrainConfig`:
    `GatesMethod` reads them from either.
    """

    out: Path = field(metadata={"help": "Run directory to write."})
    model: str | None = field(default="smollm2", metadata={"help": "Decoder: folder, hub id or 'smollm2'."})
    text_files: tuple[Path, ...] = field(default=(), metadata={"help": "Training text files."})
    eval_text_file: Path | None = field(default=None, metadata={"help": "Text file for perplexity."})
    block_size: int = field(default=256, metadata={"help": "Tokens per training sequence."})
    window: int = field(default=512, metadata={"help": "Perplexity: tokens per evaluation window."})
    stride: int = field(default=256, metadata={"help": "Perplexity: tokens between window starts."})
    eval_tokens: int | None = field(default=None, metadata={"help": "Evaluate on the first N tokens only."})
    eval_dense: bool = field(default=True, metadata={"help": "Also measure the dense model's perplexity first."})
    method: str = field(default="gates", metadata={"help": "Training method."})
    recipe: str = field(default="paper-lm", metadata={"help": "Gate recipe (paper-lm: the paper's LM mode)."})
    recipe_options: dict = field(default_factory=dict, metadata={"help": "Dotted recipe overrides."})
    distill: str | None = field(default=None, metadata={"help": "Extra loss: none or squarehead."})
    sparsity: float = field(default=0.3, metadata={"help": "Target fraction of layer parameters removed."})
    epochs: float = field(default=1, metadata={"help": "Passes over the training blocks."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many steps."})
    batch_size: int = field(default=8, metadata={"help": "Blocks per training step."})
    eval_batch_size: int = field(default=8, metadata={"help": "Windows per evaluation forward pass."})
    eval_amp: bool = field(default=True, metadata={"help": "GPU: evaluate under bf16 autocast (False: fp32)."})
    schedule: str = field(default="cosine", metadata={"help": "Learning-rate schedule: cosine or constant."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear learning-rate warm-up steps."})
    lr: float | None = field(default=None, metadata={"help": "Gate learning rate; default per recipe."})
    head_lr: float | None = field(default=None, metadata={"help": "Unused for LM (no task head); kept for methods."})
    lam: float | None = field(default=None, metadata={"help": "Penalty weight lambda."})
    reg_start_step: int | None = field(default=None, metadata={"help": "Step at which the penalty starts."})
    regularizer: str | None = field(default=None, metadata={"help": "Override the recipe's penalty."})
    train_bias: bool | None = field(default=None, metadata={"help": "Override: train biases of gated layers."})
    train_weights: bool | None = field(default=None, metadata={
        "help": "Override: also finetune the weights of gated layers (gates over finetuned weights)."})
    gate_roles: tuple[str, ...] | None = field(default=None, metadata={"help": "Override: roles to gate."})
    evals: int = field(default=1, metadata={"help": "Evaluations during training (the last at the end)."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    grad_clip: float = field(default=1.0, metadata={"help": "Gradient-norm clip (0: off)."})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda."})
    trace_every: int = field(default=0, metadata={"help": "Log training internals every N steps (0: off)."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    method_options: dict = field(default_factory=dict, metadata={"help": "Method-specific options."})

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.text_files = tuple(Path(p) for p in self.text_files)
        if self.eval_text_file is not None:
            self.eval_text_file = Path(self.eval_text_file)
        if not self.text_files:
            raise ValueError("--objective lm needs --text-files (comma-separated plain text files)")
        if self.eval_text_file is None:
            raise ValueError("--objective lm needs --eval-text-file (the text to measure perplexity on)")
        if not (0.0 <= self.sparsity < 1.0) or math.isnan(self.sparsity):
            raise ValueError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        check_window(self.window, self.stride)
        if min(self.block_size, self.batch_size, self.eval_batch_size, self.evals) < 1 or self.epochs <= 0:
            raise ValueError("--block-size, --batch-size, --eval-batch-size, --evals and --epochs must be positive")
        if self.block_size < 2:
            raise ValueError("--block-size must be at least 2 tokens")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"--schedule must be cosine or constant, got {self.schedule!r}")
        if self.lr is not None and not (0 < self.lr < 10):
            raise ValueError(f"--lr must be in (0, 10), got {self.lr}")
        if self.gate_roles is not None:
            self.gate_roles = tuple(self.gate_roles)


def check_window(window: int, stride: int) -> None:
    if window < 2 or stride < 1 or stride > window:
        raise ValueError(f"perplexity needs window >= 2 and 1 <= stride <= window, got window {window}, stride {stride}")


# ---- data ---------------------------------------------------------------------------------------
def read_text(path: Path) -> str:
    """A text file's contents (gzip if it ends in .gz); empty or unreadable files are errors."""
    path = Path(path)
    if not path.is_file():
        raise LMDataError(f"text file not found: {path}")
    try:
        raw = gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")
        with raw as f:
            text = f.read()
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise LMDataError(f"{path}: not a UTF-8 text file ({e})") from None
    if not text.strip():
        raise LMDataError(f"{path}: empty")
    return text


def tokenize_files(paths, tokenizer) -> torch.Tensor:
    """One token stream: each file tokenized whole, no special tokens, EOS between files."""
    ids: list[int] = []
    for i, path in enumerate(paths):
        if i and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        ids.extend(tokenizer(read_text(path), add_special_tokens=False, verbose=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def pack(ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cut a token stream into [n_blocks, block_size]; the last partial block is dropped."""
    n = ids.numel() // block_size
    if n == 0:
        raise LMDataError(f"the training text has {ids.numel()} tokens, fewer than one block of {block_size}")
    return ids[: n * block_size].view(n, block_size)


# ---- perplexity ----------------------------------------------------------------------------------
def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of every evaluation window over n_tokens tokens.

    Positions [score_from, end) are scored in the window [begin, end): each position once, by the
    first window that reaches it, never the window's own first token (it has no context). With
    stride < window that is every position 1..n-1; with stride == window (independent chunks, as
    in the HF recipe) the first token of every chunk goes unscored.
    """
    check_window(window, stride)
    out, prev_end, begin = [], 1, 0
    while prev_end < n_tokens:
        end = min(begin + window, n_tokens)
        if end - max(prev_end, begin + 1) > 0:
            out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        begin += stride
    return out


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, window: int = 512, stride: int = 256,
               batch_size: int = 8, progress: bool = False, amp: bool = True) -> dict:
    """Sliding-window perplexity of a causal LM on a token stream (see the module docstring).

    `amp`: on a GPU, run under bf16 autocast (False: fp32, as on CPU)."""
    ids = ids.flatten()
    if ids.numel() < 2:
        raise LMDataError("perplexity needs at least 2 tokens")
    was_training = model.training
    model.eval()
    device = _device_of(model)
    spans = windows(ids.numel(), window, stride)
    nll, count = 0.0, 0
    groups = _same_length_batches(spans, batch_size)
    for group in tqdm(groups, desc="perplexity", leave=False, disable=not progress):
        x = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
        with _autocast(device, amp):
            logits = model(input_ids=x, use_cache=False).logits
        for row, (b, e, s) in enumerate(group):
            # logits at position t predict token t+1: positions s..e-1 from logits s-1..e-2
            pred = logits[row, s - 1 - b: e - 1 - b].float()
            nll += F.cross_entropy(pred, x[row, s - b: e - b], reduction="sum").item()
            count += e - s
    model.train(was_training)
    mean = nll / count
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count, "window": window, "stride": stride}


def _same_length_batches(spans, batch_size: int):
    groups, cur = [], []
    for span in spans:
        if cur and (len(cur) == batch_size or span[1] - span[0] != cur[0][1] - cur[0][0]):
            groups.append(cur)
            cur = []
        cur.append(span)
    return groups + [cur] if cur else groups


def _autocast(device: torch.device, enabled: bool = True):
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def eval_ids(path: Path, tokenizer, limit: int | None = None) -> torch.Tensor:
    ids = tokenize_files([path], tokenizer)
    return ids[:limit] if limit else ids


# ---- models ---------------------------------------------------------------------------------------
def load_causal_lm(location: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A decoder with its LM head, from a folder (dense or finegates-compressed) or hub id."""
    import json

    from transformers import AutoModelForCausalLM

    from .arch import spec_for_model_type
    from .models import ModelError, load_config

    cfg_path = Path(location) / "config.json"
    fg = json.loads(cfg_path.read_text()).get("finegates") if cfg_path.is_file() else None
    if fg:
        if not str(fg.get("task_class", "")).endswith("ForCausalLM"):
            raise ModelError(f"{location}: a compressed {fg.get('task_class')}, not a causal LM (no LM head)")
        from .compress import load

        return load(location)
    config = load_config(location)  # clear error for an unsupported family
    if not spec_for_model_type(config.model_type).decoder:
        raise ModelError(f"{location}: {config.model_type} is not a decoder; the LM objective needs one")
    try:
        return AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - missing, truncated or mismatched weight files
        raise ModelError(f"{location}: cannot load the model weights ({str(e).strip().splitlines()[0]})") from None


def load_lm_run(run_dir) -> tuple[nn.Module, object, dict]:
    """(gated causal LM in eval mode, tokenizer, run config) of an LM run directory."""
    from .checkpoint import RunError, load_trainable, read_run_config
    from .model import apply_gates
    from .models import load_tokenizer
    from .runs import gate_config

    run_dir = Path(run_dir)
    run = read_run_config(run_dir)
    if run.get("objective") != "lm":
        raise RunError(f"{run_dir}: not a language-modelling run")
    weights = run_dir / "trainable.safetensors"
    if not weights.is_file():
        raise RunError(f"{run_dir}: no trainable.safetensors (the run never reached an evaluation)")
    location = run_location(run_dir, run["model_location"])
    model = load_causal_lm(location)
    apply_gates(model, gate_config(run))
    load_trainable(model, weights)
    model.run_dir = str(run_dir)
    return model.eval(), load_tokenizer(location), run


def run_location(run_dir: Path, location: str) -> str:
    """A run's model location; a relative one that names a folder inside the run (pretraining
    saves its trained model there) is read relative to the run, so a moved run still loads."""
    inside = Path(run_dir) / location
    return str(inside) if not Path(location).is_absolute() and inside.is_dir() else location


def eval_batches(run_dir, tokenizer, limit: int = 8, length: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Model inputs from an LM run's evaluation text: `limit` blocks of `length` tokens (default:
    the run's block size), one per batch. What compression compares logits on."""
    from .checkpoint import read_run_config

    run = read_run_config(Path(run_dir))
    length = length or run["train"]["block_size"]
    ids = eval_ids(Path(run["train"]["eval_text_file"]), tokenizer, limit * length)
    blocks_ = pack(ids, min(length, ids.numel()))
    return [{"input_ids": b[None]} for b in blocks_[:limit]]


def load_for_eval(path) -> tuple[nn.Module, object, str]:
    """(model, tokenizer, kind) for an LM run directory, a compressed folder or a dense decoder."""
    from .checkpoint import is_run_dir
    from .models import load_tokenizer, resolve

    p = Path(path)
    if p.is_dir() and is_run_dir(p):
        model, tok, _ = load_lm_run(p)
        return model, tok, "gated run"
    location = resolve(str(path))
    model = load_causal_lm(location)
    kind = "compressed" if getattr(model.config, "finegates", None) else "dense"
    return model.eval(), load_tokenizer(location), kind


def evaluate_path(path, text_file: Path, window: int = 512, stride: int = 256, eval_tokens: int | None = None,
                  batch_size: int = 8, device: str = "auto", progress: bool = False) -> dict:
    """`finegates eval --objective lm`: perplexity of any model `load_for_eval` accepts."""
    from .train import pick_device

    model, tok, kind = load_for_eval(path)
    model.to(pick_device(device))
    ids = eval_ids(text_file, tok, eval_tokens)
    result = perplexity(model, ids, window, stride, batch_size, progress)
    return {"model": str(path), "kind": kind, "text_file": str(text_file), **result}


# ---- training -------------------------------------------------------------------------------------
def lr_lambda(schedule: str, total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return f


def _method_config(method) -> dict | None:
    if hasattr(method, "config"):
        return method.config()
    from .train import _jsonable

    return _jsonable(getattr(method, "recipe", None))


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_lm(cfg: LMConfig, overwrite: bool = False) -> dict:
    """Train on the LM loss, evaluate perplexity `cfg.evals` times, write the run directory (new or
    empty; `overwrite=True` replaces an earlier run there once the new one is complete: outputs.py)."""
    from .outputs import TRAIN_RUN, output_folder

    inputs = (cfg.model, *cfg.text_files, cfg.eval_text_file)
    kind = replace(TRAIN_RUN, resumable=False)  # no --resume for lm runs: written beside, renamed when complete
    with output_folder(cfg.out, kind, inputs=inputs, overwrite=overwrite) as folder:
        return _train_lm(replace(cfg, out=folder), cfg.out)


def _train_lm(cfg: LMConfig, target: Path) -> dict:
    from .checkpoint import FORMAT_VERSION, model_fingerprint, nonfinite, save_trainable
    from .methods import get_method
    from .model import count_params, count_trainable, gate_state_dict, gate_trace
    from .models import load_tokenizer, resolve
    from .train import TrainingError, _versions, peak_memory_mb, pick_device

    _seed(cfg.seed)
    device = pick_device(cfg.device)
    location = resolve(cfg.model)
    tokenizer = load_tokenizer(location)
    blocks_ = pack(tokenize_files(cfg.text_files, tokenizer), cfg.block_size)
    eval_stream = eval_ids(cfg.eval_text_file, tokenizer, cfg.eval_tokens)
    model = load_causal_lm(location)
    fingerprint = model_fingerprint(model)
    model.to(device)

    per_epoch = math.ceil(len(blocks_) / cfg.batch_size)
    total = math.ceil(cfg.epochs * per_epoch)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    def ppl() -> dict:
        return perplexity(model, eval_stream, cfg.window, cfg.stride, cfg.eval_batch_size, cfg.progress, cfg.eval_amp)

    dense = ppl() if cfg.eval_dense else None

    method = get_method(cfg.method)
    dense_params = count_params(model)
    groups = method.prepare(model, cfg, total)
    trainable_params = count_trainable(model)  # before `finish` (which may merge adapters away)
    model.to(device)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, total, cfg.warmup_steps))

    cfg.out.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.json", "metrics.jsonl", "trace.jsonl"):
        (cfg.out / stale).unlink(missing_ok=True)
    write_json(cfg.out / "config.json", {
        "format_version": FORMAT_VERSION, "objective": "lm", "train": {**asdict(cfg), "out": str(target)},
        "model_location": location,
        "task": "lm", "fingerprint": fingerprint, "train_tokens": int(blocks_.numel()),
        "eval_tokens": int(eval_stream.numel()), "method_config": _method_config(method),
        "versions": _versions(),
    })

    eval_at = {max(1, round(total * (i + 1) / cfg.evals)) for i in range(cfg.evals)} | {total}
    gen = torch.Generator().manual_seed(cfg.seed)
    params = [p for g in groups for p in g["params"]]
    history, order, step, t_train = [], [], 0, 0.0
    bar = tqdm(total=total, desc=f"{cfg.method} lm", disable=not cfg.progress, dynamic_ncols=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while step < total:
        if not order:
            order = torch.randperm(len(blocks_), generator=gen).tolist()
        idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        model.train()
        t0 = time.perf_counter()
        x = blocks_[idx].to(device)
        with _autocast(device):
            out = model(input_ids=x, labels=x, use_cache=False)
        task_loss = out.loss.float()
        extra, logs = method.extra_loss(model, step, {"input_ids": x, "labels": x}, out)
        loss = task_loss if extra is None else task_loss + extra
        if not torch.isfinite(loss):
            bar.close()
            raise TrainingError(f"loss is {loss.item()} at step {step} (LM loss {task_loss.item():.4g})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        method.after_step(model, step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_train += time.perf_counter() - t0
        step += 1
        bar.update(1)
        if cfg.trace_every and (step % cfg.trace_every == 0 or step == 1):
            append_jsonl(cfg.out / "trace.jsonl", {"step": step, "task_loss": task_loss.item(),
                                                    "lr": scheduler.get_last_lr()[0], **logs,
                                                    **method.progress(), **gate_trace(model)})
        if step in eval_at:
            result = ppl()
            record = {"step": step, "epoch": round(step / per_epoch, 3), "dev": result,
                      "train_loss": task_loss.item(), **method.progress()}
            history.append(record)
            append_jsonl(cfg.out / "metrics.jsonl", record)
            tensors = method.trainable_state(model) if hasattr(method, "trainable_state") else gate_state_dict(model)
            if nonfinite(tensors):
                raise TrainingError(f"trained tensors hold NaN/inf at step {step}")
            save_trainable(cfg.out / "trainable.safetensors", model, fingerprint, step, tensors)
            bar.write(f"step {step}: perplexity {result['perplexity']:.3f} (window {cfg.window}, stride "
                      f"{cfg.stride})" + "".join(f", {k} {v}" for k, v in method.progress().items()))
        bar.set_postfix(loss=f"{task_loss.item():.3f}", **method.progress())
    bar.close()
    if hasattr(method, "finish"):
        method.finish(model)

    final = history[-1]
    metrics = {
        "task": "lm", "objective": "lm", "method": cfg.method, "seed": cfg.seed, "steps": step,
        "dev": final["dev"], "score": -final["dev"]["perplexity"],  # higher is better, as in train.py
        "perplexity": final["dev"]["perplexity"], "dense_perplexity": dense["perplexity"] if dense else None,
        "dense": dense, "window": cfg.window, "stride": cfg.stride, "eval_text_file": str(cfg.eval_text_file),
        "train_text_files": [str(p) for p in cfg.text_files], "train_tokens": int(blocks_.numel()),
        "trainable_params": trainable_params, "total_params": dense_params,
        "train_seconds": t_train, "seconds_per_step": t_train / max(step, 1),
        "peak_memory_mb": peak_memory_mb(device), "device": str(device), "complete": True,
        **method.summary(model),
    }
    write_json(cfg.out / "metrics.json", metrics)
    return metrics
