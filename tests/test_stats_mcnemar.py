"""Tests of lab/stats/mcnemar.py against independent references: statsmodels, scipy, published examples,
the mid-p definition written out, and the exact size of each test by enumeration.

Run with ``python -m pytest tests/test_stats_mcnemar.py -q``.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy import stats as sps
from statsmodels.stats.contingency_tables import cochrans_q as sm_cochrans_q
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

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


def midp_reference(b: int, c: int) -> float:
    """Lancaster's mid-p, two-sided, written out in exact fractions: 2 * (P(X < k) + P(X = k) / 2), X ~ Bin(b + c, 1/2),
    k = min(b, c) (Fagerland, Lydersen & Laake 2013, eq. 3)."""
    d, k = b + c, min(b, c)
    below = sum(math.comb(d, x) for x in range(k))
    return float(min(Fraction(1), Fraction(2 * below + math.comb(d, k), 2**d)))


def exact_size(n: int, p10: float, p01: float, pvalue, alpha: float = 0.05) -> float:
    """P(p-value < alpha) by enumerating every (b, c) of Multinomial(n, [p10, p01, rest]) with visible mass."""
    size = 0.0
    for d in range(int(sps.binom.isf(1e-12, n, p10 + p01)) + 1):
        weight_d = sps.binom.pmf(d, n, p10 + p01)
        for c in range(d + 1):
            if pvalue(d - c, c) < alpha:
                size += weight_d * sps.binom.pmf(c, d, p01 / (p10 + p01))
    return size


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


@pytest.mark.parametrize("b", range(0, 26, 5))
def test_mcnemar_midp_matches_its_definition(b: int) -> None:
    for c in range(26):
        a_right, b_right = pairs(b, c, 7, 3)
        assert_allclose(stats.mcnemar(a_right, b_right, "midp").pvalue, midp_reference(b, c), rtol=1e-12)


@pytest.mark.parametrize("n", [50, 500])
def test_mcnemar_size_under_the_null(n: int) -> None:
    # 2000 experiments with equal accuracy (10% of images only A right, 10% only B right), against the exact
    # size of each test by enumeration, with p-values from scipy's binomial test and the mid-p definition.
    rng = np.random.default_rng(n)
    simulations, alpha = 2000, 0.05
    rejected = {"exact": 0, "midp": 0}
    for _ in range(simulations):
        a, b = correlated(n, 0.1, 0.1, rng)
        for method in rejected:
            rejected[method] += stats.mcnemar(a, b, method).pvalue < alpha
    size = {
        "exact": exact_size(n, 0.1, 0.1, lambda b, c: sps.binomtest(c, b + c, 0.5).pvalue if b + c else 1.0),
        "midp": exact_size(n, 0.1, 0.1, midp_reference),
    }
    assert size["exact"] <= alpha < size["midp"] + 0.01  # exact is conservative; mid-p keeps close to nominal
    for method, count in rejected.items():
        se = math.sqrt(size[method] * (1 - size[method]) / simulations)
        assert abs(count / simulations - size[method]) <= 3.5 * se, (method, count / simulations, size[method])


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


def test_mcnemar_counts_is_vectorised_mcnemar() -> None:
    b, c = np.array([0, 3, 10, 40]), np.array([0, 9, 10, 20])
    for method in stats.MCNEMAR_METHODS:
        statistic, pvalue = stats.mcnemar_counts(b, c, method)
        expected = [stats.mcnemar(*pairs(int(x), int(y), 5, 5), method) for x, y in zip(b, c, strict=True)]
        assert_allclose(pvalue, [e.pvalue for e in expected], rtol=1e-12)
        assert_allclose(statistic, [e.statistic for e in expected], rtol=1e-12)
    with pytest.raises(ValueError, match="method must be one of"):
        stats.mcnemar_counts(b, c, "fisher")


def test_adjust_pvalues_matches_statsmodels_in_input_order() -> None:
    from statsmodels.stats.multitest import multipletests

    raw = [0.04, 0.001, 0.03, 0.5, 0.012]
    for adjust in ("holm", "bonferroni"):
        assert_allclose(stats.adjust_pvalues(raw, adjust), multipletests(raw, method=adjust)[1], rtol=1e-15)
    assert_allclose(stats.adjust_pvalues(raw, "none"), raw)
    rng = np.random.default_rng(0)
    for m in (1, 2, 6, 40):
        draws = np.round(rng.random(m) ** 3, 2)  # rounded: ties, zeros and large values too
        for adjust in ("holm", "bonferroni"):
            assert_allclose(stats.adjust_pvalues(draws, adjust), multipletests(draws, method=adjust)[1], rtol=1e-15)
    # Holm by hand: sorted 0.001, 0.012, 0.03, 0.04, 0.5 times 5, 4, 3, 2, 1, made monotone.
    assert_allclose(stats.adjust_pvalues(raw), [0.09, 0.005, 0.09, 0.5, 0.048], rtol=1e-12)
    with pytest.raises(ValueError, match=r"pvalues must be a 1-D array of values in \[0, 1\]"):
        stats.adjust_pvalues([0.2, 1.5])
