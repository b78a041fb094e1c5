"""Tests of lab/stats/metrics.py: point estimates against scikit-learn, the bootstrap against brute force.

Run with ``python -m pytest tests/test_stats_metrics.py -q``.
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from lab.stats.metrics import paired_metric_ci

SKLEARN = {
    "accuracy": accuracy_score,
    "balanced_accuracy": balanced_accuracy_score,
    "macro_f1": lambda y, p: f1_score(y, p, average="macro"),
}


def predictions(rng: np.random.Generator, n: int, k: int, skill_a: float, skill_b: float) -> tuple[np.ndarray, ...]:
    labels = rng.integers(0, k, size=n)
    pred_a = np.where(rng.random(n) < skill_a, labels, rng.integers(0, k, size=n))
    pred_b = np.where(rng.random(n) < skill_b, labels, rng.integers(0, k, size=n))
    return labels, pred_a, pred_b


@pytest.mark.parametrize("metric", list(SKLEARN))
def test_point_estimates_match_sklearn(metric: str) -> None:
    rng = np.random.default_rng(0)
    labels, pred_a, pred_b = predictions(rng, 700, 12, 0.6, 0.7)
    labels[labels == 11] = 10  # class 11 appears only among predictions, class 10 is frequent
    result = paired_metric_ci(labels, pred_a, pred_b, metric, n_classes=12, n_resamples=50)
    reference = SKLEARN[metric]
    assert_allclose(result.value_a, reference(labels, pred_a), rtol=1e-12)
    assert_allclose(result.value_b, reference(labels, pred_b), rtol=1e-12)
    assert_allclose(result.estimate, reference(labels, pred_b) - reference(labels, pred_a), rtol=1e-12)


def test_top5_takes_hit_arrays() -> None:
    rng = np.random.default_rng(1)
    hit_a, hit_b = rng.random(500) < 0.9, rng.random(500) < 0.95
    result = paired_metric_ci(None, hit_a, hit_b, "top5_accuracy", n_resamples=2000)
    assert_allclose((result.value_a, result.value_b), (hit_a.mean(), hit_b.mean()))
    assert result.low < result.estimate < result.high


@pytest.mark.parametrize("metric", ["balanced_accuracy", "macro_f1"])
def test_bootstrap_matches_brute_force_resampling_with_sklearn(metric: str) -> None:
    rng = np.random.default_rng(2)
    labels, pred_a, pred_b = predictions(rng, 150, 6, 0.55, 0.7)
    result = paired_metric_ci(labels, pred_a, pred_b, metric, n_classes=6, n_resamples=4000, seed=3)
    brute = np.empty(1000)
    other = np.random.default_rng(4)
    reference = SKLEARN[metric]
    for r in range(brute.size):
        i = other.integers(0, 150, size=150)
        brute[r] = reference(labels[i], pred_b[i]) - reference(labels[i], pred_a[i])
    low, high = np.quantile(brute, [0.025, 0.975])
    # Monte Carlo error of a 2.5% quantile from 1,000 draws is about 0.09 standard deviations.
    assert_allclose((result.low, result.high), (low, high), atol=0.25 * brute.std())


def test_group_bootstrap_shows_the_design_effect() -> None:
    rng = np.random.default_rng(5)
    labels, pred_a, pred_b = predictions(rng, 3000, 10, 0.7, 0.75)
    independent = paired_metric_ci(
        labels, pred_a, pred_b, "macro_f1", n_resamples=3000, groups=rng.integers(0, 300, size=3000)
    )
    assert 0.8 <= independent.design_effect <= 1.25, independent.design_effect
    assert independent.n_groups == 300
    # 300 distinct images, each seen 10 times (near-duplicate frames): variance about 10 times larger.
    dup = [np.repeat(x[:300], 10) for x in (labels, pred_a, pred_b)]
    clustered = paired_metric_ci(*dup, "macro_f1", n_resamples=3000, groups=np.repeat(np.arange(300), 10))
    naive = paired_metric_ci(*dup, "macro_f1", n_resamples=3000)
    assert 7.0 <= clustered.design_effect <= 13.0, clustered.design_effect
    assert clustered.high - clustered.low > 2.5 * (naive.high - naive.low)
    assert np.isnan(naive.design_effect) and naive.n_groups == 3000
    assert clustered.estimate == naive.estimate


def test_many_classes_stay_cheap() -> None:
    rng = np.random.default_rng(6)
    labels, pred_a, pred_b = predictions(rng, 20000, 1000, 0.75, 0.76)
    result = paired_metric_ci(labels, pred_a, pred_b, "macro_f1", n_classes=1000, n_resamples=200)
    assert result.low <= result.estimate <= result.high


def test_seeded() -> None:
    rng = np.random.default_rng(7)
    labels, pred_a, pred_b = predictions(rng, 400, 5, 0.6, 0.65)
    first, again, other = (
        paired_metric_ci(labels, pred_a, pred_b, "balanced_accuracy", n_resamples=500, seed=seed) for seed in (1, 1, 2)
    )
    assert (first.low, first.high) == (again.low, again.high)
    assert (first.low, first.high) != (other.low, other.high)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metric": "auroc"}, "metric must be one of"),
        ({"labels": np.array([0, 1, 5])}, r"labels must lie in 0\.\.2 \(n_classes=3\); got 5"),
        ({"labels": np.array([0, -1, 2])}, "labels must lie in 0..2 .*; got -1"),
        ({"pred_a": np.array([0.0, 1.0, 2.0])}, "pred_a must be a non-empty 1-D integer array; got dtype float64"),
        ({"pred_b": np.array([0, 1])}, r"pred_b must have one entry per image \(3\); got 2"),
        ({"metric": "top5_accuracy"}, "pred_a must be a non-empty 1-D boolean"),
        ({"groups": np.zeros(3)}, "at least 2 groups; got 1"),
        ({"confidence": 95}, "confidence must lie strictly between 0 and 1; got 95"),
    ],
)
def test_bad_input_names_what_was_received(kwargs: dict, message: str) -> None:
    args = {"labels": np.array([0, 1, 2]), "pred_a": np.array([0, 1, 1]), "pred_b": np.array([0, 2, 2])}
    args.update(kwargs)
    call = {"n_classes": 3, "n_resamples": 10} | args
    with pytest.raises(ValueError, match=message):
        paired_metric_ci(**call)
