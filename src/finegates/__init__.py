"""finegates: finetune a frozen transformer by learning which rows and columns to switch off,
then cut them out.

    import finegates
    model = finegates.apply_gates(hf_model, finegates.GateConfig())
"""

from .arch import ARCHS, ArchSpec, UnsupportedModelError, spec_for
from .gates import Gate, GatedLinear, GateParam
from .model import (
    GateConfig,
    apply_gates,
    count_gate_params,
    count_trainable,
    gate_state_dict,
    gated_layers,
    gated_off_fraction,
    load_gate_state_dict,
    merge_gates,
)
from .regularizer import RegConfig, Regularizer
from .compress import load  # noqa: E402  (finegates.compress stays the module: compress.compress, .save_compressed)

__version__ = "0.1.0"

__all__ = [
    "ARCHS", "ArchSpec", "Gate", "GateConfig", "GateParam", "GatedLinear", "RegConfig", "Regularizer",
    "UnsupportedModelError", "apply_gates", "count_gate_params", "count_trainable", "gate_state_dict",
    "gated_layers", "gated_off_fraction", "load", "load_gate_state_dict", "merge_gates", "spec_for",
]
