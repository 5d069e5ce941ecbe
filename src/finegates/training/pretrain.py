"""Sparse pretraining: a small Llama trained from scratch, its weights and gates together.

The paper's fourth scenario prunes *during* pretraining: every block's q, k, v, o, gate and up
projections carry row/column gates, the weights train with them (unlike finetuning, where they
are frozen), and a sparsity penalty switches on after a warm-up. Afterwards `finegates compress`
deletes what closed, exactly as for a finetuned run. Three modes answer whether that pays:

  gated   gates on q,k,v,o,gate,up of every block, sparsity target (default 0.4)
  dense   the same model without gates, same budget
  dense + match_params=N   the config's intermediate_size shrunk so the model has ~N parameters:
          the dense model trained directly at the compressed model's size (the real baseline)

    finegates pretrain --config configs/small-llama.json --text-files wiki.train.tokens \
        --valid-text-file wiki.valid.tokens --test-text-file wiki.test.tokens --sparsity 0.4 --out runs/pt

Tokenizer: a byte-level BPE trained on the training text (`tokenizers`, default 8,192 tokens),
saved as a Hugging Face tokenizer. SmolLM2's 49,152-token vocabulary would put 49k x 384 = 19M
parameters in the embedding of a ~10M-parameter model: the embedding (which gates never cut)
would dominate and the blocks, what pruning acts on, would be a small minority.

Penalty: the paper uses its per-layer penalty, lambda 100, after 1,000 warm-up steps. We keep
lambda 100 and the warm-up (as a fraction of our much shorter runs) but use the `fast` recipe's
gates and top-k budget penalty (regularizer.py): the per-layer penalty pulls every gate vector,
residual-side ones included (compression cannot delete those), towards an *expected* open
fraction, which does not close gates hard. The top-k penalty pushes shut the lowest-ranked
deletable units (MLP units, V/O and Q/K dims) up to a cubic schedule's parameter budget, so the
hard removed fraction, what `compress` deletes, follows the schedule and stops at the target.
Penalty off for the first `reg_start_step` steps (default 20%), ramp over `ramp_steps` (default
50%); the rest trains the final structure. The gate learning rate stays constant after warm-up
(the penalty's schedule, not a decaying lr, should decide when gates close); weights follow a
cosine schedule with linear warm-up. bf16 autocast on CUDA, fp32 on CPU.

RUN_DIR (an lm run: `finegates compress`, `finegates eval`, `lm.load_lm_run` read it):
  config.json            "objective": "lm", "model_location": "model" (RUN_DIR/model), method_config.gate
  model/                 HF folder: tokenizer (written first), config.json + weights (written last)
  trainable.safetensors  the gates (gated mode), tagged with the trained model's fingerprint
  metrics.jsonl          validation perplexity every `eval_every` steps
  checkpoint/state.pt    weights + gates + optimizer + step + data order + RNG (resume), removed at the end
  metrics.json           final: valid/test perplexity, params, removed fraction; "complete": true
A moved run directory loads as it is (its model folder is named relative to it); to resume it or
compress it elsewhere, `relocate(run_dir, data_dir)` points its text files at their new place.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn as nn

from ..compression.exact import linear_params, predicted_kept
from ..core.model import apply_gates, count_params, gate_parameters, gate_state_dict
from ..data.files import append_jsonl, write_json
from ..data.outputs import PRETRAIN_RUN
from ..data.text import eval_ids, pack, tokenize_files
from .checkpoint import CHECKPOINT, FORMAT_VERSION, RunError, model_fingerprint, read_checkpoint, read_run_config, save_trainable
from .lm import LanguageModelling
from .loop import fit, in_run_folder
from .plan import LoopState, Plan
from .methods.registry import Method
from .perplexity import check_window
from .recipes import get_recipe
from .regularizer import TOPK_UNITS, Regularizer
from .runtime import launch, peak_memory_mb, versions
from .schedules import lr_lambda
from .scratch import build_config, build_model, match_intermediate, read_model_config, save_model_folder, train_tokenizer, write_folder

GATED_ROLES = ("q", "k", "v", "o", "gate", "up")  # the paper's pretraining scenario: down is not gated


@dataclass
class PretrainConfig:
    """A pretraining run; `finegates pretrain` options map onto these fields."""

    out: Path = field(metadata={"help": "Run directory to write (an lm run: compress/eval read it)."})
    model_config: Path = field(metadata={"help": "JSON of a Hugging Face decoder config (llama, qwen2, mistral)."})
    text_files: tuple[Path, ...] = field(default=(), metadata={"help": "Training text files, comma-separated."})
    valid_text_file: Path | None = field(default=None, metadata={"help": "Validation text (perplexity every --eval-every steps)."})
    test_text_file: Path | None = field(default=None, metadata={"help": "Test text (perplexity at the end)."})
    tokenizer: Path | None = field(default=None, metadata={"help": "Existing tokenizer folder. Default: train a BPE on the text."})
    vocab_size: int = field(default=8192, metadata={"help": "BPE vocabulary size when training the tokenizer."})
    mode: str = field(default="gated", metadata={
        "help": "gated (weights + gates, penalty to --sparsity) or dense (no gates)."})
    match_params: int | None = field(default=None, metadata={"help": "dense: shrink intermediate_size to about N parameters."})
    sparsity: float = field(default=0.4, metadata={
        "help": "gated: target fraction of block linear parameters removed, in [0, 1)."})
    lam: float = field(default=100.0, metadata={"help": "gated: penalty weight lambda."})
    reg_start_step: int | None = field(default=None, metadata={"help": "gated: step the penalty starts at. Default: 20% of steps."})
    ramp_steps: int | None = field(default=None, metadata={"help": "gated: steps the target ramps over. Default: 50% of steps."})
    prune_units: tuple[str, ...] = field(default=TOPK_UNITS, metadata={"help": "gated: units the penalty may close."})
    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=32, metadata={"help": "Blocks per step."})
    block_size: int = field(default=256, metadata={"help": "Tokens per block."})
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate of the weights (cosine schedule)."})
    gate_lr: float = field(default=1e-2, metadata={"help": "gated: learning rate of the gates."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear learning-rate warm-up steps."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay of matrices (not gates, norms)."})
    grad_clip: float = field(default=1.0, metadata={"help": "Gradient-norm clip of the weights (0: off)."})
    eval_every: int = field(default=100, metadata={"help": "Validation perplexity every N steps."})
    eval_tokens: int | None = field(default=None, metadata={"help": "Validate on the first N tokens only."})
    window: int | None = field(default=None, metadata={"help": "Perplexity window; default block_size."})
    stride: int | None = field(default=None, metadata={"help": "Perplexity stride; default block_size // 2."})
    eval_batch_size: int = field(default=32, metadata={"help": "Windows per evaluation forward pass."})
    checkpoint_every: int = field(default=0, metadata={"help": "Checkpoint every N steps (0: at evaluations)."})
    time_limit_s: float | None = field(default=None, metadata={"help": "Stop training after N seconds (then evaluate and save)."})
    save_dtype: str = field(default="float32", metadata={
        "help": "float32 or bfloat16 (weights rounded to bf16 before the final eval)."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def __post_init__(self) -> None:
        self.out, self.model_config = Path(self.out), Path(self.model_config)
        self.text_files = tuple(Path(p) for p in self.text_files)
        self.prune_units = tuple(self.prune_units)
        for name in ("valid_text_file", "test_text_file", "tokenizer"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        if not self.text_files:
            raise ValueError("pretrain needs --text-files (comma-separated plain text files)")
        if self.valid_text_file is None:
            raise ValueError("pretrain needs --valid-text-file (validation perplexity)")
        for path in (*self.text_files, self.valid_text_file, self.test_text_file):
            if path is not None and not path.is_file():
                raise ValueError(f"text file not found: {path}")
        if self.tokenizer is not None and not self.tokenizer.is_dir():
            raise ValueError(f"tokenizer folder not found: {self.tokenizer}")
        read_model_config(self.model_config)  # missing, not JSON, or not a decoder: one clear line
        if self.mode not in ("gated", "dense"):
            raise ValueError(f"--mode must be gated or dense, got {self.mode!r}")
        if not (0.0 <= self.sparsity < 1.0) or math.isnan(self.sparsity):
            raise ValueError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.match_params is not None and (self.mode != "dense" or self.match_params < 1):
            raise ValueError("--match-params N (N > 0) sizes a dense model: use it with --mode dense")
        if min(self.max_steps, self.batch_size, self.eval_every, self.eval_batch_size) < 1 or self.block_size < 2:
            raise ValueError("--max-steps, --batch-size, --eval-every, --eval-batch-size must be >= 1, --block-size >= 2")
        if min(self.warmup_steps, self.checkpoint_every, self.reg_start_step or 0, self.ramp_steps or 0) < 0:
            raise ValueError("--warmup-steps, --checkpoint-every, --reg-start-step, --ramp-steps must be >= 0")
        if not (0 < self.lr < 1) or not (0 < self.gate_lr < 10) or self.lam < 0 or self.weight_decay < 0:
            raise ValueError("--lr must be in (0, 1), --gate-lr in (0, 10), --lam and --weight-decay >= 0")
        if self.vocab_size < 260:
            raise ValueError(f"--vocab-size must be >= 260 (256 bytes + specials), got {self.vocab_size}")
        if not self.prune_units or set(self.prune_units) - set(TOPK_UNITS):
            raise ValueError(f"--prune-units must be a subset of {', '.join(TOPK_UNITS)}, got {self.prune_units}")
        if self.save_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--save-dtype must be float32 or bfloat16, got {self.save_dtype!r}")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ValueError("--time-limit-s must be > 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        self.window = self.window or self.block_size
        self.stride = self.stride or max(1, self.block_size // 2)
        check_window(self.window, self.stride)

    @property
    def gated(self) -> bool:
        return self.mode == "gated"


def gate_model(model: nn.Module, cfg: PretrainConfig, total: int) -> tuple[dict, Regularizer]:
    """Put gates on GATED_ROLES, make every weight trainable again, build the penalty.

    Returns (method_config for config.json, regularizer)."""
    recipe = get_recipe("fast")
    gate_cfg = replace(recipe.gate, roles=GATED_ROLES, train_bias=False, train_head=False)
    reg_cfg = replace(recipe.reg, sparsity=cfg.sparsity, lam=cfg.lam, units=cfg.prune_units,
                      start_step=cfg.reg_start_step if cfg.reg_start_step is not None else int(0.2 * total),
                      ramp_steps=cfg.ramp_steps if cfg.ramp_steps is not None else int(0.5 * total))
    apply_gates(model, gate_cfg)
    for p in model.parameters():  # apply_gates freezes the weights (finetuning); here they train
        p.requires_grad_(True)
    method_config = {"name": "pretrain-gates", "gate": asdict(gate_cfg), "reg": asdict(reg_cfg), "gate_lr": cfg.gate_lr}
    return method_config, Regularizer(model, reg_cfg)


def param_groups(model: nn.Module, cfg: PretrainConfig) -> list[dict]:
    """AdamW groups: matrices decay; norms and gates do not; gates get their own learning rate."""
    gate_ids = {id(p) for p in gate_parameters(model)}
    params = [p for p in model.parameters() if id(p) not in gate_ids]
    groups = [{"params": [p for p in params if p.dim() >= 2], "lr": cfg.lr, "weight_decay": cfg.weight_decay,
               "name": "weights"},
              {"params": [p for p in params if p.dim() < 2], "lr": cfg.lr, "weight_decay": 0.0, "name": "norms"}]
    if gate_ids:
        # not clipped: lambda-sized penalty gradients on the gates would scale the weights' updates down
        # during the ramp, and Adam normalises the gates' step size anyway
        groups.append({"params": gate_parameters(model), "lr": cfg.gate_lr, "weight_decay": 0.0, "name": "gates",
                       "clip": False})
    for g in groups:
        g["base_lr"] = g["lr"]
    return [g for g in groups if g["params"]]


class PretrainGates(Method):
    """The pretraining scenario as a method of the one loop: gates on GATED_ROLES over trainable
    weights under the top-k penalty (gated mode), or the plain model (dense mode)."""

    name = "pretrain"

    def __init__(self) -> None:
        self.reg: Regularizer | None = None
        self.method_config: dict | None = None

    def prepare(self, model: nn.Module, cfg: "PretrainConfig", total_steps: int) -> list[dict]:
        if cfg.gated:
            self.method_config, self.reg = gate_model(model, cfg, total_steps)
        return param_groups(model, cfg)

    def extra_loss(self, model, step, batch, outputs):
        if self.reg is None:
            return None, {"penalty": 0.0}
        penalty = self.reg(step)[0]
        return penalty, {"penalty": penalty.detach()}  # read back only when a trace line is written

    def progress(self) -> dict:
        return {"removed": f"{self.reg.removed_fraction():.2f}"} if self.reg is not None else {}

    def state(self) -> dict:
        return self.reg.state() if self.reg is not None else {}

    def load_state(self, state: dict) -> None:
        if self.reg is not None:
            self.reg.load_state(state)

    def config(self) -> dict | None:
        return self.method_config


class Pretraining(LanguageModelling):
    """Language modelling whose records keep pretraining's curve: valid perplexity, lr, penalty."""

    def __init__(self, blocks, valid, cfg: "PretrainConfig", method: PretrainGates, lr_at) -> None:
        super().__init__(blocks, valid, cfg.window, cfg.stride, cfg.eval_batch_size, name=f"pretrain {cfg.mode}")
        self.method, self.lr_at = method, lr_at

    def evaluate(self, model, state: LoopState) -> dict:
        record = {"train_loss": state.task_loss, "penalty": state.logs.get("penalty", 0.0),
                  "valid": self.perplexity(model), "lr": self.lr_at(state.step - 1), "train_seconds": state.t_train}
        if self.method.reg is not None:
            record["removed_fraction"] = self.method.reg.removed_fraction()
        return record

    def describe(self, record: dict) -> str:
        return f"step {record['step']}: valid perplexity {record['valid']['perplexity']:.3f}"


