"""Pure statistics for comparing two (or more) classifiers on the same test set.

Inputs are numpy arrays (per-image correctness as booleans, per-batch latencies as floats); every
function returns a small frozen result object. Nothing here knows about MLflow or torch:
``lab/compare.py`` fetches and aligns predictions, then calls these functions.

Paired bootstraps of an accuracy difference use the fact that a resample depends only on three
category counts (only A right, only B right, the rest), so one multinomial draw per resample gives
exactly the distribution of resampling indices at a fraction of the cost
(``python benchmarks/bootstrap.py`` measures it).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize, stats
from scipy.special import ndtr, ndtri
from statsmodels.stats.multitest import multipletests

MCNEMAR_METHODS = ("exact", "midp", "chi2", "chi2_corrected")
BOOTSTRAP_METHODS = ("percentile", "bca")
DECISION_RULES = ("superiority", "non_inferiority", "equivalence")
ADJUSTMENTS = ("holm", "bonferroni", "none")
# Bound the index matrix of paired_mean_diff_ci (int64: 32 MiB) however long the input is.
_MAX_CHUNK_ELEMENTS = 1 << 22
# Mass of Bin(n, p_discordant) left out on each side when summing the power over D.
_POWER_TAIL = 1e-13


@dataclass(frozen=True, slots=True)
class McNemarResult:
    statistic: float
    pvalue: float
    b: int  # A right, B wrong
    c: int  # A wrong, B right
    n: int
    method: str


@dataclass(frozen=True, slots=True)
class BootstrapResult:
    estimate: float
    low: float
    high: float
    confidence: float
    method: str
    n_resamples: int


@dataclass(frozen=True, slots=True)
class WilsonResult:
    estimate: float
    low: float
    high: float
    confidence: float
    successes: int
    n: int


@dataclass(frozen=True, slots=True)
class DecisionResult:
    verdict: str
    rule: str
    margin: float
    alpha: float
    estimate: float  # acc_b - acc_a
    low: float
    high: float
    confidence: float
    pvalue: float | None  # McNemar exact for "superiority", else None
    n: int
    explanation: str


@dataclass(frozen=True, slots=True)
class CochranQResult:
    statistic: float
    pvalue: float
    df: int
    n: int
    k: int


@dataclass(frozen=True, slots=True)
class PairResult:
    name_i: str
    name_j: str
    b: int  # i right, j wrong
    c: int  # i wrong, j right
    statistic: float
    pvalue: float
    pvalue_adjusted: float


@dataclass(frozen=True, slots=True)
class PairwiseMcNemarResult:
    pairs: tuple[PairResult, ...]
    method: str
    adjust: str


@dataclass(frozen=True, slots=True)
class ClassResult:
    label: Any
    n: int
    only_a: int
    only_b: int
    pvalue: float
    pvalue_adjusted: float


@dataclass(frozen=True, slots=True)
class PerClassMcNemarResult:
    classes: tuple[ClassResult, ...]
    method: str
    adjust: str


@dataclass(frozen=True, slots=True)
class CalibrationResult:
    ece: float
    n_bins: int
    bin_lower: tuple[float, ...]
    bin_upper: tuple[float, ...]
    count: tuple[int, ...]
    mean_confidence: tuple[float, ...]  # nan for an empty bin
    accuracy: tuple[float, ...]  # nan for an empty bin


# --------------------------------------------------------------------------- input checks


def _check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _check_open_unit(name: str, value: float, upper: float = 1.0) -> float:
    value = float(value)
    if not 0.0 < value < upper:
        raise ValueError(f"{name} must lie strictly between 0 and {upper:g}; got {value!r}")
    return value


def _check_count(name: str, value: int, minimum: int) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer; got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}; got {value}")
    return value


def _bool_array(name: str, values: object, ndim: int) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype != np.bool_:
        raise ValueError(f"{name} must be a boolean array; got dtype {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} must not be empty; got shape {array.shape}")
    return array


def _paired_bool(correct_a: object, correct_b: object) -> tuple[np.ndarray, np.ndarray]:
    a = _bool_array("correct_a", correct_a, 1)
    b = _bool_array("correct_b", correct_b, 1)
    if a.shape != b.shape:
        raise ValueError(f"correct_a and correct_b must have equal length; got {a.size} and {b.size}")
    return a, b


def _real_vector(name: str, values: object) -> np.ndarray:
    array = np.asarray(values)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name} must hold real numbers; got dtype {array.dtype}")
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array; got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite; got {np.count_nonzero(~np.isfinite(array))} nan/inf values")
    return array.astype(np.float64)


# --------------------------------------------------------------------------- McNemar


def _mcnemar_counts(b: np.ndarray, c: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Statistic and p-value of McNemar's test from discordant counts (vectorised)."""
    b = np.asarray(b, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    d = b + c
    if method in ("exact", "midp"):
        statistic = np.minimum(b, c)
        pvalue = 2.0 * stats.binom.cdf(statistic, d, 0.5)
        if method == "midp":
            pvalue -= stats.binom.pmf(statistic, d, 0.5)
        return statistic, np.minimum(pvalue, 1.0)
    excess = np.abs(b - c)
    if method == "chi2_corrected":
        # Clamped at zero so that b == c gives statistic 0 (R and statsmodels give 1 / (b + c)).
        excess = np.maximum(excess - 1.0, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        statistic = np.where(d > 0, excess**2 / d, 0.0)
    return statistic, stats.chi2.sf(statistic, 1)


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray, method: str = "exact") -> McNemarResult:
    """McNemar's test of equal accuracy for two classifiers scored on the same images.

    Parameters
    ----------
    correct_a, correct_b : numpy.ndarray of bool, shape (n,)
        Whether classifier A (B) got each test image right.
    method : {"exact", "midp", "chi2", "chi2_corrected"}
        ``"exact"``: two-sided binomial test of the discordant pairs at 1/2, doubling the smaller
        tail (as ``statsmodels.stats.contingency_tables.mcnemar(exact=True)``). ``"midp"``: the
        mid-p version, which subtracts the point probability and keeps closer to nominal size.
        ``"chi2"``: ``(b - c)**2 / (b + c)`` on 1 degree of freedom. ``"chi2_corrected"``:
        Edwards' continuity correction ``max(|b - c| - 1, 0)**2 / (b + c)``.

    Returns
    -------
    McNemarResult
        ``statistic`` (``min(b, c)`` for the binomial methods), ``pvalue``, ``b`` (A right, B
        wrong), ``c`` (A wrong, B right), ``n`` and ``method``. With no discordant pairs the
        p-value is 1.

    Raises
    ------
    ValueError
        If the inputs are not non-empty 1-D boolean arrays of equal length, or ``method`` is unknown.

    References
    ----------
    McNemar, Q. (1947). Psychometrika 12(2), 153-157.
    Edwards, A. L. (1948). Psychometrika 13(3), 185-187.
    Fagerland, M. W., Lydersen, S., Laake, P. (2013). The McNemar test for binary matched-pairs
    data: mid-p and asymptotic are better than exact conditional. BMC Med. Res. Methodol. 13, 91.
    """
    _check_choice("method", method, MCNEMAR_METHODS)
    a, b_right = _paired_bool(correct_a, correct_b)
    b = int(np.count_nonzero(a & ~b_right))
    c = int(np.count_nonzero(~a & b_right))
    statistic, pvalue = _mcnemar_counts(np.array(b), np.array(c), method)
    return McNemarResult(float(statistic), float(pvalue), b, c, a.size, method)


# --------------------------------------------------------------------------- intervals


def _percentile_interval(draws: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_bootstrap_ci(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    method: str = "percentile",
    seed: int = 0,
) -> BootstrapResult:
    """Paired bootstrap confidence interval for the accuracy difference ``acc_b - acc_a``.

    A resample of the n image pairs changes the difference only through the counts of the three
    kinds of pair: A right and B wrong (``n10``), A wrong and B right (``n01``), and the rest. Those
    counts of a resample are Multinomial(n, [n10/n, n01/n, rest/n]), so each resample is one
    multinomial draw and its difference is ``(n01* - n10*) / n``: the same bootstrap distribution
    as resampling indices, in O(n_resamples) instead of O(n * n_resamples).

    Parameters
    ----------
    correct_a, correct_b : numpy.ndarray of bool, shape (n,)
        Per-image correctness of classifiers A and B on the same images.
    n_resamples : int
        Number of bootstrap resamples.
    confidence : float
        Two-sided confidence level, in (0, 1).
    method : {"percentile", "bca"}
        ``"bca"`` is the bias-corrected and accelerated interval: the bias correction ``z0`` comes
        from the bootstrap distribution (mid-rank of the estimate, as ``scipy.stats.bootstrap``),
        the acceleration from the jackknife, whose n leave-one-out values take only three distinct
        values and are therefore computed from the counts. It is nan when every resample falls on
        one side of the estimate.
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    BootstrapResult
        ``estimate`` (observed ``acc_b - acc_a``), ``low``, ``high``, ``confidence``, ``method``,
        ``n_resamples``.

    Raises
    ------
    ValueError
        On inputs that are not equal-length 1-D boolean arrays, or an invalid option.

    References
    ----------
    Efron, B., Tibshirani, R. J. (1993). An Introduction to the Bootstrap, ch. 13-14
    (percentile and BCa intervals; Eq. 14.15 for the jackknife acceleration).
    """
    _check_choice("method", method, BOOTSTRAP_METHODS)
    confidence = _check_open_unit("confidence", confidence)
    n_resamples = _check_count("n_resamples", n_resamples, 1)
    a, b = _paired_bool(correct_a, correct_b)
    n = a.size
    if method == "bca" and n < 2:
        raise ValueError(f"method='bca' needs at least 2 pairs for the jackknife; got n={n}")
    only_a = int(np.count_nonzero(a & ~b))
    only_b = int(np.count_nonzero(~a & b))
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [only_a / n, only_b / n, (n - only_a - only_b) / n], size=n_resamples)
    numerators = counts[:, 1] - counts[:, 0]  # integers: ties with the estimate compare exactly
    draws = numerators / n
    estimate = (only_b - only_a) / n
    if method == "percentile":
        low, high = _percentile_interval(draws, confidence)
        return BootstrapResult(estimate, low, high, confidence, method, n_resamples)

    observed = only_b - only_a
    below = np.count_nonzero(numerators < observed) + np.count_nonzero(numerators <= observed)
    z0 = float(ndtri(below / (2.0 * n_resamples)))
    # Leaving out one pair of each kind: an "only A" pair, an "only B" pair, or a concordant one.
    leave_one_out = np.array([observed + 1, observed - 1, observed]) / (n - 1)
    weights = np.array([only_a, only_b, n - only_a - only_b], dtype=np.float64)
    deviation = weights @ leave_one_out / n - leave_one_out
    spread = float(weights @ deviation**2)
    acceleration = float(weights @ deviation**3) / (6.0 * spread**1.5) if spread > 0 else 0.0
    if not math.isfinite(z0):
        return BootstrapResult(estimate, math.nan, math.nan, confidence, method, n_resamples)
    z = ndtri(np.array([(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0]))
    levels = ndtr(z0 + (z0 + z) / (1.0 - acceleration * (z0 + z)))
    low, high = np.quantile(draws, levels)
    return BootstrapResult(estimate, float(low), float(high), confidence, method, n_resamples)


def paired_mean_diff_ci(
    x_a: np.ndarray,
    x_b: np.ndarray,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """Percentile bootstrap interval for ``mean(x_b - x_a)`` of paired continuous values.

    Meant for per-batch measurements of two arms on the same batches (latency, memory). Pairs
    are resampled together; resamples are drawn in chunks so memory stays bounded for long inputs.

    Parameters
    ----------
    x_a, x_b : numpy.ndarray of float, shape (n,)
        Paired finite measurements of arms A and B.
    n_resamples : int
        Number of bootstrap resamples.
    confidence : float
        Two-sided confidence level, in (0, 1).
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    BootstrapResult
        ``estimate`` = ``mean(x_b - x_a)``, ``low``, ``high``, ``confidence``,
        ``method="percentile"``, ``n_resamples``.

    Raises
    ------
    ValueError
        If the inputs are not non-empty, finite, real 1-D arrays of equal length.

    References
    ----------
    Efron, B., Tibshirani, R. J. (1993). An Introduction to the Bootstrap, ch. 13.
    """
    confidence = _check_open_unit("confidence", confidence)
    n_resamples = _check_count("n_resamples", n_resamples, 1)
    a = _real_vector("x_a", x_a)
    b = _real_vector("x_b", x_b)
    if a.shape != b.shape:
        raise ValueError(f"x_a and x_b must have equal length; got {a.size} and {b.size}")
    diff = b - a
    n = diff.size
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    chunk = max(1, _MAX_CHUNK_ELEMENTS // n)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        means[start:stop] = diff[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    low, high = _percentile_interval(means, confidence)
    return BootstrapResult(float(diff.mean()), low, high, confidence, "percentile", n_resamples)


def wilson_ci(successes: int, n: int, confidence: float = 0.95) -> WilsonResult:
    """Wilson score interval for a binomial proportion (e.g. one model's accuracy).

    Parameters
    ----------
    successes : int
        Number of successes, ``0 <= successes <= n``.
    n : int
        Number of trials, at least 1.
    confidence : float
        Two-sided confidence level, in (0, 1).

    Returns
    -------
    WilsonResult
        ``estimate`` = ``successes / n``, ``low``, ``high``, ``confidence``, ``successes``, ``n``.

    References
    ----------
    Wilson, E. B. (1927). JASA 22(158), 209-212. Agresti, A., Coull, B. A. (1998). Approximate is
    better than "exact" for interval estimation of binomial proportions. Am. Stat. 52(2), 119-126.
    """
    confidence = _check_open_unit("confidence", confidence)
    n = _check_count("n", n, 1)
    successes = _check_count("successes", successes, 0)
    if successes > n:
        raise ValueError(f"successes must not exceed n; got successes={successes}, n={n}")
    z = float(ndtri((1.0 + confidence) / 2.0))
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return WilsonResult(p, max(0.0, centre - half), min(1.0, centre + half), confidence, successes, n)


# --------------------------------------------------------------------------- decisions


def _format_p(pvalue: float) -> str:
    return "p < 0.001" if pvalue < 0.001 else f"p = {pvalue:.2g}"


def decide(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    rule: str = "superiority",
    margin: float = 0.0,
    alpha: float = 0.05,
    n_resamples: int = 10_000,
    seed: int = 0,
    method: str = "exact",
    names: tuple[str, str] = ("A", "B"),
) -> DecisionResult:
    """Turn the paired comparison of A and B into a verdict with a one-sentence explanation.

    Parameters
    ----------
    correct_a, correct_b : numpy.ndarray of bool, shape (n,)
        Per-image correctness of A and B on the same images.
    rule : {"superiority", "non_inferiority", "equivalence"}
        ``"superiority"``: McNemar exact test at ``alpha``; verdict ``"b_better"`` or ``"a_better"``
        (whichever wins more discordant pairs) when ``p < alpha``, else
        ``"no_significant_difference"``; the interval is the ``1 - alpha`` paired percentile
        bootstrap of ``acc_b - acc_a``. ``margin`` must be 0.
        ``"non_inferiority"``: one-sided at ``alpha`` via the ``1 - 2 * alpha`` interval;
        ``"b_non_inferior"`` if ``low > -margin``, else ``"non_inferiority_not_shown"``.
        ``"equivalence"``: two one-sided tests (TOST) via the same interval; ``"equivalent"`` if
        ``-margin < low`` and ``high < margin``, else ``"equivalence_not_shown"``.
    margin : float
        Margin as a fraction of accuracy (0.005 is half a point); ``>= 0`` for non-inferiority,
        ``> 0`` for equivalence.
    alpha : float
        Significance level, in (0, 0.5).
    n_resamples, seed : int
        Passed to :func:`paired_bootstrap_ci`.
    method : str
        McNemar variant for the superiority test (see :func:`mcnemar`).
    names : tuple of str
        How the explanation names A and B.

    Returns
    -------
    DecisionResult
        ``verdict``, ``rule``, ``margin``, ``alpha``, ``estimate`` (``acc_b - acc_a``), ``low`` and
        ``high`` (the interval for ``acc_b - acc_a`` that was used), ``confidence``, ``pvalue``
        (McNemar exact for superiority, else None), ``n`` and ``explanation`` (accuracy points).

    References
    ----------
    Schuirmann, D. J. (1987). A comparison of the two one-sided tests procedure and the power
    approach for assessing the equivalence of average bioavailability. J. Pharmacokinet.
    Biopharm. 15(6), 657-680. Wellek, S. (2010). Testing Statistical Hypotheses of Equivalence and
    Noninferiority, 2nd ed., ch. 5 (paired binary data).
    """
    _check_choice("rule", rule, DECISION_RULES)
    alpha = _check_open_unit("alpha", alpha, upper=0.5)
    margin = float(margin)
    if rule == "superiority" and margin != 0.0:
        raise ValueError(f"margin must be 0 for rule='superiority' (use 'non_inferiority'); got {margin!r}")
    if rule == "non_inferiority" and not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must lie in [0, 1) for rule='non_inferiority'; got {margin!r}")
    if rule == "equivalence" and not 0.0 < margin < 1.0:
        raise ValueError(f"margin must lie in (0, 1) for rule='equivalence'; got {margin!r}")
    _check_choice("method", method, MCNEMAR_METHODS)
    a_, b_ = names
    confidence = 1.0 - alpha if rule == "superiority" else 1.0 - 2.0 * alpha
    ci = paired_bootstrap_ci(correct_a, correct_b, n_resamples, confidence, "percentile", seed)
    n = len(correct_a)
    # Two decimals once the interval is narrower than half a point, so its ends stay distinguishable.
    digits = 1 if ci.high - ci.low >= 0.005 else 2

    def points(fraction: float) -> str:
        return f"{100 * fraction + 0.0:.{digits}f}"  # + 0.0 turns -0.0 into 0.0

    level = f"{100 * confidence:g}% CI"
    tail = f"{n:,} test images"
    summary = f"{b_} - {a_} = {points(ci.estimate)} points ({level} {points(ci.low)} to {points(ci.high)})"
    pvalue = None
    if rule == "superiority":
        test = mcnemar(correct_a, correct_b, method)
        pvalue = test.pvalue
        tail = f"McNemar {method.replace('_', ' ')} {_format_p(pvalue)}, {tail}"
        if pvalue < alpha and test.c > test.b:
            verdict = "b_better"
            detail = f"{points(ci.estimate)} points ({level} {points(ci.low)} to {points(ci.high)})"
            explanation = f"{b_} is better than {a_} by {detail}, {tail}."
        elif pvalue < alpha:
            verdict = "a_better"
            detail = f"{points(-ci.estimate)} points ({level} {points(-ci.high)} to {points(-ci.low)})"
            explanation = f"{a_} is better than {b_} by {detail}, {tail}."
        else:
            verdict = "no_significant_difference"
            explanation = f"No significant difference between {a_} and {b_}: {summary}, {tail}."
    elif rule == "non_inferiority":
        at = f"at a margin of {100 * margin:g} points"
        if ci.low > -margin:
            verdict = "b_non_inferior"
            explanation = f"{b_} is non-inferior to {a_} {at}: {summary}, {tail}."
        else:
            verdict = "non_inferiority_not_shown"
            explanation = f"Non-inferiority of {b_} {at} not shown: {summary}, {tail}."
    else:
        within = f"within ±{100 * margin:g} points"
        if -margin < ci.low and ci.high < margin:
            verdict = "equivalent"
            explanation = f"{a_} and {b_} are equivalent {within}: {summary}, {tail}."
        else:
            verdict = "equivalence_not_shown"
            explanation = f"Equivalence {within} not shown: {summary}, {tail}."
    return DecisionResult(
        verdict, rule, margin, alpha, ci.estimate, ci.low, ci.high, confidence, pvalue, n, explanation
    )


# --------------------------------------------------------------------------- several models


def _adjust(pvalues: np.ndarray, adjust: str) -> np.ndarray:
    if adjust == "none" or pvalues.size == 0:
        return pvalues
    return multipletests(pvalues, method=adjust)[1]


def cochrans_q(correct: np.ndarray) -> CochranQResult:
    """Cochran's Q test that k classifiers have equal accuracy on the same n images.

    Parameters
    ----------
    correct : numpy.ndarray of bool, shape (n, k)
        ``correct[i, j]``: classifier j got image i right; k >= 2.

    Returns
    -------
    CochranQResult
        ``statistic`` (Q, chi-squared with ``df = k - 1`` under the null), ``pvalue``, ``df``,
        ``n``, ``k``. When every image is right for all or wrong for all classifiers, Q = 0, p = 1.

    References
    ----------
    Cochran, W. G. (1950). The comparison of percentages in matched samples. Biometrika 37,
    256-266. Matches ``statsmodels.stats.contingency_tables.cochrans_q``.
    """
    x = _bool_array("correct", correct, 2)
    n, k = x.shape
    if k < 2:
        raise ValueError(f"correct must have at least 2 columns (classifiers); got shape {x.shape}")
    columns = x.sum(axis=0, dtype=np.float64)
    rows = x.sum(axis=1, dtype=np.float64)
    total = columns.sum()
    denominator = k * total - rows @ rows
    if denominator == 0:
        return CochranQResult(0.0, 1.0, k - 1, n, k)
    statistic = (k - 1) * (k * (columns @ columns) - total**2) / denominator
    return CochranQResult(float(statistic), float(stats.chi2.sf(statistic, k - 1)), k - 1, n, k)


def pairwise_mcnemar(
    correct: np.ndarray, names: Sequence[str], method: str = "exact", adjust: str = "holm"
) -> PairwiseMcNemarResult:
    """McNemar tests for every pair of k classifiers, with a multiple-comparison adjustment.

    Parameters
    ----------
    correct : numpy.ndarray of bool, shape (n, k)
        Per-image correctness of k >= 2 classifiers.
    names : sequence of str, length k
        Distinct classifier names, in column order.
    method : {"exact", "midp", "chi2", "chi2_corrected"}
        As in :func:`mcnemar`.
    adjust : {"holm", "bonferroni", "none"}
        Family-wise adjustment over the ``k * (k - 1) / 2`` pairs
        (``statsmodels.stats.multitest.multipletests``).

    Returns
    -------
    PairwiseMcNemarResult
        ``pairs``: a tuple of ``PairResult(name_i, name_j, b, c, statistic, pvalue,
        pvalue_adjusted)`` for i < j, where ``b`` counts i right and j wrong; ``method``, ``adjust``.

    References
    ----------
    Holm, S. (1979). A simple sequentially rejective multiple test procedure. Scand. J. Stat. 6,
    65-70.
    """
    _check_choice("method", method, MCNEMAR_METHODS)
    _check_choice("adjust", adjust, ADJUSTMENTS)
    x = _bool_array("correct", correct, 2)
    k = x.shape[1]
    names = tuple(names)
    if k < 2 or len(names) != k or len(set(names)) != k:
        raise ValueError(f"need k >= 2 columns and k distinct names; got shape {x.shape} and names {names}")
    i, j = np.triu_indices(k, 1)
    b = np.count_nonzero(x[:, i] & ~x[:, j], axis=0)
    c = np.count_nonzero(~x[:, i] & x[:, j], axis=0)
    statistic, pvalue = _mcnemar_counts(b, c, method)
    adjusted = _adjust(pvalue, adjust)
    pairs = tuple(
        PairResult(names[ii], names[jj], int(bb), int(cc), float(s), float(p), float(q))
        for ii, jj, bb, cc, s, p, q in zip(i, j, b, c, statistic, pvalue, adjusted, strict=True)
    )
    return PairwiseMcNemarResult(pairs, method, adjust)


def per_class_mcnemar(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    labels: np.ndarray,
    method: str = "exact",
    adjust: str = "holm",
) -> PerClassMcNemarResult:
    """McNemar test of A vs B within each true class, adjusted over classes.

    Parameters
    ----------
    correct_a, correct_b : numpy.ndarray of bool, shape (n,)
        Per-image correctness of A and B.
    labels : numpy.ndarray, shape (n,)
        True class of each image (ints or strings).
    method : {"exact", "midp", "chi2", "chi2_corrected"}
        As in :func:`mcnemar`.
    adjust : {"holm", "bonferroni", "none"}
        Adjustment over the classes.

    Returns
    -------
    PerClassMcNemarResult
        ``classes``: a tuple, in sorted label order, of ``ClassResult(label, n, only_a, only_b,
        pvalue, pvalue_adjusted)``; ``method``, ``adjust``.

    References
    ----------
    Holm, S. (1979). Scand. J. Stat. 6, 65-70.
    """
    _check_choice("method", method, MCNEMAR_METHODS)
    _check_choice("adjust", adjust, ADJUSTMENTS)
    a, b = _paired_bool(correct_a, correct_b)
    labels = np.asarray(labels)
    if labels.shape != a.shape:
        raise ValueError(f"labels must have shape {a.shape} like correct_a; got shape {labels.shape}")
    classes, inverse = np.unique(labels, return_inverse=True)
    size = np.bincount(inverse, minlength=classes.size)
    only_a = np.bincount(inverse, weights=a & ~b, minlength=classes.size).astype(np.int64)
    only_b = np.bincount(inverse, weights=~a & b, minlength=classes.size).astype(np.int64)
    _, pvalue = _mcnemar_counts(only_a, only_b, method)
    adjusted = _adjust(pvalue, adjust)
    rows = tuple(
        ClassResult(label.item(), int(m), int(oa), int(ob), float(p), float(q))
        for label, m, oa, ob, p, q in zip(classes, size, only_a, only_b, pvalue, adjusted, strict=True)
    )
    return PerClassMcNemarResult(rows, method, adjust)


# --------------------------------------------------------------------------- planning


def _power_terms(n: int, p_discordant: float, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Discordant counts d, their probabilities, and the rejection bound k_d (needs no effect)."""
    first = int(stats.binom.ppf(_POWER_TAIL, n, p_discordant))
    last = int(stats.binom.isf(_POWER_TAIL, n, p_discordant))
    d = np.arange(max(first - 1, 0), min(last + 1, n) + 1)
    # k_d: the largest k with 2 * P(X <= k | d, 1/2) < alpha, or -1; ppf finds it up to one step.
    k = stats.binom.ppf(alpha / 2, d, 0.5) - 1
    k = np.where(2 * stats.binom.cdf(k + 1, d, 0.5) < alpha, k + 1, k)
    k = np.where((k >= 0) & (2 * stats.binom.cdf(k, d, 0.5) >= alpha), k - 1, k)
    return d, stats.binom.pmf(d, n, p_discordant), k


def _power(terms: tuple[np.ndarray, np.ndarray, np.ndarray], p_discordant: float, effect: float) -> float:
    d, weight, k = terms
    q = min(max(0.5 + effect / (2 * p_discordant), 0.0), 1.0)  # P(a discordant pair favours B)
    # Given d, reject when X <= k_d or X >= d - k_d, X ~ Bin(d, q) (both empty when k_d = -1).
    conditional = stats.binom.cdf(k, d, q) + stats.binom.sf(d - k - 1, d, q)
    return float(np.clip(weight @ conditional, 0.0, 1.0))


def _check_power_args(n: int, p_discordant: float, alpha: float) -> tuple[int, float, float]:
    n = _check_count("n", n, 1)
    p_discordant = float(p_discordant)
    if not 0.0 < p_discordant <= 1.0:
        raise ValueError(f"p_discordant must lie in (0, 1]; got {p_discordant!r}")
    return n, p_discordant, _check_open_unit("alpha", alpha)


def mcnemar_power(n: int, p_discordant: float, effect: float, alpha: float = 0.05) -> float:
    """Exact power of the two-sided exact McNemar test (rejecting when ``p < alpha``).

    The number of discordant pairs is D ~ Bin(n, p_discordant); given D = d, the pairs favouring
    B are Bin(d, q) with ``q = 1/2 + effect / (2 * p_discordant)``, and the test rejects outside
    the exact two-sided rejection region of the binomial test at 1/2. The power is the sum over d
    of P(D = d) times that conditional rejection probability. It is exact for every n (no normal
    approximation): values of d outside the central ``1 - 2e-13`` of Bin(n, p_discordant) are left
    out, so the sum has O(sqrt(n)) terms.

    Parameters
    ----------
    n : int
        Number of paired test images.
    p_discordant : float
        Probability that A and B disagree on correctness, in (0, 1].
    effect : float
        Accuracy difference ``acc_b - acc_a = p01 - p10``; ``|effect| <= p_discordant``.
    alpha : float
        Significance level, in (0, 1).

    Returns
    -------
    float
        The probability of rejecting equal accuracy.

    References
    ----------
    Connor, R. J. (1987). Sample size for testing differences in proportions for the paired-sample
    design. Biometrics 43, 207-211. Lachin, J. M. (1992). Power and sample size evaluation for the
    McNemar test with application to matched case-control studies. Stat. Med. 11, 1239-1251.
    Fagerland, M. W., Lydersen, S., Laake, P. (2013). BMC Med. Res. Methodol. 13, 91.
    """
    n, p_discordant, alpha = _check_power_args(n, p_discordant, alpha)
    effect = float(effect)
    if not abs(effect) <= p_discordant:
        raise ValueError(f"|effect| must not exceed p_discordant={p_discordant}; got effect={effect!r}")
    return _power(_power_terms(n, p_discordant, alpha), p_discordant, effect)


def minimum_detectable_effect(n: int, p_discordant: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest accuracy difference ``|acc_b - acc_a|`` the exact McNemar test detects with ``power``.

    Solves ``mcnemar_power(n, p_discordant, effect, alpha) == power`` for effect in
    ``(0, p_discordant]`` with Brent's method.

    Parameters
    ----------
    n : int
        Number of paired test images.
    p_discordant : float
        Expected fraction of images on which A and B disagree on correctness, in (0, 1].
    alpha : float
        Significance level, in (0, 1).
    power : float
        Target power, in (alpha, 1).

    Returns
    -------
    float
        The minimum detectable effect as a fraction, or nan when even ``effect = p_discordant``
        (every discordant pair favouring B) does not reach ``power``.

    References
    ----------
    Connor, R. J. (1987). Biometrics 43, 207-211.
    """
    n, p_discordant, alpha = _check_power_args(n, p_discordant, alpha)
    power = _check_open_unit("power", power)
    if power <= alpha:
        raise ValueError(f"power must exceed alpha={alpha}; got {power!r}")
    terms = _power_terms(n, p_discordant, alpha)

    def shortfall(effect: float) -> float:
        return _power(terms, p_discordant, effect) - power

    if shortfall(p_discordant) < 0:
        return math.nan
    return float(optimize.brentq(shortfall, 0.0, p_discordant, xtol=1e-12, rtol=1e-12))


# --------------------------------------------------------------------------- calibration


def calibration(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> CalibrationResult:
    """Top-label expected calibration error and the bins of a reliability diagram.

    Parameters
    ----------
    confidence : numpy.ndarray of float, shape (n,)
        Probability the model gave its predicted (top-1) class, in [0, 1].
    correct : numpy.ndarray of bool, shape (n,)
        Whether that prediction was right.
    n_bins : int
        Number of equal-width bins on [0, 1]; bins are ``[lower, upper)``, the last one closed.

    Returns
    -------
    CalibrationResult
        ``ece`` = sum over bins of ``count / n * |accuracy - mean_confidence|``, as
        ``torchmetrics.classification.MulticlassCalibrationError(norm="l1")``, which gives
        confidences of exactly 1.0 a group of their own (so ``ece`` can differ slightly from the
        sum over the diagram's bins when such confidences occur); ``n_bins`` and per-bin tuples
        ``bin_lower``, ``bin_upper``, ``count``, ``mean_confidence``, ``accuracy``.

    References
    ----------
    Naeini, M. P., Cooper, G., Hauskrecht, M. (2015). Obtaining well calibrated probabilities
    using Bayesian binning. AAAI. Guo, C., Pleiss, G., Sun, Y., Weinberger, K. Q. (2017). On
    calibration of modern neural networks. ICML.
    """
    n_bins = _check_count("n_bins", n_bins, 1)
    conf = _real_vector("confidence", confidence)
    hit = _bool_array("correct", correct, 1)
    if hit.shape != conf.shape:
        raise ValueError(f"confidence and correct must have equal length; got {conf.size} and {hit.size}")
    if conf.min() < 0.0 or conf.max() > 1.0:
        raise ValueError(f"confidence must lie in [0, 1]; got values in [{conf.min()}, {conf.max()}]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Group n_bins holds confidences of exactly 1.0, as torch.bucketize(right=True) does.
    group = np.searchsorted(edges, conf, side="right") - 1
    count = np.bincount(group, minlength=n_bins + 1)
    conf_sum = np.bincount(group, weights=conf, minlength=n_bins + 1)
    hit_sum = np.bincount(group, weights=hit, minlength=n_bins + 1)
    filled = count > 0
    ece = float(np.abs(hit_sum[filled] - conf_sum[filled]).sum() / conf.size)
    # The diagram folds the 1.0 group into the last bin.
    count = np.concatenate([count[: n_bins - 1], [count[n_bins - 1 :].sum()]])
    conf_sum = np.concatenate([conf_sum[: n_bins - 1], [conf_sum[n_bins - 1 :].sum()]])
    hit_sum = np.concatenate([hit_sum[: n_bins - 1], [hit_sum[n_bins - 1 :].sum()]])
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_confidence = np.where(count > 0, conf_sum / count, np.nan)
        accuracy = np.where(count > 0, hit_sum / count, np.nan)
    return CalibrationResult(
        ece,
        n_bins,
        tuple(edges[:-1].tolist()),
        tuple(edges[1:].tolist()),
        tuple(count.tolist()),
        tuple(mean_confidence.tolist()),
        tuple(accuracy.tolist()),
    )
