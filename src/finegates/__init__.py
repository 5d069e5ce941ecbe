"""finegates: finetune a frozen transformer by learning which rows and columns to switch off,
then cut them out.

    import finegates
    model = finegates.apply_gates(hf_model, finegates.GateConfig())
    small = finegates.compression.compress(model)

Layout (each subpackage's docstring says more): core/ (torch only: architectures, gates, coupling),
data/, compression/ (needs only core), training/ (one loop, methods/), loaders.py (every folder ->
model), pipeline.py (run -> compressed -> report), bench/, export.py, prepare.py, cli/.
"""

from .core.arch import ARCHS, ArchSpec, UnsupportedModelError, spec_for
from .core.gates import Gate, GatedLinear, GateParam
from .core.model import (
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
from .training.regularizer import RegConfig, Regularizer
from . import compression
from .compression import load, save_compressed

compress = compression  # the README's older spelling: finegates.compress.compress(model), .save_compressed

__version__ = "0.1.0"

__all__ = [
    "ARCHS", "ArchSpec", "Gate", "GateConfig", "GateParam", "GatedLinear", "RegConfig", "Regularizer",
    "UnsupportedModelError", "apply_gates", "count_gate_params", "count_trainable", "gate_state_dict",
    "compression", "gated_layers", "gated_off_fraction", "load", "load_gate_state_dict", "merge_gates",
    "save_compressed", "spec_for",
]