def relocate(run_dir, data_dir: Path | None = None) -> dict:
    """Point a moved run directory's config.json at its own model folder (and at `data_dir` for
    text files that are not where they were). Returns the updated config."""
    run_dir = Path(run_dir).resolve()
    run = read_run_config(run_dir)
    run["model_location"] = "model"  # relative to the run (lm.run_location); older runs held an absolute path
    for key in ("text_files", "valid_text_file", "test_text_file", "eval_text_file"):
        value = run["train"].get(key)
        if data_dir is None or value is None:
            continue
        moved = [str(Path(data_dir) / Path(v).name) if not Path(v).is_file() else v
                 for v in (value if isinstance(value, list) else [value])]
        run["train"][key] = moved if isinstance(value, list) else moved[0]
    write_json(run_dir / "config.json", run)
    return run


def config_from_run(run_dir) -> PretrainConfig:
    """The PretrainConfig a run was started with (for resume); `out` is where the run is now."""
    run = read_run_config(Path(run_dir))
    if run.get("train", {}).get("method", "").split("-")[0] != "pretrain":
        raise RunError(f"{run_dir}: not a pretraining run")
    known = {f.name for f in fields(PretrainConfig)}
    return PretrainConfig(**{**{k: v for k, v in run["train"].items() if k in known}, "out": Path(run_dir)})


