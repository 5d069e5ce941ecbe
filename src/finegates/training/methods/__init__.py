"""Training methods: FineGates (`gates`) and the seed papers' baselines (METHOD.md section 4).

Each module registers its method in `registry.METHODS` on import; importing this package imports
them all, so `get_method(name)` knows every `finegates train --method` choice.
"""

# Registration order is the order `--method` choices are listed in.
from . import gates, full, bitfit, lora, pst, gmp, magnitude  # noqa: F401, I001
from ..schedules import cubic_sparsity
from .baseline import Baseline
from .bitfit import BitFitMethod
from .full import FullMethod
from .gmp import GMPMethod
from .lora import LoraMethod
from .magnitude import MagnitudeMethod, prune_structured
from .pst import PSTLinear, PSTMethod
from .registry import METHODS, Method, get_method, options_help, parse_options, register

BASELINES = (FullMethod, BitFitMethod, LoraMethod, PSTMethod, GMPMethod, MagnitudeMethod)

__all__ = [
    "BASELINES", "METHODS", "Baseline", "BitFitMethod", "FullMethod", "GMPMethod", "LoraMethod", "MagnitudeMethod",
    "Method", "PSTLinear", "PSTMethod", "cubic_sparsity", "get_method", "options_help",
    "parse_options", "prune_structured", "register",
]
