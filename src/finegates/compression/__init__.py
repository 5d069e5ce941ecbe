"""Exact compression: the algorithm (exact: bake the gates, delete what they closed) and the saved
format (saved: weights + recorded shapes, strict reload). Needs only `core` and `data.files`.

    small = finegates.compression.compress(gated_model)
    finegates.compression.save_compressed(small, tokenizer, "out/")   # reload: finegates.load("out/")
"""

from .exact import compress, count_params, layer_params, linear_params, predicted_kept
from .saved import REPORT, WEIGHTS, CompressedModelError, load, save_compressed

__all__ = ["REPORT", "WEIGHTS", "CompressedModelError", "compress", "count_params", "layer_params", "linear_params",
           "load", "predicted_kept", "save_compressed"]