# ---- training ---------------------------------------------------------------------------------------
def pretrain(cfg: PretrainConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Train from scratch, validate every `eval_every` steps, test at the end, write RUN_DIR (new,
    empty or resumed; `overwrite=True` replaces an earlier run once the new one is complete)."""
    inputs = (cfg.model_config, *cfg.text_files, cfg.valid_text_file, cfg.test_text_file, cfg.tokenizer)
    return in_run_folder(_pretrain, cfg, PRETRAIN_RUN, inputs, resume, overwrite)


def _pretrain(cfg: PretrainConfig, resume: bool, target: Path) -> dict:
    """`pretrain` writing into `cfg.out` (the run directory, or a staging folder that becomes `target`)."""
    from transformers import AutoTokenizer

    procs, device = launch(cfg.seed, cfg.device, cfg.batch_size)
    out = cfg.out
    state = read_checkpoint(out) if resume else None
    if resume and state is None:
        raise RunError(f"{out}: no checkpoint to resume from")
    if state is None:  # a fresh start: the tokenizer first, so a resumed run reads the same one
        out.mkdir(parents=True, exist_ok=True)
        for stale in ("metrics.json", "metrics.jsonl", "trainable.safetensors"):
            (out / stale).unlink(missing_ok=True)
        for stale in ("model", CHECKPOINT.parent):
            shutil.rmtree(out / stale, ignore_errors=True)
        tok = AutoTokenizer.from_pretrained(cfg.tokenizer) if cfg.tokenizer else \
            train_tokenizer(cfg.text_files, cfg.vocab_size)
        write_folder(out / "model", lambda tmp: tok.save_pretrained(tmp))
    tok = AutoTokenizer.from_pretrained(out / "model")
    if tok.eos_token_id is None:
        raise ValueError(f"{cfg.tokenizer}: the tokenizer has no EOS token (needed between files)")
    config = build_config(read_model_config(cfg.model_config), tok)
    if cfg.match_params:
        config = match_intermediate(config, cfg.match_params)
    if max(cfg.block_size, cfg.window) > config.max_position_embeddings:
        raise ValueError(f"block size / window exceed the config's max_position_embeddings "
                         f"({config.max_position_embeddings})")
    blocks_ = pack(tokenize_files(cfg.text_files, tok), cfg.block_size)
    valid = eval_ids(cfg.valid_text_file, tok, cfg.eval_tokens)

    model = build_model(config, cfg.seed)
    fingerprint = model_fingerprint(model)  # of the initialisation: checks a resumed checkpoint
    method = PretrainGates()
    groups = method.prepare(model, cfg, cfg.max_steps)
    model.to(device)
    schedule = lr_lambda("cosine", cfg.max_steps, cfg.warmup_steps)

    def lr_factor(step: int, group: dict) -> float:  # weights: warm-up then cosine; gates: warm-up then constant
        return schedule(step) if group["name"] != "gates" or step < cfg.warmup_steps else 1.0

    run_config = {
        "format_version": FORMAT_VERSION, "objective": "lm", "task": "lm",
        "train": {**asdict(cfg), "out": str(target), "method": f"pretrain-{cfg.mode}",
                  "eval_text_file": cfg.valid_text_file},
        "model_location": "model", "method_config": method.config(),  # relative: the run's own folder
        "model_config": config.to_dict(), "train_tokens": int(blocks_.numel()), "versions": versions(),
    }
    objective = Pretraining(blocks_, valid, cfg, method, lambda step: cfg.lr * schedule(step))
    plan = Plan(out=out, total_steps=cfg.max_steps, batch_size=cfg.batch_size, seed=cfg.seed,
                eval_at=set(range(cfg.eval_every, cfg.max_steps + 1, cfg.eval_every)),
                checkpoint_every=cfg.checkpoint_every, grad_clip=cfg.grad_clip, progress=cfg.progress,
                time_limit_s=cfg.time_limit_s, lr_factor=lr_factor, betas=(0.9, 0.95), save_at_eval=False,
                desc=objective.name)
    st = fit(model, method, groups, objective, plan, procs=procs, device=device, fingerprint=fingerprint,
             config=run_config, ckpt=state)
    return _finish(cfg, model, config, tok, method.reg, objective, st, device, peak_memory_mb(device))


def _finish(cfg, model, config, tok, reg, objective: Pretraining, st: LoopState, device, peak_mb) -> dict:
    """Round (bfloat16 saving), evaluate, save model folder + gates, write metrics.json."""
    out = cfg.out
    dtype = getattr(torch, cfg.save_dtype)
    gate_ids = {id(p) for p in gate_parameters(model)}
    with torch.no_grad():  # bf16-representable weights: the saved model is exactly the evaluated one
        for p in model.parameters():
            if id(p) not in gate_ids:
                p.copy_(p.to(dtype).float())
    final = objective.perplexity(model)
    test = objective.perplexity(model, eval_ids(cfg.test_text_file, tok)) if cfg.test_text_file is not None else None
    if st.stopped_early:  # the curve ends where training did
        append_jsonl(out / "metrics.jsonl", {"step": st.step, "valid": final, "train_seconds": st.t_train,
                                             "stopped_early": True})
    model.cpu()
    fingerprint = model_fingerprint(model)  # of the trained model: what loaders.load_lm_run will compute
    save_model_folder(model, config, out / "model", dtype)
    metrics = {
        "objective": "lm", "method": f"pretrain-{cfg.mode}", "mode": cfg.mode, "steps": st.step,
        "max_steps": cfg.max_steps, "stopped_early": st.stopped_early, "valid": final, "test": test,
        "perplexity": final["perplexity"], "test_perplexity": test["perplexity"] if test else None,
        "params": count_params(model), "model_config": {k: getattr(config, k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size")},
        "train_tokens_seen": st.step * cfg.batch_size * cfg.block_size, "train_seconds": st.t_train,
        "seconds_per_step": st.t_train / max(st.step, 1), "peak_memory_mb": peak_mb,
        "device": str(device), "window": cfg.window, "stride": cfg.stride, "complete": True,
    }
    if reg is not None:
        save_trainable(out / "trainable.safetensors", model, fingerprint, st.step,
                       {n: p.detach() for n, p in gate_state_dict(model).items() if n.endswith(".theta")})
        metrics.update(removed_fraction=reg.removed_fraction(), sparsity=cfg.sparsity,
                       block_linear_params=linear_params(model), predicted_kept_linear_params=predicted_kept(model))
    shutil.rmtree(out / CHECKPOINT.parent, ignore_errors=True)
    write_json(out / "metrics.json", metrics)
    return metrics
