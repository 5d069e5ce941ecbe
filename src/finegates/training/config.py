"""What a training run is asked to do: one dataclass per objective, each field with its help text.

`RunConfig` holds what classification and language modelling share (the method, the gate recipe
and its overrides, the loop's settings): `TrainConfig` and `LMConfig` embed it by inheritance,
so a shared field is declared once and `GatesMethod` reads either. `config_from_run` reads the
config a run was started with back from its directory (for `--resume`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..core.pooling import POOLINGS
from .checkpoint import RunError, read_run_config
from .perplexity import check_window
from .plan import Plan
from .recipes import DEFAULT_RECIPE


@dataclass
class RunConfig:
    """The fields every gate-training objective shares; the CLI's `train` options map onto them."""

    out: Path = field(metadata={"help": "Run directory to write (config, metrics, trained gates)."})
    method: str = field(default="gates", metadata={
        "help": "Training method: gates (FineGates), or a baseline: full, bitfit, lora, pst, gmp, magnitude."})
    recipe: str = field(default=DEFAULT_RECIPE, metadata={
        "help": "Gate recipe: finetune (ours: weights finetune too, units close by importance), frozen (ours: "
        "frozen weights, gates over a rank-4 update of q,v, units close by importance), fast (ours: frozen weights, "
        "only gates/biases/head train), paper (published code), stg, paper-lm. Default: finetune; paper-lm with "
        "--objective lm."})
    recipe_options: dict = field(default_factory=dict, metadata={"help": "Dotted-path recipe overrides, e.g. {'reg.lam': 10}."})
    method_options: dict = field(default_factory=dict, metadata={"help": "Method-specific options (--opt key=value)."})
    distill: str | None = field(default=None, metadata={
        "help": "Feature distillation from the dense model (SquareHead): none or squarehead. Default: squarehead "
        "for gmp, none otherwise (supported by gates, full, gmp)."})
    sparsity: float = field(default=0.4, metadata={
        "help": "Target fraction of transformer-layer parameters to remove, in [0, 1). Default: 0.4; 0.3 for lm."})
    epochs: float = field(default=3, metadata={"help": "Training epochs."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimizer steps."})
    batch_size: int = field(default=16, metadata={"help": "Training batch size."})
    eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size."})
    lr: float | None = field(default=None, metadata={
        "help": "Gate learning rate (main lr for baselines). Default: per recipe."})
    head_lr: float | None = field(default=None, metadata={"help": "Task-head learning rate. Default: per recipe."})
    lam: float | None = field(default=None, metadata={"help": "Penalty weight lambda (initial value under the controller)."})
    reg_start_step: int | None = field(default=None, metadata={"help": "Step at which the sparsity penalty starts."})
    regularizer: str | None = field(default=None, metadata={"help": "Override the recipe's penalty: layer, stg, budget."})
    train_bias: bool | None = field(default=None, metadata={"help": "Train biases of gated layers."})
    train_weights: bool | None = field(default=None, metadata={
        "help": "Finetune the weights of gated layers too (gates over finetuned weights; a run file the size of "
        "the model). Default: per recipe (finetune: trained; fast, paper: frozen)."})
    gate_roles: tuple[str, ...] | None = field(default=None, metadata={"help": "Override: roles to gate."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    grad_clip: float = field(default=1.0, metadata={"help": "Gradient-norm clip (0: off)."})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda."})
    trace_every: int = field(default=0, metadata={"help": "Log gate internals to trace.jsonl every N steps (0: off)."})
    checkpoint_every: int = field(default=0, metadata={
        "help": "Also checkpoint every N steps for --resume (0: at evaluations)."})
    skip_nonfinite: bool = field(default=False, metadata={"help": "Skip (and count) batches with a NaN/inf loss or gradient."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    log_every: int = field(default=50, metadata={
        "help": "Progress statistics every N steps (a plain line when not on a terminal)."})
    cuda_graphs: bool = field(default=True, metadata={
        "help": "On one GPU, replay each training step as a CUDA graph (batches padded to one length; "
        "steps that cannot be replayed run eagerly, and metrics.json says why): 3-5x faster steps for "
        "MPNet-base on an H200, accuracy checked there; decoders' replayed steps are not yet checked on a "
        "GPU. --no-cuda-graphs runs every step eagerly."})

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if not (0.0 <= self.sparsity < 1.0) or math.isnan(self.sparsity):
            raise ValueError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if not (0 < self.epochs < math.inf):
            raise ValueError(f"--epochs must be positive and finite, got {self.epochs}")
        if self.batch_size <= 0:
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be at least 1, got {self.max_steps}")
        for name in ("eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("trace_every", "checkpoint_every", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.lam is not None and not (0 <= self.lam < math.inf):
            raise ValueError(f"--lam must be >= 0 and finite, got {self.lam}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        for name in ("lr", "head_lr"):
            v = getattr(self, name)
            if v is not None and not (0 < v < 10):
                raise ValueError(f"--{name.replace('_', '-')} must be in (0, 10), got {v}")
        if self.distill is not None and self.distill not in ("none", "squarehead"):
            raise ValueError(f"--distill must be none or squarehead, got {self.distill!r}")
        self.method_options = dict(self.method_options)
        if self.gate_roles is not None:
            self.gate_roles = tuple(self.gate_roles)

    def total_steps(self, steps_per_epoch: int) -> int:
        """`epochs` worth of steps, capped by `max_steps`."""
        total = math.ceil(self.epochs * steps_per_epoch)
        return min(total, self.max_steps) if self.max_steps else total

    def plan(self, total_steps: int, eval_at: set[int], **more) -> Plan:
        """The loop's settings from this config (`more`: the objective's own, e.g. an lr schedule)."""
        return Plan(out=self.out, total_steps=total_steps, batch_size=self.batch_size, eval_at=eval_at,
                    seed=self.seed, checkpoint_every=self.checkpoint_every, grad_clip=self.grad_clip,
                    skip_nonfinite=self.skip_nonfinite, trace_every=self.trace_every, progress=self.progress,
                    log_every=self.log_every, cuda_graphs=self.cuda_graphs, **more)


@dataclass
class TrainConfig(RunConfig):
    """A classification run (GLUE or own data); `finegates train` options map onto these fields."""

    model: str | None = field(default=None, metadata={
        "help": "HF model folder, hub id, smollm2 or mpnet (prepared on first use). Default: the embedded "
        "MiniLM-L6; smollm2 with --objective lm."})
    task: str | None = field(default=None, metadata={
        "help": "GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli."})
    data_dir: Path | None = field(default=None, metadata={"help": "GLUE task folder holding train.tsv and dev.tsv."})
    train_file: Path | None = field(default=None, metadata={"help": "Own data: training file (.csv, .tsv, .jsonl)."})
    eval_file: Path | None = field(default=None, metadata={"help": "Own data: evaluation file."})
    text_columns: tuple[str, ...] = field(default=(), metadata={"help": "Own data: text column(s), comma-separated (1 or 2)."})
    label_column: str = field(default="label", metadata={"help": "Own data: label column."})
    regression: bool = field(default=False, metadata={"help": "Own data: the label is a number (regression)."})
    max_length: int = field(default=128, metadata={"help": "Max tokens per example."})
    train_limit: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})
    eval_limit: int | None = field(default=None, metadata={"help": "Use only the first N evaluation examples."})
    evals_per_epoch: int = field(default=1, metadata={"help": "Evaluations per epoch."})
    pooling: str = field(default="auto", metadata={
        "help": "Which token state the classification head reads: cls, mean, or auto (the pooling the checkpoint "
        "was trained with: mean for sentence-transformers folders such as the default MiniLM)."})
    teacher: str | None = field(default=None, metadata={
        "help": "Distil logits from a finetuned teacher: a run directory (e.g. --method full), compressed or HF "
        "model folder with the same tokenizer. Its training-set logits are computed once and cached in "
        "its folder."})
    kd_weight: float = field(default=0.5, metadata={"help": "With --teacher: loss = (1 - w) * task loss + w * KD loss "
                                                     "(--objective lm: w of the KL to the dense model; default: the recipe's)."})
    kd_temperature: float = field(default=2.0, metadata={"help": "With --teacher: softmax temperature of the KD loss "
                                                          "(--objective lm: default 1)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_length <= 0:
            raise ValueError(f"--max-length must be positive, got {self.max_length}")
        for name in ("train_limit", "eval_limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
        if self.evals_per_epoch < 1:
            raise ValueError(f"--evals-per-epoch must be at least 1, got {self.evals_per_epoch}")
        if self.task is None and self.train_file is None:
            raise ValueError("give --task with --data-dir, or --train-file/--eval-file with --text-columns")
        if self.task is not None and self.data_dir is None:
            raise ValueError(f"--task {self.task} needs --data-dir (the folder with train.tsv and dev.tsv)")
        if self.train_file is not None and (self.eval_file is None or not self.text_columns):
            raise ValueError("--train-file needs --eval-file and --text-columns")
        if len(self.text_columns) > 2:
            raise ValueError("--text-columns takes one or two columns")
        self.text_columns = tuple(self.text_columns)
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"--kd-weight must be in [0, 1], got {self.kd_weight}")
        if not 0.0 < self.kd_temperature < math.inf:
            raise ValueError(f"--kd-temperature must be positive and finite, got {self.kd_temperature}")
        if self.teacher is not None:
            self.teacher = str(self.teacher)
            if not Path(self.teacher).is_dir():
                raise ValueError(f"--teacher {self.teacher}: no such folder (a finetuned run, compressed or HF model folder)")
        if self.pooling not in POOLINGS:
            raise ValueError(f"--pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")


@dataclass
class LMConfig(RunConfig):
    """A language-modelling run; `finegates train --objective lm` options map onto these fields."""

    # the shared fields whose default differs for decoders
    recipe: str = field(default="paper-lm", metadata={"help": "Gate recipe (paper-lm: the paper's LM mode)."})
    sparsity: float = field(default=0.3, metadata={"help": "Target fraction of layer parameters removed."})
    epochs: float = field(default=1, metadata={"help": "Passes over the training blocks."})
    batch_size: int = field(default=8, metadata={"help": "Blocks per training step."})
    eval_batch_size: int = field(default=8, metadata={"help": "Windows per evaluation forward pass."})
    # its own
    model: str | None = field(default="smollm2", metadata={"help": "Decoder: folder, hub id or 'smollm2'."})
    text_files: tuple[Path, ...] = field(default=(), metadata={"help": "lm: training text files, comma-separated."})
    eval_text_file: Path | None = field(default=None, metadata={"help": "lm: text file to measure perplexity on."})
    block_size: int = field(default=256, metadata={"help": "lm: tokens per training sequence."})
    window: int = field(default=512, metadata={"help": "lm: perplexity window (tokens)."})
    stride: int = field(default=256, metadata={"help": "lm: perplexity stride (tokens)."})
    eval_tokens: int | None = field(default=None, metadata={"help": "lm: evaluate on the first N tokens only."})
    eval_dense: bool = field(default=True, metadata={"help": "lm: also measure the dense model's perplexity first."})
    eval_amp: bool = field(default=True, metadata={"help": "GPU: evaluate under bf16 autocast (False: fp32)."})
    schedule: str = field(default="cosine", metadata={"help": "Learning-rate schedule: cosine or constant."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear learning-rate warm-up steps."})
    evals: int = field(default=1, metadata={"help": "Evaluations during training (the last at the end)."})
    drop_unk: bool = field(default=True, metadata={
        "help": "lm: drop the whole-word <unk> placeholders of tokenized corpora (WikiText-2 .tokens, PTB) from the "
        "training text (data/text.py says why); the evaluation text is read as it is."})
    kd_weight: float | None = field(default=None, metadata={
        "help": "lm: loss = (1 - w) * LM loss + w * KL to the dense starting model's next-token distribution "
        "(a frozen copy). Default: the recipe's (lm-distill: 0.5; others: 0, no teacher)."})
    kd_temperature: float = field(default=1.0, metadata={"help": "lm: softmax temperature of that KL."})

    def __post_init__(self) -> None:
        self.text_files = tuple(Path(p) for p in self.text_files)
        if self.eval_text_file is not None:
            self.eval_text_file = Path(self.eval_text_file)
        if not self.text_files:
            raise ValueError("--objective lm needs --text-files (comma-separated plain text files)")
        if self.eval_text_file is None:
            raise ValueError("--objective lm needs --eval-text-file (the text to measure perplexity on)")
        super().__post_init__()
        check_window(self.window, self.stride)
        if self.evals < 1 or self.block_size < 2:
            raise ValueError("--evals must be positive and --block-size at least 2 tokens")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"--schedule must be cosine or constant, got {self.schedule!r}")
        if self.kd_weight is not None and not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"--kd-weight must be in [0, 1], got {self.kd_weight}")
        if not 0.0 < self.kd_temperature < math.inf:
            raise ValueError(f"--kd-temperature must be positive and finite, got {self.kd_temperature}")


def config_from_run(run_dir: Path) -> TrainConfig | LMConfig:
    """The config a classification or LM run was started with (for `--resume`); `out` is where the
    run is now."""
    path = Path(run_dir) / "config.json"
    run = read_run_config(run_dir)
    objective = run.get("objective", "classify")
    cls = {"classify": TrainConfig, "lm": LMConfig}.get(objective)
    if cls is None or str(run["train"].get("method", "")).startswith("pretrain"):
        raise RunError(f"{path}: an {objective!r} run of {run['train'].get('method')!r}; `finegates train --resume` "
                       "continues classification and language-modelling runs (pretraining: `finegates pretrain --resume`)")
    stored = dict(run["train"])
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(stored) - known)
    if unknown:
        raise RunError(f"{path}: unknown training options {', '.join(unknown)}")
    for key in ("data_dir", "train_file", "eval_file", "eval_text_file"):
        if stored.get(key) is not None:
            stored[key] = Path(stored[key])
    for key in ("text_columns", "gate_roles", "text_files"):
        if stored.get(key) is not None:
            stored[key] = tuple(stored[key])
    stored["out"] = Path(run_dir)
    try:
        return cls(**stored)
    except (TypeError, ValueError) as e:
        raise RunError(f"{path}: {e}") from None
