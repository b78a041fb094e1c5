"""Tests of lab/stats.py against independent references: statsmodels, scipy, torchmetrics,
published examples, and seeded simulations of size, power and coverage.

Run with ``python -m pytest tests/test_stats.py -q``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy import stats as sps
from statsmodels.stats.contingency_tables import cochrans_q as sm_cochrans_q
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.proportion import proportion_confint

from lab import stats


def pairs(only_a: int, only_b: int, both: int, neither: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Correctness arrays with the given counts of the four kinds of pair, in shuffled order."""
    a = np.repeat([True, False, True, False], [only_a, only_b, both, neither])
    b = np.repeat([False, True, True, False], [only_a, only_b, both, neither])
    order = np.random.default_rng(seed).permutation(a.size)
    return a[order], b[order]


def correlated(n: int, p10: float, p01: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random paired outcomes: P(only A right) = p10, P(only B right) = p01, concordant pairs 80% right."""
    u = rng.random(n)
    only_a = u < p10
    only_b = (u >= p10) & (u < p10 + p01)
    both = (u >= p10 + p01) & (rng.random(n) < 0.8)
    return only_a | both, only_b | both


# --------------------------------------------------------------------------- McNemar


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("exact", {"exact": True}),
        ("chi2", {"exact": False, "correction": False}),
        ("chi2_corrected", {"exact": False, "correction": True}),
    ],
)
def test_mcnemar_matches_statsmodels(method: str, kwargs: dict) -> None:
    rng = np.random.default_rng(1)
    for only_a, only_b in [(3, 9), (10, 4), (40, 61), (150, 86), (0, 5), (1000, 1100)]:
        a, b = pairs(only_a, only_b, int(rng.integers(0, 500)), int(rng.integers(0, 500)))
        ours = stats.mcnemar(a, b, method=method)
        reference = sm_mcnemar([[0, only_a], [only_b, 0]], **kwargs)
        assert (ours.b, ours.c, ours.n) == (only_a, only_b, a.size)
        assert_allclose(ours.statistic, reference.statistic, rtol=1e-12)
        assert_allclose(ours.pvalue, reference.pvalue, rtol=1e-10)


@pytest.mark.parametrize(("only_a", "only_b"), [(0, 1), (2, 9), (13, 13), (30, 45), (400, 355)])
def test_mcnemar_exact_matches_scipy_binomtest(only_a: int, only_b: int) -> None:
    a, b = pairs(only_a, only_b, 50, 20)
    expected = sps.binomtest(only_b, only_a + only_b, 0.5).pvalue
    assert_allclose(stats.mcnemar(a, b, "exact").pvalue, expected, rtol=1e-9)


def test_mcnemar_agresti_presidential_approval() -> None:
    # Agresti (2002), Categorical Data Analysis, 2nd ed., Table 10.1: approve/approve 794,
    # approve/disapprove 150, disapprove/approve 86, disapprove/disapprove 570; z^2 = 17.36.
    first, second = pairs(150, 86, 794, 570)
    result = stats.mcnemar(first, second, "chi2")
    assert (result.b, result.c, result.n) == (150, 86, 1600)
    assert round(result.statistic, 2) == 17.36
    assert result.pvalue < 0.001


def test_mcnemar_fagerland_ahr_example() -> None:
    # Fagerland et al. (2013), BMC Med. Res. Methodol. 13:91, Table 1 (b = 1, c = 7, n = 21):
    # exact conditional p = 0.070 and asymptotic p = 0.034 as published; mid-p by hand is
    # 2 * (P(X <= 1) - P(X = 1) / 2) for X ~ Bin(8, 1/2) = 2 * (9 - 4) / 256.
    a, b = pairs(1, 7, 1, 12)
    assert round(stats.mcnemar(a, b, "exact").pvalue, 3) == 0.070
    assert round(stats.mcnemar(a, b, "chi2").pvalue, 3) == 0.034
    assert_allclose(stats.mcnemar(a, b, "midp").pvalue, 10 / 256, rtol=1e-12)


@pytest.mark.parametrize("method", stats.MCNEMAR_METHODS)
def test_mcnemar_without_discordant_pairs_has_pvalue_one(method: str) -> None:
    a, b = pairs(0, 0, 30, 10)
    result = stats.mcnemar(a, b, method)
    assert (result.pvalue, result.statistic, result.b, result.c) == (1.0, 0.0, 0, 0)


def test_mcnemar_corrected_statistic_is_zero_for_equal_counts() -> None:
    a, b = pairs(12, 12, 30, 10)
    result = stats.mcnemar(a, b, "chi2_corrected")
    assert (result.statistic, result.pvalue) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (np.array([1, 0, 1]), np.ones(3, bool), "correct_a must be a boolean array; got dtype int"),
        (np.array([True, False]), np.array([0.0, 1.0]), "correct_b must be a boolean array; got dtype float"),
        (np.ones((2, 3), bool), np.ones((2, 3), bool), r"correct_a must be 1-D; got shape \(2, 3\)"),
        (np.ones(3, bool), np.ones(4, bool), "equal length; got 3 and 4"),
        (np.ones(0, bool), np.ones(0, bool), r"correct_a must not be empty; got shape \(0,\)"),
    ],
)
def test_mcnemar_rejects_bad_inputs(a: np.ndarray, b: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        stats.mcnemar(a, b)


def test_mcnemar_rejects_unknown_method() -> None:
    with pytest.raises(ValueError, match=r"method must be one of 'exact', 'midp'.*got 'fisher'"):
        stats.mcnemar(np.ones(3, bool), np.ones(3, bool), method="fisher")


def test_results_are_frozen() -> None:
    result = stats.mcnemar(np.ones(3, bool), np.ones(3, bool))
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.pvalue = 0.0  # type: ignore[misc]


@pytest.mark.parametrize("n", [50, 500, 5000])
def test_mcnemar_size_under_the_null(n: int) -> None:
    # 2000 experiments with equal accuracy (10% of images only A right, 10% only B right).
    rng = np.random.default_rng(n)
    simulations, alpha = 2000, 0.05
    rejected = {"exact": 0, "midp": 0}
    for _ in range(simulations):
        a, b = correlated(n, 0.1, 0.1, rng)
        for method in rejected:
            rejected[method] += stats.mcnemar(a, b, method).pvalue < alpha
    se = math.sqrt(alpha * (1 - alpha) / simulations)
    assert rejected["exact"] / simulations <= alpha + 3 * se
    assert abs(rejected["midp"] / simulations - alpha) <= 0.02  # mid-p keeps close to nominal
    assert rejected["midp"] >= rejected["exact"]  # and is less conservative than exact


# --------------------------------------------------------------------------- bootstrap intervals


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_paired_bootstrap_matches_scipy_index_resampling(method: str) -> None:
    rng = np.random.default_rng(7)
    a, b = correlated(300, 0.08, 0.12, rng)
    ours = stats.paired_bootstrap_ci(a, b, n_resamples=20_000, method=method, seed=1)
    reference = sps.bootstrap(
        (a.astype(float), b.astype(float)),
        lambda x, y, axis: y.mean(axis=axis) - x.mean(axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=20_000,
        method=method,
        rng=np.random.default_rng(2),
    ).confidence_interval
    assert ours.estimate == pytest.approx(b.mean() - a.mean(), abs=1e-15)
    # Monte Carlo error of each end is about 0.001 here; the lattice step is 1/300.
    assert_allclose([ours.low, ours.high], [reference.low, reference.high], atol=0.007)


def test_paired_bootstrap_is_seeded_and_reports_its_settings() -> None:
    a, b = correlated(1000, 0.05, 0.07, np.random.default_rng(3))
    first = stats.paired_bootstrap_ci(a, b, n_resamples=500, confidence=0.9, method="bca", seed=4)
    assert first == stats.paired_bootstrap_ci(a, b, n_resamples=500, confidence=0.9, method="bca", seed=4)
    assert (first.confidence, first.method, first.n_resamples) == (0.9, "bca", 500)
    assert first.low < first.estimate < first.high


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_paired_bootstrap_coverage(method: str) -> None:
    # 1000 experiments of n = 2000 with true difference p01 - p10 = 0.01.
    rng = np.random.default_rng(11)
    simulations, covered = 1000, 0
    for i in range(simulations):
        a, b = correlated(2000, 0.05, 0.06, rng)
        ci = stats.paired_bootstrap_ci(a, b, n_resamples=2000, method=method, seed=i)
        covered += ci.low <= 0.01 <= ci.high
    assert 0.93 <= covered / simulations <= 0.97


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "basic"}, "method must be one of 'percentile', 'bca'; got 'basic'"),
        ({"confidence": 1.0}, "confidence must lie strictly between 0 and 1; got 1.0"),
        ({"n_resamples": 0}, "n_resamples must be at least 1; got 0"),
        ({"n_resamples": 10.5}, "n_resamples must be an integer; got 10.5"),
    ],
)
def test_paired_bootstrap_rejects_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        stats.paired_bootstrap_ci(np.ones(5, bool), np.zeros(5, bool), **kwargs)


def test_paired_bootstrap_bca_needs_two_pairs() -> None:
    with pytest.raises(ValueError, match=r"at least 2 pairs.*got n=1"):
        stats.paired_bootstrap_ci(np.ones(1, bool), np.zeros(1, bool), method="bca")


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


# --------------------------------------------------------------------------- decide


def test_decide_superiority_verdicts() -> None:
    better = stats.decide(*pairs(100, 190, 7500, 2210))
    assert better.verdict == "b_better"
    assert better.pvalue == stats.mcnemar(*pairs(100, 190, 7500, 2210)).pvalue < 0.05
    assert better.low > 0 and better.confidence == 0.95
    assert better.explanation.startswith("B is better than A by 0.9 points (95% CI 0.6 to 1.2)")
    assert better.explanation.endswith("McNemar exact p < 0.001, 10,000 test images.")

    worse = stats.decide(*pairs(190, 100, 7500, 2210))
    assert worse.verdict == "a_better" and worse.high < 0
    assert worse.explanation.startswith("A is better than B by 0.9 points")

    tied = stats.decide(*pairs(100, 110, 7500, 2290))
    assert tied.verdict == "no_significant_difference" and tied.pvalue > 0.05
    assert tied.low < 0 < tied.high and "No significant difference" in tied.explanation


def test_decide_non_inferiority_on_each_side_of_the_margin() -> None:
    # B 0.1 points worse, 90% CI about -0.4 to 0.2: inside a 0.5-point margin, not a 0.1-point one.
    a, b = pairs(110, 100, 7500, 2290)
    shown = stats.decide(a, b, rule="non_inferiority", margin=0.005)
    assert shown.verdict == "b_non_inferior" and shown.low > -0.005
    assert shown.confidence == pytest.approx(0.9) and shown.pvalue is None
    assert shown.explanation.startswith("B is non-inferior to A at a margin of 0.5 points: B - A = -0.1")
    not_shown = stats.decide(a, b, rule="non_inferiority", margin=0.001)
    assert not_shown.verdict == "non_inferiority_not_shown" and not_shown.low <= -0.001
    # A one-point deficit is not non-inferior at half a point.
    assert stats.decide(*pairs(200, 100, 7500, 2200), "non_inferiority", 0.005).verdict == (
        "non_inferiority_not_shown"
    )


def test_decide_equivalence_on_each_side_of_the_margin() -> None:
    a, b = pairs(105, 105, 7500, 2290)
    inside = stats.decide(a, b, rule="equivalence", margin=0.005)
    assert inside.verdict == "equivalent" and inside.low > -0.005 and inside.high < 0.005
    assert inside.explanation.startswith("A and B are equivalent within ±0.5 points: B - A = 0.0")
    narrow = stats.decide(a, b, rule="equivalence", margin=0.001)
    assert narrow.verdict == "equivalence_not_shown"
    shifted = stats.decide(*pairs(100, 160, 7500, 2240), rule="equivalence", margin=0.005)
    assert shifted.verdict == "equivalence_not_shown" and shifted.high >= 0.005


def test_decide_interval_is_the_bootstrap_at_the_rule_level() -> None:
    a, b = pairs(100, 140, 7500, 2260)
    for rule, margin, confidence in [("superiority", 0.0, 0.9), ("equivalence", 0.01, 0.8)]:
        result = stats.decide(a, b, rule, margin, alpha=0.1, n_resamples=2000, seed=5)
        ci = stats.paired_bootstrap_ci(a, b, 2000, confidence, "percentile", 5)
        assert (result.low, result.high, result.estimate) == (ci.low, ci.high, ci.estimate)
        assert result.confidence == pytest.approx(confidence)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rule": "better"}, "rule must be one of 'superiority', 'non_inferiority', 'equivalence'; got 'bet"),
        ({"rule": "non_inferiority", "margin": -0.01}, r"margin must lie in \[0, 1\).*got -0.01"),
        ({"rule": "equivalence", "margin": 0.0}, r"margin must lie in \(0, 1\).*got 0.0"),
        ({"rule": "superiority", "margin": 0.01}, "margin must be 0 for rule='superiority'"),
        ({"alpha": 0.5}, "alpha must lie strictly between 0 and 0.5; got 0.5"),
        ({"alpha": 0.0}, "alpha must lie strictly between 0 and 0.5; got 0.0"),
    ],
)
def test_decide_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        stats.decide(*pairs(5, 5, 5, 5), **kwargs)


# --------------------------------------------------------------------------- several classifiers


@pytest.mark.parametrize("k", [2, 3, 5])
def test_cochrans_q_matches_statsmodels(k: int) -> None:
    rng = np.random.default_rng(k)
    correct = rng.random((400, k)) < np.linspace(0.6, 0.75, k)
    ours = stats.cochrans_q(correct)
    reference = sm_cochrans_q(correct.astype(int))
    assert_allclose([ours.statistic, ours.pvalue], [reference.statistic, reference.pvalue], rtol=1e-10)
    assert (ours.df, ours.n, ours.k) == (k - 1, 400, k)


def test_cochrans_q_with_two_classifiers_is_uncorrected_mcnemar() -> None:
    a, b = pairs(31, 52, 300, 117)
    q = stats.cochrans_q(np.column_stack([a, b]))
    chi2 = stats.mcnemar(a, b, "chi2")
    assert_allclose([q.statistic, q.pvalue], [chi2.statistic, chi2.pvalue], rtol=1e-12)


def test_cochrans_q_without_disagreement() -> None:
    correct = np.repeat(np.array([[True], [False], [True]]), 3, axis=1)
    assert (stats.cochrans_q(correct).statistic, stats.cochrans_q(correct).pvalue) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("correct", "match"),
    [
        (np.ones((5, 1), bool), r"at least 2 columns.*got shape \(5, 1\)"),
        (np.ones(5, bool), r"correct must be 2-D; got shape \(5,\)"),
        (np.ones((5, 3), int), "correct must be a boolean array; got dtype int"),
    ],
)
def test_cochrans_q_rejects_bad_inputs(correct: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        stats.cochrans_q(correct)


def _holm(pvalues: np.ndarray) -> np.ndarray:
    """Holm (1979) step-down adjustment written out, as an independent reference."""
    order = np.argsort(pvalues)
    m = pvalues.size
    adjusted = np.maximum.accumulate([min(1.0, (m - r) * pvalues[i]) for r, i in enumerate(order)])
    result = np.empty(m)
    result[order] = adjusted
    return result


def test_pairwise_mcnemar_matches_statsmodels_and_holm() -> None:
    rng = np.random.default_rng(8)
    correct = rng.random((600, 4)) < np.array([0.7, 0.72, 0.78, 0.7])
    names = ["resnet", "vit", "convnext", "effnet"]
    result = stats.pairwise_mcnemar(correct, names)
    assert [(p.name_i, p.name_j) for p in result.pairs] == [
        ("resnet", "vit"),
        ("resnet", "convnext"),
        ("resnet", "effnet"),
        ("vit", "convnext"),
        ("vit", "effnet"),
        ("convnext", "effnet"),
    ]
    raw = []
    for pair in result.pairs:
        i, j = names.index(pair.name_i), names.index(pair.name_j)
        b = int(np.sum(correct[:, i] & ~correct[:, j]))
        c = int(np.sum(~correct[:, i] & correct[:, j]))
        assert (pair.b, pair.c) == (b, c)
        assert_allclose(pair.pvalue, sm_mcnemar([[0, b], [c, 0]], exact=True).pvalue, rtol=1e-10)
        raw.append(pair.pvalue)
    assert_allclose([p.pvalue_adjusted for p in result.pairs], _holm(np.array(raw)), rtol=1e-12)
    bonferroni = stats.pairwise_mcnemar(correct, names, method="chi2", adjust="bonferroni")
    assert_allclose(
        [p.pvalue_adjusted for p in bonferroni.pairs],
        [min(1.0, 6 * p.pvalue) for p in bonferroni.pairs],
        rtol=1e-12,
    )
    unadjusted = stats.pairwise_mcnemar(correct, names, adjust="none")
    assert all(p.pvalue_adjusted == p.pvalue for p in unadjusted.pairs)


@pytest.mark.parametrize(
    ("names", "adjust", "match"),
    [
        (["a", "b"], "holm", r"k distinct names; got shape \(10, 3\)"),
        (["a", "b", "a"], "holm", "k distinct names"),
        (["a", "b", "c"], "fdr", "adjust must be one of 'holm', 'bonferroni', 'none'; got 'fdr'"),
    ],
)
def test_pairwise_mcnemar_rejects_bad_arguments(names: list, adjust: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        stats.pairwise_mcnemar(np.ones((10, 3), bool), names, adjust=adjust)


def test_per_class_mcnemar_matches_mcnemar_on_each_class() -> None:
    rng = np.random.default_rng(9)
    labels = rng.choice(np.array(["cat", "dog", "fox"]), size=900)
    a, b = correlated(900, 0.06, 0.1, rng)
    result = stats.per_class_mcnemar(a, b, labels)
    assert [row.label for row in result.classes] == ["cat", "dog", "fox"]
    for row in result.classes:
        mask = labels == row.label
        reference = stats.mcnemar(a[mask], b[mask])
        assert (row.n, row.only_a, row.only_b) == (mask.sum(), reference.b, reference.c)
        assert row.pvalue == pytest.approx(reference.pvalue, rel=1e-12)
    raw = np.array([row.pvalue for row in result.classes])
    assert_allclose([row.pvalue_adjusted for row in result.classes], _holm(raw), rtol=1e-12)
    assert isinstance(stats.per_class_mcnemar(a, b, np.arange(900) % 4).classes[0].label, int)


def test_per_class_mcnemar_rejects_misaligned_labels() -> None:
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\) like correct_a; got shape \(3,\)"):
        stats.per_class_mcnemar(np.ones(4, bool), np.ones(4, bool), np.arange(3))


# --------------------------------------------------------------------------- power


@pytest.mark.parametrize(
    ("n", "p_discordant", "effect"), [(300, 0.1, 0.04), (2000, 0.05, -0.012), (800, 0.2, 0.0)]
)
def test_mcnemar_power_matches_simulation(n: int, p_discordant: float, effect: float) -> None:
    # 4000 simulated experiments; the exact test's p-value from the simulated discordant counts.
    rng = np.random.default_rng(n)
    p10, p01 = (p_discordant - effect) / 2, (p_discordant + effect) / 2
    counts = rng.multinomial(n, [p10, p01, 1 - p10 - p01], size=4000)
    b, c = counts[:, 0], counts[:, 1]
    pvalues = np.minimum(1.0, 2 * sps.binom.cdf(np.minimum(b, c), b + c, 0.5))
    simulated = np.mean(pvalues < 0.05)
    assert abs(stats.mcnemar_power(n, p_discordant, effect) - simulated) <= 0.03


def test_mcnemar_power_is_symmetric_and_below_alpha_at_zero() -> None:
    power = stats.mcnemar_power(500, 0.1, 0.03)
    assert power == pytest.approx(stats.mcnemar_power(500, 0.1, -0.03), rel=1e-9)
    assert 0.5 < power < 1.0
    assert 0.0 < stats.mcnemar_power(500, 0.1, 0.0) <= 0.05
    assert stats.mcnemar_power(5, 0.5, 0.5) == 0.0  # no rejection is possible with 5 pairs


def test_mcnemar_power_agrees_with_connor_normal_approximation_for_large_n() -> None:
    # Connor (1987): power = Phi((sqrt(n) |effect| - z sqrt(p_disc)) / sqrt(p_disc - effect^2)).
    n, p_discordant, effect = 200_000, 0.1, 0.002
    z = sps.norm.ppf(0.975)
    connor = sps.norm.cdf(
        (math.sqrt(n) * effect - z * math.sqrt(p_discordant)) / math.sqrt(p_discordant - effect**2)
    )
    assert abs(stats.mcnemar_power(n, p_discordant, effect) - connor) <= 0.01


def test_minimum_detectable_effect_round_trip() -> None:
    for n, p_discordant in [(500, 0.1), (10_000, 0.04), (50_000, 0.15)]:
        mde = stats.minimum_detectable_effect(n, p_discordant)
        assert 0 < mde <= p_discordant
        assert stats.mcnemar_power(n, p_discordant, mde) == pytest.approx(0.8, abs=1e-6)
    assert stats.minimum_detectable_effect(50_000, 0.1) < stats.minimum_detectable_effect(5000, 0.1)
    assert math.isnan(stats.minimum_detectable_effect(5, 0.1))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: stats.mcnemar_power(100, 0.1, 0.2), r"\|effect\| must not exceed p_discordant=0.1; got eff"),
        (lambda: stats.mcnemar_power(100, 0.0, 0.0), r"p_discordant must lie in \(0, 1\]; got 0.0"),
        (lambda: stats.mcnemar_power(0, 0.1, 0.0), "n must be at least 1; got 0"),
        (lambda: stats.minimum_detectable_effect(100, 0.1, power=0.04), "power must exceed alpha=0.05"),
        (lambda: stats.minimum_detectable_effect(100, 0.1, alpha=1.5), "alpha must lie strictly between 0 a"),
    ],
)
def test_power_rejects_bad_arguments(call: Callable[[], float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("n_bins", [10, 15])
def test_calibration_ece_matches_torchmetrics(n_bins: int) -> None:
    torch = pytest.importorskip("torch")
    from torchmetrics.classification import MulticlassCalibrationError

    rng = np.random.default_rng(n_bins)
    probs = rng.dirichlet(np.full(10, 0.3), size=5000).astype(np.float32)
    probs[:300] = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 300)]  # confidences of exactly 1.0
    target = np.where(rng.random(5000) < 0.7, probs.argmax(1), rng.integers(0, 10, 5000))
    metric = MulticlassCalibrationError(num_classes=10, n_bins=n_bins, norm="l1")
    reference = float(metric(torch.from_numpy(probs), torch.from_numpy(target)))
    result = stats.calibration(probs.max(1).astype(np.float64), probs.argmax(1) == target, n_bins)
    assert result.ece == pytest.approx(reference, abs=1e-5)


def test_calibration_bins() -> None:
    confidence = np.array([0.05, 0.15, 0.15, 0.5, 0.95, 1.0])
    correct = np.array([False, True, False, True, True, True])
    result = stats.calibration(confidence, correct, n_bins=4)
    assert result.bin_lower == (0.0, 0.25, 0.5, 0.75) and result.bin_upper == (0.25, 0.5, 0.75, 1.0)
    assert result.count == (3, 0, 1, 2)
    assert_allclose(result.mean_confidence, [0.35 / 3, np.nan, 0.5, 0.975])
    assert_allclose(result.accuracy, [1 / 3, np.nan, 1.0, 1.0])
    # Per bin |accuracy - confidence| weighted by count, with 1.0 in a group of its own (torchmetrics).
    expected = (abs(1 - 0.35) + abs(1 - 0.5) + abs(1 - 0.95) + abs(1 - 1.0)) / 6
    assert result.ece == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("confidence", "correct", "n_bins", "match"),
    [
        (np.array([0.2, 1.2]), np.array([True, False]), 15, r"confidence must lie in \[0, 1\]; got values"),
        (np.array([0.2, 0.4]), np.array([True]), 15, "equal length; got 2 and 1"),
        (np.array([0.2, 0.4]), np.array([1, 0]), 15, "correct must be a boolean array"),
        (np.array([0.2, 0.4]), np.array([True, False]), 0, "n_bins must be at least 1; got 0"),
    ],
)
def test_calibration_rejects_bad_inputs(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        stats.calibration(confidence, correct, n_bins)
