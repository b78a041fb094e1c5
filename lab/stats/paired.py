"""Intervals for the paired accuracy difference ``acc_b - acc_a`` from discordant counts, and verdicts built on them.

``b`` counts the images A got right and B wrong, ``c`` the reverse, ``n`` all images; the difference is ``(c - b) / n``.
Valid down to zero discordant pairs: ``python -m pytest tests/test_stats_paired.py`` enumerates the coverage.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtri

from lab.stats._checks import check_choice, check_open_unit
from lab.stats.mcnemar import MCNEMAR_METHODS, mcnemar

INTERVAL_METHODS = ("tango", "bonett_price", "wald")
MARGIN_RULES = ("non_inferiority", "equivalence")
SUPERIORITY_VERDICTS = ("b_better", "a_better", "no_significant_difference", "inconclusive")
# Bisection halves [-1, 1]; 64 halvings reach the spacing of doubles, so the limits are exact to rounding.
_BISECTIONS = 64


@dataclass(frozen=True, slots=True)
class PairedDiffResult:
    estimate: float  # (c - b) / n = acc_b - acc_a
    low: float
    high: float
    confidence: float
    method: str
    b: int  # A right, B wrong
    c: int  # A wrong, B right
    n: int


@dataclass(frozen=True, slots=True)
class SuperiorityResult:
    verdict: str  # one of SUPERIORITY_VERDICTS
    estimate: float
    low: float
    high: float
    confidence: float  # 1 - alpha
    pvalue: float  # McNemar (mcnemar_method)
    alpha: float
    mcnemar_method: str
    interval_method: str
    b: int
    c: int
    n: int


@dataclass(frozen=True, slots=True)
class MarginResult:
    verdict: str  # b_non_inferior / non_inferiority_not_shown, or equivalent / equivalence_not_shown
    rule: str
    margin: float
    alpha: float
    estimate: float
    low: float
    high: float
    confidence: float  # 1 - 2 * alpha: each one-sided test at alpha
    method: str
    b: int
    c: int
    n: int


def _count_arrays(b: object, c: object, n: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcast the counts to float arrays, raising ValueError on non-integers, negatives or b + c > n."""
    arrays = []
    for name, value in (("b", b), ("c", c), ("n", n)):
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name} must hold integers; got dtype {array.dtype} ({value!r:.60})")
        arrays.append(array.astype(np.float64))
    b_, c_, n_ = np.broadcast_arrays(*arrays)
    if np.any(n_ < 1):
        raise ValueError(f"n must be at least 1; got {n_.min():.0f}")
    if np.any(b_ < 0) or np.any(c_ < 0):
        raise ValueError(f"b and c must be non-negative; got b={b_.min():.0f}, c={c_.min():.0f} at the least")
    if np.any(b_ + c_ > n_):
        bad = np.argmax((b_ + c_ > n_).ravel())
        raise ValueError(
            f"b + c must not exceed n; got b={b_.ravel()[bad]:.0f}, c={c_.ravel()[bad]:.0f}, n={n_.ravel()[bad]:.0f}"
        )
    return b_, c_, n_


