"""McNemar's test for two classifiers on the same images, Cochran's Q for k, every pair with Holm, per class.

Inputs are per-image correctness arrays (bool); results are small frozen objects of numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from lab.stats._checks import bool_array, check_choice, paired_bool

MCNEMAR_METHODS = ("exact", "midp", "chi2", "chi2_corrected")
ADJUSTMENTS = ("holm", "bonferroni", "none")


@dataclass(frozen=True, slots=True)
class McNemarResult:
    statistic: float
    pvalue: float
    b: int  # A right, B wrong
    c: int  # A wrong, B right
    n: int
    method: str


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


def mcnemar_counts(b: np.ndarray, c: np.ndarray, method: str = "exact") -> tuple[np.ndarray, np.ndarray]:
    """Statistic and p-value of McNemar's test from discordant counts, vectorised (see :func:`mcnemar`).

    ``b`` and ``c`` broadcast against each other; with ``b + c == 0`` the p-value is 1.
    """
    check_choice("method", method, MCNEMAR_METHODS)
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
    check_choice("method", method, MCNEMAR_METHODS)
    a, b_right = paired_bool(correct_a, correct_b)
    b = int(np.count_nonzero(a & ~b_right))
    c = int(np.count_nonzero(~a & b_right))
    statistic, pvalue = mcnemar_counts(np.array(b), np.array(c), method)
    return McNemarResult(float(statistic), float(pvalue), b, c, a.size, method)


def adjust_pvalues(pvalues: Sequence[float] | np.ndarray, adjust: str = "holm") -> np.ndarray:
    """Family-wise adjusted p-values, in the input order (as ``statsmodels.stats.multitest.multipletests``).

    Parameters
    ----------
    pvalues : sequence of float
        The family's raw p-values, each in [0, 1].
    adjust : {"holm", "bonferroni", "none"}
        Holm's step-down (Holm 1979), Bonferroni, or none.

    Raises
    ------
    ValueError
        On an unknown adjustment or p-values outside [0, 1].
    """
    check_choice("adjust", adjust, ADJUSTMENTS)
    pvalues = np.asarray(pvalues, dtype=np.float64)
    if pvalues.ndim != 1 or np.any(~(pvalues >= 0.0) | (pvalues > 1.0)):
        raise ValueError(f"pvalues must be a 1-D array of values in [0, 1]; got {pvalues!r:.80}")
    m = pvalues.size
    if adjust == "none" or m == 0:
        return pvalues
    if adjust == "bonferroni":
        return np.minimum(pvalues * m, 1.0)
    # Holm: the i-th smallest p-value times (m - i), made non-decreasing in that order. Written out because
    # statsmodels' multipletests runs a full garbage collection on every call (0.1 s).
    order = np.argsort(pvalues, kind="stable")
    stepped = np.minimum(np.maximum.accumulate(pvalues[order] * (m - np.arange(m))), 1.0)
    adjusted = np.empty(m)
    adjusted[order] = stepped
    return adjusted


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
    x = bool_array("correct", correct, 2)
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
    check_choice("method", method, MCNEMAR_METHODS)
    check_choice("adjust", adjust, ADJUSTMENTS)
    x = bool_array("correct", correct, 2)
    k = x.shape[1]
    names = tuple(names)
    if k < 2 or len(names) != k or len(set(names)) != k:
        raise ValueError(f"need k >= 2 columns and k distinct names; got shape {x.shape} and names {names}")
    i, j = np.triu_indices(k, 1)
    b = np.count_nonzero(x[:, i] & ~x[:, j], axis=0)
    c = np.count_nonzero(~x[:, i] & x[:, j], axis=0)
    statistic, pvalue = mcnemar_counts(b, c, method)
    adjusted = adjust_pvalues(pvalue, adjust)
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
    check_choice("method", method, MCNEMAR_METHODS)
    check_choice("adjust", adjust, ADJUSTMENTS)
    a, b = paired_bool(correct_a, correct_b)
    labels = np.asarray(labels)
    if labels.shape != a.shape:
        raise ValueError(f"labels must have shape {a.shape} like correct_a; got shape {labels.shape}")
    classes, inverse = np.unique(labels, return_inverse=True)
    size = np.bincount(inverse, minlength=classes.size)
    only_a = np.bincount(inverse, weights=a & ~b, minlength=classes.size).astype(np.int64)
    only_b = np.bincount(inverse, weights=~a & b, minlength=classes.size).astype(np.int64)
    _, pvalue = mcnemar_counts(only_a, only_b, method)
    adjusted = adjust_pvalues(pvalue, adjust)
    rows = tuple(
        ClassResult(label.item(), int(m), int(oa), int(ob), float(p), float(q))
        for label, m, oa, ob, p, q in zip(classes, size, only_a, only_b, pvalue, adjusted, strict=True)
    )
    return PerClassMcNemarResult(rows, method, adjust)
