"""Named gate-training recipes: gate parameterisation + penalty + learning rates.

`paper` is the authors' published implementation (METHOD.md section 1), kept as the reference.
`stg` is the original stochastic-gates parameterisation (Yamada et al., 2020).
`fast` is ours for frozen weights (docs/gate-training.md sections 1-6 have the study behind it):
gates start just below saturation so the task gradient reaches them from step 0; the first 20% of
steps train without penalty, so the gates (and head) learn the task before anything is ranked; then
only deletable units are penalised, and only the lowest-ranked ones up to a cubic schedule's
parameter budget (regularizer.py, "topk"), so the target is reached on schedule (the ramp ends at
70% of training), without overshoot. Biases of gated layers train too (BitFit-like capacity). Only
the gates, biases and head train: a 0.9 MB run file for MiniLM.
`finetune` is the default (section 8): the weights, biases, LayerNorms and head finetune at full
finetuning's lr under gates that start fully open, and gates close by decision rather than by drift:
each step the least important MLP units (by their gates' Taylor scores) are closed outright, up to
the same cubic schedule (regularizer.py, "taylor"). It matches full finetuning at 40% removed where
`fast` loses 3-7 points on SST-2 and RTE, at the cost of training every weight (a run file the size of the model).
`frozen` (section 9) keeps the pretrained weights frozen like `fast` but closes units like
`finetune`, and gives the gates a rank-4 update of q and v to scale (merged before compression):
level with LoRA at base scale, which the gates alone are not.

All rank MLP units only by default: closed attention dims spread over heads save little CPU time
(compressed heads are padded to one width per layer), closed MLP units save exactly their share
(study round 6); `--prune-units` widens `fast`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..core.gates import GateParam
from ..core.model import GateConfig
from .regularizer import RegConfig


@dataclass(frozen=True)
class Recipe:
    name: str
    gate: GateConfig
    reg: RegConfig
    gate_lr: float
    head_lr: float
    bias_lr: float = 1e-3
    weight_lr: float = 2e-5  # with gate.train_weights: full finetuning's lr (Devlin et al., 2019)
    adapter_lr: float = 5e-4  # with gate.adapter_rank: LoRA's usual lr
    ramp_fraction: float = 0.0  # scheduled-target ramp, as a fraction of all training steps
    warmup_fraction: float = 0.0  # penalty-free start (gates learn the task first), fraction of all steps
    description: str = ""
    notes: dict = field(default_factory=dict)
    kd_weight: float = 0.0  # LM objective only: weight of the KL to the dense starting model (lm.py)


def _paper() -> Recipe:
    return Recipe(
        name="paper",
        gate=GateConfig(param=GateParam(mean_fn="tanh", init_mean=1.0, init_std=0.1, noise_std=0.1, reg_sigma=0.5)),
        reg=RegConfig(kind="layer", lam=50.0),
        gate_lr=1e-3,
        head_lr=1e-3,
        description="published FineGates code: tanh mean, theta~N(1,0.1), per-layer target, lambda 50, lr 1e-3",
    )


def _stg() -> Recipe:
    return Recipe(
        name="stg",
        gate=GateConfig(param=GateParam(mean_fn="identity", init_mean=0.0, init_std=0.01, noise_std=0.5, reg_sigma=0.5)),
        reg=RegConfig(kind="stg", lam=1.0),
        gate_lr=1e-2,
        head_lr=1e-3,
        description="original STG: mu~0 (half open), sigma 0.5 in noise and penalty, lambda * mean P(open)",
    )


def _fast() -> Recipe:
    return Recipe(
        name="fast",
        gate=GateConfig(
            param=GateParam(mean_fn="identity", init_mean=0.45, init_std=0.0, noise_std=0.05, reg_sigma=0.5),
            train_bias=True,
        ),
        reg=RegConfig(kind="budget", lam=5.0, schedule="topk", units=("mlp",)),
        gate_lr=1e-2,
        head_lr=1e-3,
        bias_lr=1e-3,
        warmup_fraction=0.2,
        ramp_fraction=0.5,
        description="ours: identity mean just below saturation; no penalty for the first 20% of steps, then a "
        "top-k budget penalty (lambda 5) on MLP units, on a cubic schedule over the next 50%",
    )


def _finetune() -> Recipe:
    return Recipe(
        name="finetune",
        gate=GateConfig(
            param=GateParam(mean_fn="identity", init_mean=0.5, init_std=0.0, noise_std=0.0, reg_sigma=0.5),
            train_bias=True, train_weights=True, train_norm=True,
        ),
        reg=RegConfig(kind="budget", lam=0.0, schedule="taylor", units=("mlp",)),
        gate_lr=1e-3,
        head_lr=2e-5,
        bias_lr=2e-5,  # biases and LayerNorms
        weight_lr=2e-5,
        warmup_fraction=0.2,
        ramp_fraction=0.5,
        description="ours, default: weights, biases, LayerNorms and head finetune at 2e-5 under gates that start "
        "open (no noise, gate lr 1e-3); no penalty: from 20% of steps the least important MLP units (EMA of "
        "squared Taylor scores) are closed outright, on a cubic schedule to 70%",
    )


def _frozen() -> Recipe:
    """Frozen pretrained weights, trained like `finetune` closes units (issue 20's study, rounds 1-2).

    Gates start open without noise and close MLP units by Taylor importance on the cubic schedule;
    inside the gates a rank-4 update of the q and v weights trains with them (`W' = z_r (W + s B A)
    z_c`, the authors' SparseLoRALayer), merged into W before compression, so the compressed model is
    no larger. On MPNet-base it is level with LoRA (RTE, CoLA, MRPC, STS-B) at 40% removed with
    0.99M trainable parameters (0.9% of the model); the same gates without the update lose 5 RTE
    points. The head trains slowly (1e-4): faster heads made RTE fall to the majority class.
    """
    base = _fast()
    return replace(
        base, name="frozen",
        gate=replace(base.gate, param=replace(base.gate.param, init_mean=0.5, noise_std=0.0),
                     adapter_rank=4, adapter_roles=("q", "v")),
        reg=replace(base.reg, schedule="taylor"),
        gate_lr=3e-3, head_lr=1e-4, adapter_lr=5e-4,
        description="ours, frozen weights: gates start open (no noise, gate lr 3e-3) over a rank-4 update of q,v "
        "(lr 5e-4, merged before compression), biases at 1e-3, head at 1e-4; from 20% of steps the least important "
        "MLP units (Taylor) are closed on a cubic schedule to 70%",
    )


def _paper_lm() -> Recipe:
    """The paper's post-training mode for decoders (LM loss): paper gates, lr 1e-2, target 0.3.

    Every linear layer of the blocks is gated (GateConfig's default roles); the LM loop
    (lm.py) adds the cosine schedule. There is no task head.
    """
    base = _paper()
    return replace(
        base, name="paper-lm", reg=replace(base.reg, sparsity=0.3), gate_lr=1e-2,
        description="published FineGates code, LM post-training mode: every block linear gated, lr 1e-2, "
        "cosine schedule, target 0.3",
    )


def _lm_fast() -> Recipe:
    """Issue 21 (a): `fast` for decoders on the LM loss, the recipe of the first SmolLM2 benchmark.

    Frozen weights, only the gates train (no task head; Llama has no biases). Every deletable unit
    kind is ranked (MLP units, V/O dims, Q/K pairs): a decoder's attention is a quarter of its block
    parameters and the LM loss has no task head to protect. lambda is 40, not 5: a penalty of lambda
    5 spread over SmolLM2's ~72k units gives each chosen gate a gradient ~5x below the LM gradient's
    noise (measured on CPU before the first GPU run). Warm-up 15%, ramp over the next 45%. What it
    lacked in that run was budget (~320 steps on 0.25M tokens), so the benchmark trains it alone
    for its fixed minutes on the larger training text.
    """
    base = _fast()
    return replace(
        base, name="lm-fast", reg=replace(base.reg, units=("mlp", "vo", "qk"), lam=40.0),
        warmup_fraction=0.15, ramp_fraction=0.45,
        description="fast for the LM loss: every unit kind ranked, lambda 40, no penalty for the first 15% of steps, "
        "then top-k on a cubic schedule over the next 45%",
    )


def _lm_distill() -> Recipe:
    """Issue 21 (b): the `finetune` idea for decoders, with the dense model as teacher.

    Weights cannot train in full where the run file must travel (a full SmolLM2 is 538 MB), so a
    rank-8 update of *every* gated linear (q, k, v, o, gate, up, down: W' = z_r (W + s B A) z_c,
    2.4M parameters on SmolLM2, merged into W before compression) and the RMSNorm weights train
    under the gates. Gates start open without noise and nothing pushes them: from 10% of the steps
    the least important MLP units (EMA of squared Taylor scores) are closed outright on a cubic
    schedule that ends at 60%, leaving 40% of the steps to recover at the final structure (gradual
    pruning with a recovery tail, as in Zhu & Gupta 2017 and Sheared-LLaMA). The loss mixes the LM
    loss with the KL to the dense model's next-token distribution (kd_weight 0.5, temperature 1):
    the teacher is the model we start from, so it costs a forward pass and one frozen copy, and it
    gives every position a full distribution to match rather than one token (Minitron, Muralidharan
    et al. 2024, recover pruned LLMs by logit distillation alone). Only MLP units close (the taylor
    schedule's unit): without training, MLP units alone were the better choice on SmolLM2 at 20%
    removed and the worse at 30% (docs/decoders.md, measured on CPU), and closing single query
    heads breaks the equal heads-per-KV-group layout that the stock attention computes.
    """
    base = _finetune()
    return replace(
        base, name="lm-distill",
        gate=replace(base.gate, train_weights=False, train_norm=True, adapter_rank=8,
                     adapter_roles=("q", "k", "v", "o", "gate", "up", "down")),
        gate_lr=1e-3, head_lr=1e-4, bias_lr=1e-4, adapter_lr=3e-4, warmup_fraction=0.1, ramp_fraction=0.5,
        kd_weight=0.5,
        description="ours for decoders: frozen weights + rank-8 update of every linear (lr 3e-4, merged before "
        "compression) and RMSNorms (1e-4) under open gates (lr 1e-3); from 10% of steps the least important MLP units "
        "(Taylor) close on a cubic schedule to 60%; loss 0.5 LM + 0.5 KL to the dense model",
    )


RECIPES = {"finetune": _finetune, "frozen": _frozen, "fast": _fast, "paper": _paper, "stg": _stg, "paper-lm": _paper_lm,
           "lm-fast": _lm_fast, "lm-distill": _lm_distill}
DEFAULT_RECIPE = "finetune"


def get_recipe(name: str, options: dict | None = None) -> Recipe:
    """A named recipe, with dotted-path overrides, e.g. {"gate.param.init_mean": 0.4, "reg.lam": 10}."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPES)}")
    recipe = RECIPES[name]()
    for path, value in (options or {}).items():
        recipe = _replace_path(recipe, path.split("."), value)
    return recipe


def _replace_path(obj, path: list[str], value):
    """`dataclasses.replace` along a dotted path of nested dataclasses."""
    head, rest = path[0], path[1:]
    if not hasattr(obj, head):
        raise ValueError(f"recipe option {'.'.join(path)!r}: {type(obj).__name__} has no field {head!r}")
    new = _replace_path(getattr(obj, head), rest, value) if rest else value
    return replace(obj, **{head: new})
