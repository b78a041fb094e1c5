"""Confidence intervals: the paired bootstrap of an accuracy difference, paired means and quantiles, Wilson.

Paired bootstraps of an accuracy difference use the fact that a resample depends only on three category
counts (only A right, only B right, the rest), so one multinomial draw per resample gives exactly the
distribution of resampling indices at a fraction of the cost (``python benchmarks/bootstrap.py`` measures it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtri

from lab.stats._checks import check_count, check_open_unit, paired_bool, real_vector

# Bound the index matrix of paired_mean_diff_ci (int64: 32 MiB) however long the input is.
_MAX_CHUNK_ELEMENTS = 1 << 22


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
class QuantileResult:
    quantile: float  # in (0, 1), e.g. 0.5 for the median
    estimate: float  # of arm A, or of the only arm
    low: float
    high: float
    estimate_b: float | None  # paired: arm B's quantile, else None
    low_b: float | None
    high_b: float | None
    diff: float | None  # paired: B's quantile - A's
    diff_low: float | None
    diff_high: float | None
    confidence: float
    n: int
    n_resamples: int


@dataclass(frozen=True, slots=True, eq=False)
class PairedBootstrap:
    """The bootstrap distribution of ``acc_b - acc_a``: draw once, read intervals at any confidence."""

    estimate: float  # observed acc_b - acc_a
    draws: np.ndarray  # shape (n_resamples,), one difference per resample
    only_a: int  # pairs with A right and B wrong
    only_b: int  # pairs with A wrong and B right
    n: int
    seed: int

    def interval(self, confidence: float = 0.95) -> BootstrapResult:
        """Two-sided percentile interval at ``confidence``, in (0, 1)."""
        confidence = check_open_unit("confidence", confidence)
        low, high = _percentile_interval(self.draws, confidence)
        return BootstrapResult(self.estimate, low, high, confidence, "percentile", self.draws.size)


def _percentile_interval(draws: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_bootstrap(
    correct_a: np.ndarray, correct_b: np.ndarray, n_resamples: int = 10_000, seed: int = 0
) -> PairedBootstrap:
    """Paired bootstrap distribution of the accuracy difference ``acc_b - acc_a``.

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
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    PairedBootstrap
        ``estimate``, ``draws`` (one difference per resample), the counts ``only_a``, ``only_b``,
        ``n``, and ``seed``; ``.interval(confidence)`` gives a :class:`BootstrapResult`. Intervals at
        several levels from one object share one set of draws.

    Raises
    ------
    ValueError
        On inputs that are not equal-length 1-D boolean arrays, or an invalid option.

    References
    ----------
    Efron, B., Tibshirani, R. J. (1993). An Introduction to the Bootstrap, ch. 13.
    """
    n_resamples = check_count("n_resamples", n_resamples, 1)
    a, b = paired_bool(correct_a, correct_b)
    n = a.size
    only_a = int(np.count_nonzero(a & ~b))
    only_b = int(np.count_nonzero(~a & b))
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [only_a / n, only_b / n, (n - only_a - only_b) / n], size=n_resamples)
    draws = (counts[:, 1] - counts[:, 0]) / n
    return PairedBootstrap((only_b - only_a) / n, draws, only_a, only_b, n, seed)


def paired_bootstrap_ci(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """Paired percentile bootstrap interval for ``acc_b - acc_a``: :func:`paired_bootstrap` read at one level.

    Parameters
    ----------
    correct_a, correct_b : numpy.ndarray of bool, shape (n,)
        Per-image correctness of classifiers A and B on the same images.
    n_resamples : int
        Number of bootstrap resamples.
    confidence : float
        Two-sided confidence level, in (0, 1).
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    BootstrapResult
        ``estimate`` (observed ``acc_b - acc_a``), ``low``, ``high``, ``confidence``,
        ``method="percentile"``, ``n_resamples``.

    Raises
    ------
    ValueError
        On inputs that are not equal-length 1-D boolean arrays, or an invalid option.

    References
    ----------
    Efron, B., Tibshirani, R. J. (1993). An Introduction to the Bootstrap, ch. 13.
    """
    confidence = check_open_unit("confidence", confidence)
    return paired_bootstrap(correct_a, correct_b, n_resamples, seed).interval(confidence)


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
    confidence = check_open_unit("confidence", confidence)
    n_resamples = check_count("n_resamples", n_resamples, 1)
    a = real_vector("x_a", x_a)
    b = real_vector("x_b", x_b)
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
    confidence = check_open_unit("confidence", confidence)
    n = check_count("n", n, 1)
    successes = check_count("successes", successes, 0)
    if successes > n:
        raise ValueError(f"successes must not exceed n; got successes={successes}, n={n}")
    z = float(ndtri((1.0 + confidence) / 2.0))
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return WilsonResult(p, max(0.0, centre - half), min(1.0, centre + half), confidence, successes, n)


def quantile_ci(
    x_a: np.ndarray,
    x_b: np.ndarray | None = None,
    quantiles: tuple[float, ...] = (0.5, 0.99),
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[QuantileResult, ...]:
    """Percentile bootstrap intervals for quantiles (say, p50 and p99 batch latency), paired when ``x_b`` is given.

    Rows (batches) are resampled with replacement; with ``x_b`` both arms are read on the same resample, which
    gives an interval for each arm's quantile and for the difference B - A (the pairing cancels what the
    batches share). Quantiles are numpy's linear interpolation; a high quantile of a few batches is close to
    their maximum and its interval is correspondingly rough.

    Parameters
    ----------
    x_a : numpy.ndarray of float, shape (n,)
        Finite measurements of arm A (or of the only arm).
    x_b : numpy.ndarray of float, shape (n,), optional
        Arm B's measurements of the same n batches, in the same order.
    quantiles : tuple of float
        Each in (0, 1).
    n_resamples : int
        Number of bootstrap resamples.
    confidence : float
        Two-sided confidence level, in (0, 1).
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    tuple of QuantileResult
        One per quantile: the estimate and interval of A, and (paired) of B and of B - A.

    Raises
    ------
    ValueError
        If the inputs are not non-empty, finite, real 1-D arrays of equal length, or an option is invalid.

    References
    ----------
    Efron, B., Tibshirani, R. J. (1993). An Introduction to the Bootstrap, ch. 13.
    """
    confidence = check_open_unit("confidence", confidence)
    n_resamples = check_count("n_resamples", n_resamples, 1)
    qs = tuple(check_open_unit("quantile", q) for q in quantiles)
    columns = [real_vector("x_a", x_a)] + ([] if x_b is None else [real_vector("x_b", x_b)])
    if len(columns) == 2 and columns[0].shape != columns[1].shape:
        raise ValueError(f"x_a and x_b must have equal length; got {columns[0].size} and {columns[1].size}")
    x = np.column_stack(columns)
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    draws = np.empty((n_resamples, len(qs), x.shape[1]))
    chunk = max(1, _MAX_CHUNK_ELEMENTS // (n * x.shape[1]))
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        sample = x[rng.integers(0, n, size=(stop - start, n))]  # (chunk, n, arms)
        draws[start:stop] = np.moveaxis(np.quantile(sample, qs, axis=1), 0, 1)
    observed = np.quantile(x, qs, axis=0)  # (quantiles, arms)
    out = []
    for i, q in enumerate(qs):
        low, high = _percentile_interval(draws[:, i, 0], confidence)
        paired: list[float | None] = [None] * 6
        if x.shape[1] == 2:
            paired[:3] = [float(observed[i, 1]), *_percentile_interval(draws[:, i, 1], confidence)]
            diff = draws[:, i, 1] - draws[:, i, 0]
            paired[3:] = [float(observed[i, 1] - observed[i, 0]), *_percentile_interval(diff, confidence)]
        out.append(QuantileResult(q, float(observed[i, 0]), low, high, *paired, confidence, n, n_resamples))
    return tuple(out)
