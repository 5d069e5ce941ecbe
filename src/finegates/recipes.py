"""Named gate-training recipes: gate parameterisation + penalty + learning rates.

`paper` is the authors' published implementation (METHOD.md section 1), kept as the reference.
`stg` is the original stochastic-gates parameterisation (Yamada et al., 2020).
`fast` is ours (docs/gate-training.md has the study behind it): gates start just below
saturation so the task gradient reaches them from step 0, only deletable gates are penalised,
weighted by the parameters they delete, and lambda is steered by the hard removed count along
a cubic schedule, so the target is reached on time and the gates that close are the ones the
task needs least.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .gates import GateParam
from .model import GateConfig
from .regularizer import RegConfig


@dataclass(frozen=True)
class Recipe:
    name: str
    gate: GateConfig
    reg: RegConfig
    gate_lr: float
    head_lr: float
    bias_lr: float = 1e-3
    ramp_fraction: float = 0.0  # controller target ramp, as a fraction of all training steps
    description: str = ""
    notes: dict = field(default_factory=dict)


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
        reg=RegConfig(kind="budget", lam=0.01, controller=True, controller_rate=0.05),
        gate_lr=1e-2,
        head_lr=1e-3,
        bias_lr=1e-3,
        ramp_fraction=0.6,
        description="ours: identity mean just below saturation, budget penalty, lambda controller on the hard count",
    )


RECIPES = {"paper": _paper, "stg": _stg, "fast": _fast}
DEFAULT_RECIPE = "fast"


def get_recipe(name: str, **overrides) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPES)}")
    recipe = RECIPES[name]()
    return replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