def _tango_statistic(delta: np.ndarray, b: np.ndarray, c: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Tango's score statistic for H0: p_c - p_b = delta, decreasing in delta (Tango 1998, eq. 3)."""
    # Restricted maximum likelihood estimate of p_b given p_c = p_b + delta: the root of a quadratic.
    qa = 2.0 * n
    qb = -b - c + (2.0 * n - c + b) * delta
    qc = -b * delta * (1.0 - delta)
    p_b = (np.sqrt(np.maximum(qb * qb - 4.0 * qa * qc, 0.0)) - qb) / (2.0 * qa)
    variance = n * (2.0 * p_b + delta * (1.0 - delta))
    numerator = c - b - n * delta
    with np.errstate(divide="ignore", invalid="ignore"):
        statistic = numerator / np.sqrt(np.maximum(variance, 0.0))
    # 0 / 0 (no discordant pairs at delta = 0) is a statistic of 0: the data sit exactly at the null.
    return np.where(numerator == 0.0, 0.0, statistic)


def _tango_bounds(b: np.ndarray, c: np.ndarray, n: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Solve T(delta) = z (lower) and T(delta) = -z (upper) by bisection on [-1, 1], all cells at once."""
    target = np.stack([np.full(b.shape, z), np.full(b.shape, -z)])
    lo = np.full(target.shape, -1.0)
    hi = np.full(target.shape, 1.0)
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        root_above = _tango_statistic(mid, b, c, n) > target
        lo = np.where(root_above, mid, lo)
        hi = np.where(root_above, hi, mid)
    low, high = 0.5 * (lo + hi)
    return np.where(b == n, -1.0, low), np.where(c == n, 1.0, high)


def _wald_bounds(b: np.ndarray, c: np.ndarray, n: np.ndarray, z: float, pseudo: float) -> tuple[np.ndarray, np.ndarray]:
    """Wald interval on (b + pseudo, c + pseudo) out of n + 2 * pseudo, clipped to [-1, 1]."""
    p_b = (b + pseudo) / (n + 2.0 * pseudo)
    p_c = (c + pseudo) / (n + 2.0 * pseudo)
    centre = p_c - p_b
    half = z * np.sqrt(np.maximum(p_b + p_c - centre**2, 0.0) / (n + 2.0 * pseudo))
    return np.maximum(centre - half, -1.0), np.minimum(centre + half, 1.0)


def paired_diff_bounds(
    b: object, c: object, n: object, confidence: float = 0.95, method: str = "tango"
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised limits of :func:`paired_diff_ci`: arrays of counts in, arrays of (low, high) out.

    Parameters
    ----------
    b, c, n : array_like of int
        Discordant counts (A right and B wrong; A wrong and B right) and numbers of images,
        broadcast against each other; ``0 <= b + c <= n`` and ``n >= 1``.
    confidence : float
        Two-sided level, in (0, 1).
    method : {"tango", "bonett_price", "wald"}
        See :func:`paired_diff_ci`.

    Returns
    -------
    tuple of numpy.ndarray
        ``(low, high)``, each of the broadcast shape.

    Raises
    ------
    ValueError
        On non-integer or negative counts, ``b + c > n``, ``n < 1``, a confidence outside (0, 1) or an
        unknown method.
    """
    check_choice("method", method, INTERVAL_METHODS)
    confidence = check_open_unit("confidence", confidence)
    b_, c_, n_ = _count_arrays(b, c, n)
    z = float(ndtri(0.5 + confidence / 2.0))
    if method == "tango":
        return _tango_bounds(b_, c_, n_, z)
    if method == "bonett_price":
        return _wald_bounds(b_, c_, n_, z, pseudo=1.0)
    return _wald_bounds(b_, c_, n_, z, pseudo=0.0)


def _scalar_counts(b: int, c: int, n: int) -> tuple[int, int, int]:
    try:
        counts = tuple(operator.index(x) for x in (b, c, n))
    except TypeError:
        raise ValueError(f"b, c and n must be integers; got b={b!r}, c={c!r}, n={n!r}") from None
    _count_arrays(*counts)
    return counts


def paired_diff_ci(b: int, c: int, n: int, confidence: float = 0.95, method: str = "tango") -> PairedDiffResult:
    """Confidence interval for the paired accuracy difference ``acc_b - acc_a = (c - b) / n``.

    ``"tango"`` (the default) inverts Tango's score test of ``p_c - p_b = delta``, with the nuisance
    parameter at its restricted maximum likelihood estimate; the limits are found by bisection to
    rounding error. It is among the intervals Fagerland, Lydersen & Laake (2014) recommend; it stays
    inside [-1, 1], is never degenerate (zero discordant pairs out of n give ``+-z**2 / (n + z**2)``,
    not [0, 0]), and at ``delta = 0`` its statistic is McNemar's uncorrected ``(c - b) / sqrt(b + c)``,
    so the interval excludes 0 exactly when the asymptotic McNemar test rejects. Exact enumeration
    (tests/test_stats_paired.py) puts its 95% coverage in [0.939, 0.963] once 5 discordant pairs
    are expected, and at 0.986-0.994 for n = 100 with 2% discordance. ``"bonett_price"`` is the Wald
    interval after adding one pseudo-pair to each discordant cell (Bonett & Price 2012, in the spirit of
    Agresti-Caffo): closed-form, but needlessly wide when discordance is rare (coverage 0.999 in that
    case). ``"wald"`` is the plain Wald interval, kept for comparison only: it collapses to [0, 0] with
    no discordant pairs and under-covers when discordance is rare.

    Parameters
    ----------
    b, c : int
        Images A got right and B wrong; images A got wrong and B right.
    n : int
        All paired images, ``n >= max(1, b + c)``.
    confidence : float
        Two-sided level, in (0, 1).
    method : {"tango", "bonett_price", "wald"}
        Which interval.

    Returns
    -------
    PairedDiffResult
        ``estimate`` (``(c - b) / n``), ``low``, ``high``, ``confidence``, ``method``, ``b``, ``c``, ``n``.

    Raises
    ------
    ValueError
        On non-integer or negative counts, ``b + c > n``, a confidence outside (0, 1) or an unknown method.

    References
    ----------
    Tango, T. (1998). Equivalence test and confidence interval for the difference in proportions for
    the paired-sample design. Stat. Med. 17(8), 891-908.
    Bonett, D. G., Price, R. M. (2012). Adjusted Wald confidence interval for a difference of binomial
    proportions based on paired data. J. Educ. Behav. Stat. 37(4), 479-488.
    Fagerland, M. W., Lydersen, S., Laake, P. (2014). Recommended tests and confidence intervals for
    paired binomial proportions. Stat. Med. 33(16), 2850-2875.
    """
    b, c, n = _scalar_counts(b, c, n)
    low, high = paired_diff_bounds(b, c, n, confidence, method)
    return PairedDiffResult((c - b) / n, float(low), float(high), float(confidence), method, b, c, n)


def _mcnemar_pvalue(b: int, c: int, method: str) -> float:
    # lab.stats.mcnemar takes correctness arrays; the concordant pairs do not enter the test.
    correct_a = np.repeat([True, False], [b, c]) if b + c else np.ones(1, dtype=bool)
    correct_b = ~correct_a if b + c else correct_a
    return mcnemar(correct_a, correct_b, method).pvalue


def coherent_superiority(
    b: int, c: int, n: int, alpha: float = 0.05, mcnemar_method: str = "exact", interval_method: str = "tango"
) -> SuperiorityResult:
    """Superiority verdict that cannot contradict its own interval or p-value.

    The rule: with the two-sided ``1 - alpha`` interval for ``acc_b - acc_a`` (``interval_method``)
    and the McNemar p-value (``mcnemar_method``),

    - ``"b_better"`` if ``low > 0`` and ``p < alpha``;
    - ``"a_better"`` if ``high < 0`` and ``p < alpha``;
    - ``"no_significant_difference"`` if ``low <= 0 <= high`` and ``p >= alpha``;
    - ``"inconclusive"`` otherwise: the test and the interval disagree (say the exact test keeps the
      null while the interval excludes 0), so no direction is claimed and nothing is called equal.

    A claim needs both procedures. With ``interval_method="tango"`` and ``mcnemar_method="chi2"`` the
    two are one score test and its inversion, so ``"inconclusive"`` never occurs.

    Parameters
    ----------
    b, c, n : int
        Discordant counts and number of images (see :func:`paired_diff_ci`).
    alpha : float
        Two-sided significance level, in (0, 0.5).
    mcnemar_method : {"exact", "midp", "chi2", "chi2_corrected"}
        Passed to :func:`lab.stats.mcnemar.mcnemar`.
    interval_method : {"tango", "bonett_price", "wald"}
        Passed to :func:`paired_diff_ci`.

    Returns
    -------
    SuperiorityResult
        ``verdict``, ``estimate``, ``low``, ``high``, ``confidence``, ``pvalue``, ``alpha``, both
        methods, and the counts.

    Raises
    ------
    ValueError
        On bad counts, alpha outside (0, 0.5) or an unknown method.

    References
    ----------
    Fagerland, M. W., Lydersen, S., Laake, P. (2013). The McNemar test for binary matched-pairs data:
    mid-p and asymptotic are better than exact conditional. BMC Med. Res. Methodol. 13, 91.
    Fagerland, M. W., Lydersen, S., Laake, P. (2014). Stat. Med. 33(16), 2850-2875.
    """
    alpha = check_open_unit("alpha", alpha, upper=0.5)
    check_choice("mcnemar_method", mcnemar_method, MCNEMAR_METHODS)
    ci = paired_diff_ci(b, c, n, 1.0 - alpha, interval_method)
    pvalue = _mcnemar_pvalue(ci.b, ci.c, mcnemar_method)
    rejects = pvalue < alpha
    if rejects and ci.low > 0.0:
        verdict = "b_better"
    elif rejects and ci.high < 0.0:
        verdict = "a_better"
    elif not rejects and ci.low <= 0.0 <= ci.high:
        verdict = "no_significant_difference"
    else:
        verdict = "inconclusive"
    return SuperiorityResult(
        verdict, ci.estimate, ci.low, ci.high, ci.confidence, pvalue, alpha, mcnemar_method, interval_method,
        ci.b, ci.c, ci.n,
    )  # fmt: skip


def margin_decision(
    b: int, c: int, n: int, rule: str, margin: float, alpha: float = 0.05, method: str = "tango"
) -> MarginResult:
    """Non-inferiority or equivalence of B to A from the ``1 - 2 * alpha`` interval and a margin.

    ``"non_inferiority"``: ``"b_non_inferior"`` if ``low > -margin``, else ``"non_inferiority_not_shown"``
    (a one-sided test at ``alpha``). ``"equivalence"``: ``"equivalent"`` if ``-margin < low`` and
    ``high < margin``, else ``"equivalence_not_shown"`` (two one-sided tests, each at ``alpha``).
    The interval, not a point estimate, must clear the margin, so agreement on every image is
    evidence only in proportion to n: with Tango's interval and no discordant pairs the limits are
    ``+-z**2 / (n + z**2)`` with ``z = z_{1 - alpha}``, and a claim at margin m needs
    ``n > z**2 * (1 - m) / m`` (539 images at m = 0.005 and alpha = 0.05).

    Parameters
    ----------
    b, c, n : int
        Discordant counts and number of images (see :func:`paired_diff_ci`).
    rule : {"non_inferiority", "equivalence"}
        Which claim.
    margin : float
        As a fraction of accuracy (0.005 is half a point): in [0, 1) for non-inferiority, (0, 1) for
        equivalence.
    alpha : float
        One-sided significance level, in (0, 0.5).
    method : {"tango", "bonett_price", "wald"}
        Interval, see :func:`paired_diff_ci`.

    Returns
    -------
    MarginResult
        ``verdict``, ``rule``, ``margin``, ``alpha``, ``estimate``, ``low``, ``high``, ``confidence``,
        ``method`` and the counts.

    Raises
    ------
    ValueError
        On bad counts, an unknown rule or method, a margin the rule does not allow, or alpha outside (0, 0.5).

    References
    ----------
    Schuirmann, D. J. (1987). J. Pharmacokinet. Biopharm. 15(6), 657-680.
    Tango, T. (1998). Stat. Med. 17(8), 891-908.
    """
    check_choice("rule", rule, MARGIN_RULES)
    margin = float(margin)
    if not (0.0 <= margin < 1.0 if rule == "non_inferiority" else 0.0 < margin < 1.0):
        allowed = "[0, 1)" if rule == "non_inferiority" else "(0, 1)"
        raise ValueError(f"margin must lie in {allowed} for rule={rule!r}; got {margin!r}")
    alpha = check_open_unit("alpha", alpha, upper=0.5)
    ci = paired_diff_ci(b, c, n, 1.0 - 2.0 * alpha, method)
    if rule == "non_inferiority":
        verdict = "b_non_inferior" if ci.low > -margin else "non_inferiority_not_shown"
    else:
        verdict = "equivalent" if -margin < ci.low and ci.high < margin else "equivalence_not_shown"
    return MarginResult(
        verdict, rule, margin, alpha, ci.estimate, ci.low, ci.high, ci.confidence, method, ci.b, ci.c, ci.n
    )
