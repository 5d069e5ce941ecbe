"""The table of training methods, and what every method is: the registry sits below its plugins.

Each method module (gates.py, full.py, lora.py, ...) defines a `Method` subclass and calls
`register` on import; `training.methods` imports them all, so `get_method("lora")` finds it.
Nothing here imports a method (peft's `register_peft_method` pattern).
"""

from __future__ import annotations

import types
import typing
from dataclasses import asdict, dataclass, fields, is_dataclass

import torch
import torch.nn as nn

from ...core.model import gate_state_dict

if typing.TYPE_CHECKING:
    from ..config import TrainConfig


class Method:
    """Base class: subclasses set up trainable parameters and may add a loss term."""

    name = "base"

    def prepare(self, model: nn.Module, cfg: "TrainConfig", total_steps: int) -> list[dict]:
        """Modify `model` in place; return optimizer parameter groups."""
        raise NotImplementedError

    def before_step(self, model: nn.Module, step: int) -> None:
        """The host's part of a step, before its forward pass (schedules that set this step's values)."""

    def extra_loss(self, model: nn.Module, step: int, batch: dict, outputs) -> tuple[torch.Tensor | None, dict]:
        """An extra loss term and scalars to log for this step (`outputs` of the model on `batch`).

        Device work only, when `graph_key` is not None: a step replayed as a CUDA graph runs its
        kernels again but not its Python, so a value that changes between steps must live in a
        device tensor that `before_step` refills; logged values likewise (tensors, not floats)."""
        return None, {}

    def graph_key(self, step: int):
        """What this step's forward and backward depend on besides tensors' values (a new key
        captures the step again), or None when the step cannot be replayed as a CUDA graph."""
        return None

    def after_step(self, model: nn.Module, step: int) -> None:
        """Hook after the optimizer step (masks, schedules)."""

    def discard_step(self, model: nn.Module) -> None:
        """A skipped (non-finite) batch: forget what its backward pass gathered."""

    def summary(self, model: nn.Module) -> dict:
        """Method-specific entries for metrics.json."""
        return {}

    def progress(self) -> dict:
        """Short values for the progress bar."""
        return {}

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def config(self) -> dict | None:
        """config.json's `method_config`: what rebuilding the trained model needs (the recipe for gates)."""
        recipe = getattr(self, "recipe", None)
        return asdict(recipe) if is_dataclass(recipe) else recipe

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors trainable.safetensors holds: every trainable tensor (gates, head, biases)."""
        return gate_state_dict(model)

    def finish(self, model: nn.Module) -> None:
        """After the last step and evaluation: release helpers, merge adapters into the weights."""


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Add a method class to the table under its `name` (a class decorator)."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]()


# ---- options ----------------------------------------------------------------------------------
def _convert(key: str, raw, kind):
    if not isinstance(raw, str):
        return raw
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if raw.lower() in ("none", "") and type(None) in args:
            return None
        return _convert(key, raw, non_none[0])
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if origin is tuple:
            return tuple(v.strip() for v in raw.split(",") if v.strip())
        return kind(raw)
    except ValueError:
        raise ValueError(f"--opt {key}={raw}: expected a {getattr(kind, '__name__', kind)}") from None


def parse_options(cls, options: dict, method: str):
    """Build the options dataclass `cls` from `--opt key=value` strings; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"method {method} has no option {unknown[0]!r}: it takes "
            + (", ".join(sorted(known)) if known else "no --opt options")
        )
    return cls(**{k: _convert(k, v, hints[k]) for k, v in options.items()})


def options_help(cls) -> str:
    """`key=default (help)` for every option: the text `finegates train --help` shows."""
    return "; ".join(f"{f.name}={_fmt(f.default)}" for f in fields(cls))


def _fmt(v) -> str:
    return ",".join(v) if isinstance(v, tuple) else str(v)


@dataclass
class NoOptions:
    """This method takes no --opt options."""


