"""The seed papers' baselines as `Method`s of the one training loop (METHOD.md section 4).

Importing this package registers them in `finegates.methods.METHODS`; `methods.get_method` does
so on first use, so `finegates train --method {full,bitfit,lora,pst,gmp,magnitude}` just works.
"""

from ..methods import METHODS
from .base import Baseline, cubic_sparsity, load_trained, options_help, parse_options
from .bitfit import BitFitMethod
from .full import FullMethod
from .gmp import GMPMethod
from .lora import LoraMethod
from .magnitude import MagnitudeMethod, prune_structured
from .pst import PSTLinear, PSTMethod

BASELINES = (FullMethod, BitFitMethod, LoraMethod, PSTMethod, GMPMethod, MagnitudeMethod)
for _cls in BASELINES:
    METHODS.setdefault(_cls.name, _cls)

__all__ = [
    "BASELINES", "Baseline", "BitFitMethod", "FullMethod", "GMPMethod", "LoraMethod", "MagnitudeMethod",
    "PSTLinear", "PSTMethod", "cubic_sparsity", "load_trained", "options_help", "parse_options", "prune_structured",
]
