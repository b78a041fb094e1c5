"""Tests of lab/stats/intervals.py against independent references: scipy's bootstrap (index resampling),
statsmodels' Wilson interval, and simulated coverage.

Run with ``python -m pytest tests/test_stats_intervals.py -q``.
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy import stats as sps
from statsmodels.stats.proportion import proportion_confint
from test_stats_mcnemar import correlated

from lab import stats

# --------------------------------------------------------------------------- paired bootstrap


def test_paired_bootstrap_matches_scipy_index_resampling() -> None:
    rng = np.random.default_rng(7)
    a, b = correlated(300, 0.08, 0.12, rng)
    ours = stats.paired_bootstrap_ci(a, b, n_resamples=20_000, seed=1)
    reference = sps.bootstrap(
        (a.astype(float), b.astype(float)),
        lambda x, y, axis: y.mean(axis=axis) - x.mean(axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=20_000,
        method="percentile",
        rng=np.random.default_rng(2),
    ).confidence_interval
    assert ours.estimate == pytest.approx(b.mean() - a.mean(), abs=1e-15)
    # Monte Carlo error of each end is about 0.001 here; the lattice step is 1/300.
    assert_allclose([ours.low, ours.high], [reference.low, reference.high], atol=0.007)


def test_paired_bootstrap_draws_have_the_index_resampling_moments() -> None:
    # Resampling n pairs with replacement: the difference has mean d and variance (p01 + p10 - d^2) / n.
    a, b = correlated(400, 0.1, 0.15, np.random.default_rng(12))
    boot = stats.paired_bootstrap(a, b, n_resamples=200_000, seed=3)
    only_a, only_b, n = np.sum(a & ~b), np.sum(~a & b), a.size
    d = (only_b - only_a) / n
    assert (boot.only_a, boot.only_b, boot.n, boot.estimate) == (only_a, only_b, n, d)
    assert boot.draws.mean() == pytest.approx(d, abs=4 * np.sqrt((only_a + only_b) / n**2 / 200_000))
    assert boot.draws.var() == pytest.approx(((only_a + only_b) / n - d**2) / n, rel=0.02)


def test_paired_bootstrap_is_seeded_and_reports_its_settings() -> None:
    a, b = correlated(1000, 0.05, 0.07, np.random.default_rng(3))
    first = stats.paired_bootstrap_ci(a, b, n_resamples=500, confidence=0.9, seed=4)
    assert first == stats.paired_bootstrap_ci(a, b, n_resamples=500, confidence=0.9, seed=4)
    assert first != stats.paired_bootstrap_ci(a, b, n_resamples=500, confidence=0.9, seed=5)
    assert (first.confidence, first.method, first.n_resamples) == (0.9, "percentile", 500)
    assert first.low < first.estimate < first.high


def test_one_bootstrap_gives_every_level() -> None:
    # The interval at any level from one set of draws equals a fresh bootstrap with the same seed at that level.
    a, b = correlated(700, 0.06, 0.09, np.random.default_rng(6))
    boot = stats.paired_bootstrap(a, b, n_resamples=3000, seed=8)
    for confidence in (0.8, 0.9, 0.95, 0.99):
        assert boot.interval(confidence) == stats.paired_bootstrap_ci(a, b, 3000, confidence, seed=8)
    narrow, wide = boot.interval(0.8), boot.interval(0.99)
    assert wide.low < narrow.low < narrow.high < wide.high
    expected = np.quantile(boot.draws, [0.05, 0.95])
    assert (boot.interval(0.9).low, boot.interval(0.9).high) == tuple(expected)


def test_paired_bootstrap_coverage() -> None:
    # 1000 experiments of n = 2000 with true difference p01 - p10 = 0.01.
    rng = np.random.default_rng(11)
    simulations, covered = 1000, 0
    for i in range(simulations):
        a, b = correlated(2000, 0.05, 0.06, rng)
        ci = stats.paired_bootstrap_ci(a, b, n_resamples=2000, seed=i)
        covered += ci.low <= 0.01 <= ci.high
    assert 0.93 <= covered / simulations <= 0.97


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"confidence": 1.0}, "confidence must lie strictly between 0 and 1; got 1.0"),
        ({"n_resamples": 0}, "n_resamples must be at least 1; got 0"),
        ({"n_resamples": 10.5}, "n_resamples must be an integer; got 10.5"),
    ],
)
def test_paired_bootstrap_rejects_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        stats.paired_bootstrap_ci(np.ones(5, bool), np.zeros(5, bool), **kwargs)
    with pytest.raises(ValueError, match=r"confidence must lie strictly between 0 and 1; got 0\.0"):
        stats.paired_bootstrap(np.ones(5, bool), np.zeros(5, bool)).interval(0.0)


# --------------------------------------------------------------------------- paired means, Wilson


def test_paired_mean_diff_matches_scipy_and_chunks() -> None:
    # n = 1000 and 10,000 resamples: drawn in chunks of 4194 rows.
    rng = np.random.default_rng(5)
    x_a = rng.gamma(4.0, 2.0, size=1000)
    x_b = x_a * 0.9 + rng.normal(0.0, 1.0, size=1000)
    ours = stats.paired_mean_diff_ci(x_a, x_b, seed=3)
    reference = sps.bootstrap(
        (x_a, x_b),
        lambda x, y, axis: (y - x).mean(axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=10_000,
        method="percentile",
        rng=np.random.default_rng(4),
        batch=1000,
    ).confidence_interval
    assert_allclose(ours.estimate, np.mean(x_b - x_a), rtol=1e-12)
    assert_allclose([ours.low, ours.high], [reference.low, reference.high], atol=0.02)  # SE ~ 0.005
    assert (ours.method, ours.n_resamples, ours.confidence) == ("percentile", 10_000, 0.95)


@pytest.mark.parametrize(
    ("x_a", "x_b", "match"),
    [
        (np.array([1.0, np.nan]), np.array([1.0, 2.0]), "x_a must be finite; got 1 nan/inf"),
        (np.array(["1", "2"]), np.array([1.0, 2.0]), "x_a must hold real numbers; got dtype <U1"),
        (np.ones((2, 2)), np.ones((2, 2)), r"x_a must be a non-empty 1-D array; got shape \(2, 2\)"),
        (np.ones(3), np.ones(2), "equal length; got 3 and 2"),
    ],
)
def test_paired_mean_diff_rejects_bad_inputs(x_a: np.ndarray, x_b: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        stats.paired_mean_diff_ci(x_a, x_b)


@pytest.mark.parametrize(
    ("successes", "n", "confidence"), [(0, 10, 0.95), (10, 10, 0.95), (7, 19, 0.9), (812, 1000, 0.99)]
)
def test_wilson_matches_statsmodels(successes: int, n: int, confidence: float) -> None:
    result = stats.wilson_ci(successes, n, confidence)
    low, high = proportion_confint(successes, n, alpha=1 - confidence, method="wilson")
    assert_allclose([result.low, result.high], [low, high], rtol=1e-10, atol=1e-14)
    assert (result.estimate, result.successes, result.n) == (successes / n, successes, n)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((11, 10), "successes must not exceed n; got successes=11, n=10"),
        ((0, 0), "n must be at least 1; got 0"),
        ((-1, 5), "successes must be at least 0; got -1"),
        ((2.5, 5), "successes must be an integer; got 2.5"),
        ((2, 5, 0.0), "confidence must lie strictly between 0 and 1; got 0.0"),
    ],
)
def test_wilson_rejects_bad_inputs(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        stats.wilson_ci(*args)


# --------------------------------------------------------------------------- latency quantiles


def test_quantile_ci_matches_a_resampling_loop_with_the_same_draws() -> None:
    # The same generator draws the same index rows; a plain loop over resamples gives the same distribution.
    rng = np.random.default_rng(2)
    x_a = rng.gamma(3.0, 2.0, size=40)
    x_b = x_a + rng.normal(1.0, 0.5, size=40)
    paired = stats.quantile_ci(x_a, x_b, (0.5, 0.99), n_resamples=2000, confidence=0.9, seed=7)
    draws = np.random.default_rng(7).integers(0, 40, size=(2000, 40))
    for result in paired:
        q = result.quantile
        qa = np.array([np.quantile(x_a[i], q) for i in draws])
        qb = np.array([np.quantile(x_b[i], q) for i in draws])
        assert result.estimate == np.quantile(x_a, q) and result.estimate_b == np.quantile(x_b, q)
        assert result.diff == pytest.approx(np.quantile(x_b, q) - np.quantile(x_a, q), rel=1e-12)
        assert_allclose([result.low, result.high], np.quantile(qa, [0.05, 0.95]), rtol=1e-12)
        assert_allclose([result.diff_low, result.diff_high], np.quantile(qb - qa, [0.05, 0.95]), rtol=1e-12)
        assert (result.confidence, result.n, result.n_resamples) == (0.9, 40, 2000)
    single = stats.quantile_ci(x_a, None, (0.5,), n_resamples=2000, confidence=0.9, seed=7)[0]
    assert (single.low, single.high) == (paired[0].low, paired[0].high) and single.diff is None


def test_quantile_ci_agrees_with_scipy_bootstrap_and_chunks() -> None:
    rng = np.random.default_rng(8)
    x = rng.lognormal(2.0, 0.3, size=3000)  # 3000 batches: several chunks of resamples
    ours = stats.quantile_ci(x, None, (0.5,), n_resamples=3000, seed=1)[0]
    reference = sps.bootstrap((x,), lambda s, axis: np.quantile(s, 0.5, axis=axis), n_resamples=3000,
                              method="percentile", rng=np.random.default_rng(2)).confidence_interval  # fmt: skip
    assert_allclose([ours.low, ours.high], [reference.low, reference.high], rtol=0.01)


def test_quantile_ci_pairing_cancels_what_batches_share() -> None:
    # Batches vary a lot, B is 1 ms slower on every one: the paired interval of the p50 difference is narrow.
    rng = np.random.default_rng(3)
    x_a = rng.uniform(5.0, 50.0, size=200)
    result = stats.quantile_ci(x_a, x_a + 1.0, (0.5,), n_resamples=1000)[0]
    assert result.diff_low == pytest.approx(1.0) and result.diff_high == pytest.approx(1.0)
    assert result.high - result.low > 3.0  # each arm alone is uncertain by several ms


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((np.ones(3), np.ones(2)), "equal length; got 3 and 2"),
        ((np.array([1.0, np.inf]),), "x_a must be finite"),
        ((np.ones(3), None, (1.0,)), "quantile must lie strictly between 0 and 1; got 1.0"),
    ],
)
def test_quantile_ci_rejects_bad_inputs(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        stats.quantile_ci(*args)
