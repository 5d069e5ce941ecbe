"""Task metrics, computed with scikit-learn/scipy (no hub needed).

Values are fractions in [0, 1] (accuracy, F1) or correlation units in [-1, 1] (MCC, Pearson,
Spearman); reports multiply by 100 where the GLUE tables do.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


def _corr(fn: Callable, y_true: np.ndarray, y_pred: np.ndarray) -> float:
    if np.std(y_pred) == 0 or np.std(y_true) == 0:
        return 0.0  # a constant prediction has no correlation (scipy would warn and return nan)
    return float(fn(y_true, y_pred)[0])


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": lambda t, p: float(accuracy_score(t, p)),
    "f1": lambda t, p: float(f1_score(t, p)),
    "mcc": lambda t, p: float(matthews_corrcoef(t, p)),
    "pearson": lambda t, p: _corr(pearsonr, t, p),
    "spearman": lambda t, p: _corr(spearmanr, t, p),
}


def compute(names: tuple[str, ...], y_true, y_pred) -> dict[str, float]:
    """Every named metric of predictions against labels."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.shape != p.shape or t.size == 0:
        raise ValueError(f"metrics need equal-length non-empty arrays, got {t.shape} and {p.shape}")
    return {name: METRICS[name](t, p) for name in names}


def main_score(scores: dict[str, float], names: tuple[str, ...]) -> float:
    """One number per task for tables and model selection: the mean of its metrics (GLUE style)."""
    return float(np.mean([scores[n] for n in names]))
