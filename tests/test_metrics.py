"""Metrics against hand-computed values."""

import math

import pytest

from finegates.data.metrics import compute, main_score


def test_accuracy_and_f1():
    # tp=2, fp=1, fn=1, tn=1 -> acc 3/5, precision 2/3, recall 2/3, F1 2/3
    s = compute(("accuracy", "f1"), [1, 1, 0, 1, 0], [1, 1, 1, 0, 0])
    assert s["accuracy"] == pytest.approx(0.6)
    assert s["f1"] == pytest.approx(2 / 3)


def test_mcc():
    # tp=2, tn=1, fp=1, fn=1: (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    assert compute(("mcc",), [1, 1, 0, 1, 0], [1, 1, 1, 0, 0])["mcc"] == pytest.approx(1 / 6)


def test_pearson_and_spearman():
    y, p = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]
    s = compute(("pearson", "spearman"), y, p)
    assert s["pearson"] == pytest.approx(0.8)  # cov 1.0 / (var 1.25)
    assert s["spearman"] == pytest.approx(0.8)


def test_constant_predictions_have_zero_correlation_not_nan():
    s = compute(("pearson", "mcc"), [1.0, 0.0, 1.0], [1.0, 1.0, 1.0])
    assert s["pearson"] == 0.0 and not math.isnan(s["mcc"])


def test_main_score_is_the_mean_and_bad_shapes_fail():
    assert main_score({"accuracy": 0.8, "f1": 0.9}, ("accuracy", "f1")) == pytest.approx(0.85)
    with pytest.raises(ValueError):
        compute(("accuracy",), [1, 0], [1])
