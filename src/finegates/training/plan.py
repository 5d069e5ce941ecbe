"""The one loop's settings and counters as data: a variant of training is a `Plan`, not a loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class Plan:
    """How the loop runs: the variant's settings as data."""

    out: Path
    total_steps: int
    batch_size: int  # the global batch: each process takes its slice
    eval_at: set[int]  # steps after which to evaluate (the last step always)
    seed: int = 0
    steps_per_epoch: int = 1
    checkpoint_every: int = 0  # also checkpoint every N steps (besides at evaluations)
    grad_clip: float = 1.0  # over the groups whose "clip" is not False (0: measure only)
    skip_nonfinite: bool = False
    trace_every: int = 0
    progress: bool = True
    log_every: int = 50  # progress statistics every N steps (each read waits for the device)
    time_limit_s: float | None = None  # stop early (then the caller evaluates and saves)
    lr_factor: Callable[[int, dict], float] | None = None  # step, param group -> factor of its "base_lr"
    betas: tuple[float, float] = (0.9, 0.999)
    save_at_eval: bool = True  # write trainable.safetensors at each evaluation
    cuda_graphs: bool = False  # on one GPU, replay steps as CUDA graphs where the objective and method allow
    desc: str = "train"


@dataclass
class LoopState:
    """The loop's counters: what a checkpoint stores besides the tensors, and what `fit` returns."""

    step: int = 0
    t_train: float = 0.0
    order: list = field(default_factory=list)
    history: list = field(default_factory=list)
    skipped: int = 0
    in_a_row: int = 0
    stopped_early: bool = False
    task_loss: float = float("nan")  # of the last step before an evaluation
    logs: dict = field(default_factory=dict)  # that step's logged scalars (penalty, lambda, ...)
    peak_mb: float | None = None  # training's peak memory (before the last evaluation)
    steady_seconds_per_step: float | None = None  # after this process's first steps (loop.WARM_STEPS)
    graph_steps: int = 0  # steps replayed as a CUDA graph (step_graph.py)
    graph_fallback: str | None = None  # why steps ran eagerly though CUDA graphs were asked for
    data: str | None = None  # fingerprint of the training data: a resumed run must see the same

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def step_metrics(self) -> dict:
        """What every run's metrics.json says of its training steps (classification and LM alike)."""
        return {"train_seconds": self.t_train, "seconds_per_step": self.t_train / max(self.step, 1),
                "steady_seconds_per_step": self.steady_seconds_per_step, "graph_steps": self.graph_steps,
                "graph_fallback": self.graph_fallback}
