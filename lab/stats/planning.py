"""Plan a comparison before running it: exact power of the paired exact McNemar test and the test-set size it needs.

``python -m lab plan --acc 0.95 --disagreement 0.04 --mde 0.01`` prints :func:`plan`'s sizes at 80% and 90% power.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.special import ndtri

from lab.stats._checks import check_count, check_open_unit

# Mass of Bin(n, p_disc) left out on each side when summing the power over the discordant count D.
_TAIL = 1e-13
_MAX_N = 10**9


@dataclass(frozen=True, slots=True)
class PlanResult:
    acc: float  # accuracy of the baseline A
    disagreement: float  # P(A and B differ on correctness)
    mde: float  # acc_b - acc_a to detect
    alpha: float
    powers: tuple[float, ...]
    n: tuple[int, ...]  # smallest test-set size reaching each power with the exact test
    achieved: tuple[float, ...]  # exact power at that size
    n_connor: tuple[int, ...]  # Connor's (1987) normal approximation, for comparison


def _rejection_bounds(d: np.ndarray, alpha: float) -> np.ndarray:
    """k_d: the largest k with 2 * P(X <= k) < alpha for X ~ Bin(d, 1/2), or -1 (vectorised over d)."""
    k = stats.binom.ppf(alpha / 2.0, d, 0.5) - 1.0
    for _ in range(2):  # ppf is right to within one step in floating point; settle it both ways
        k = np.where(2.0 * stats.binom.cdf(k + 1.0, d, 0.5) < alpha, k + 1.0, k)
        k = np.where((k >= 0) & (2.0 * stats.binom.cdf(k, d, 0.5) >= alpha), k - 1.0, k)
    return k


def _check(n: int, p_disc: float, effect: float, alpha: float) -> tuple[int, float, float, float]:
    n = check_count("n", n, 1)
    p_disc, effect = float(p_disc), float(effect)
    if not 0.0 < p_disc <= 1.0:
        raise ValueError(f"p_disc must lie in (0, 1]; got {p_disc!r}")
    if not abs(effect) <= p_disc:
        raise ValueError(f"|effect| must not exceed p_disc={p_disc}; got effect={effect!r}")
    return n, p_disc, effect, check_open_unit("alpha", alpha, upper=0.5)


def achieved_power(n: int, p_disc: float, effect: float, alpha: float = 0.05) -> float:
    """Exact power of the two-sided exact McNemar test (reject when ``p < alpha``) on n paired images.

    The discordant count is D ~ Bin(n, p_disc); given D = d, the pairs favouring B are Bin(d, q) with
    ``q = (1 + effect / p_disc) / 2``, and the test rejects when that count is at most ``k_d`` or at least
    ``d - k_d``, where ``k_d`` is the exact two-sided critical value at 1/2. The power is the sum over d of
    P(D = d) times that conditional rejection probability, with only the central ``1 - 2e-13`` of D kept
    (O(sqrt(n)) terms): exact enumeration, no normal approximation.

    Parameters
    ----------
    n : int
        Number of paired test images.
    p_disc : float
        Probability that A and B differ on correctness (discordance), in (0, 1].
    effect : float
        ``acc_b - acc_a = p_c - p_b``, with ``|effect| <= p_disc``.
    alpha : float
        Two-sided significance level, in (0, 0.5).

    Returns
    -------
    float
        The probability that the test rejects equal accuracy.

    Raises
    ------
    ValueError
        On ``n < 1``, ``p_disc`` outside (0, 1], ``|effect| > p_disc`` or alpha outside (0, 0.5).

    References
    ----------
    Miettinen, O. S. (1968). The matched pairs design in the case of all-or-none responses. Biometrics
    24(2), 339-352. Connor, R. J. (1987). Sample size for testing differences in proportions for the
    paired-sample design. Biometrics 43(1), 207-211.
    """
    n, p_disc, effect, alpha = _check(n, p_disc, effect, alpha)
    first = int(stats.binom.ppf(_TAIL, n, p_disc))
    last = int(stats.binom.isf(_TAIL, n, p_disc))
    d = np.arange(max(first - 1, 0), min(last + 1, n) + 1, dtype=np.float64)
    k = _rejection_bounds(d, alpha)
    q = min(max(0.5 + effect / (2.0 * p_disc), 0.0), 1.0)
    conditional = stats.binom.cdf(k, d, q) + stats.binom.sf(d - k - 1.0, d, q)
    return float(np.clip(stats.binom.pmf(d, n, p_disc) @ conditional, 0.0, 1.0))


def connor_n(p_disc: float, effect: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Connor's (1987) sample size for McNemar's test, ``(z_{a/2} sqrt(p) + z_b sqrt(p - e**2))**2 / e**2``.

    A normal approximation (unrounded) for comparison with :func:`required_n`; ``effect != 0``.
    """
    p_disc, effect, alpha = float(p_disc), float(effect), float(alpha)
    if effect == 0.0 or not abs(effect) <= p_disc <= 1.0:
        raise ValueError(f"need 0 < |effect| <= p_disc <= 1; got effect={effect!r}, p_disc={p_disc!r}")
    z_alpha, z_beta = ndtri(1.0 - alpha / 2.0), ndtri(float(power))
    return float((z_alpha * math.sqrt(p_disc) + z_beta * math.sqrt(p_disc - effect**2)) ** 2 / effect**2)


def required_n(p_disc: float, effect: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Smallest test-set size at which the exact McNemar test reaches ``power`` (see :func:`achieved_power`).

    Found by bisection between 1 and a doubling of Connor's size. The exact power is not perfectly
    monotone in n (the test is discrete), but mixing over the random discordant count smooths the steps
    to well under 0.001 once n is in the hundreds; tests/test_stats_planning.py checks the neighbourhood.

    Raises
    ------
    ValueError
        On ``effect == 0``, ``|effect| > p_disc``, ``power`` outside (alpha, 1), or a size beyond 1e9.
    """
    _check(1, p_disc, effect, alpha)
    power = check_open_unit("power", power)
    if power <= alpha or effect == 0.0:
        raise ValueError(f"need power > alpha and effect != 0; got power={power!r}, effect={effect!r}")
    high = max(2, math.ceil(connor_n(p_disc, effect, alpha, power)))
    while achieved_power(high, p_disc, effect, alpha) < power:
        high *= 2
        if high > _MAX_N:
            raise ValueError(f"power {power} needs more than {_MAX_N} images at p_disc={p_disc}, effect={effect}")
    low = 0  # achieved_power(low) < power is taken as given for low = 0
    while high - low > 1:
        mid = (low + high) // 2
        if achieved_power(mid, p_disc, effect, alpha) >= power:
            high = mid
        else:
            low = mid
    return high


def plan(
    acc: float, disagreement: float, mde: float, alpha: float = 0.05, powers: tuple[float, ...] = (0.8, 0.9)
) -> PlanResult:
    """Test-set sizes that detect an accuracy gain of ``mde`` over a baseline with the exact McNemar test.

    Only the discordance and the effect enter the power of McNemar's test (it conditions on the discordant
    pairs); ``acc`` checks that the pair of models is possible: B's gains ``(disagreement + mde) / 2`` come
    out of A's errors ``1 - acc``, and A's losses ``(disagreement - mde) / 2`` out of its successes.

    Parameters
    ----------
    acc : float
        Accuracy of the baseline A, in (0, 1).
    disagreement : float
        Expected fraction of test images on which A and B differ on correctness, in (0, 1].
    mde : float
        Minimum detectable effect ``acc_b - acc_a``, in (0, disagreement].
    alpha : float
        Two-sided significance level, in (0, 0.5).
    powers : tuple of float
        Target powers, each in (alpha, 1).

    Returns
    -------
    PlanResult
        The inputs, ``n`` (one size per power), ``achieved`` (exact power at each) and ``n_connor``.

    Raises
    ------
    ValueError
        On values outside their ranges or an impossible combination (named in the message).

    References
    ----------
    Connor, R. J. (1987). Biometrics 43(1), 207-211. Fagerland, M. W., Lydersen, S., Laake, P. (2013).
    BMC Med. Res. Methodol. 13, 91.
    """
    acc = check_open_unit("acc", acc)
    disagreement, mde = float(disagreement), float(mde)
    if not 0.0 < disagreement <= 1.0:
        raise ValueError(f"disagreement must lie in (0, 1]; got {disagreement!r}")
    if not 0.0 < mde <= disagreement:
        raise ValueError(f"mde must lie in (0, disagreement={disagreement}]; got {mde!r}")
    if (disagreement + mde) / 2.0 > 1.0 - acc or (disagreement - mde) / 2.0 > acc:
        raise ValueError(
            f"acc={acc}, disagreement={disagreement}, mde={mde} is impossible: B only right on "
            f"{(disagreement + mde) / 2:.4g} needs A wrong on that many (A is wrong on {1 - acc:.4g}), and A only "
            f"right on {(disagreement - mde) / 2:.4g} needs A right on that many"
        )
    sizes = tuple(required_n(disagreement, mde, alpha, p) for p in powers)
    achieved = tuple(achieved_power(n, disagreement, mde, alpha) for n in sizes)
    connor = tuple(math.ceil(connor_n(disagreement, mde, alpha, p)) for p in powers)
    return PlanResult(acc, disagreement, mde, float(alpha), tuple(float(p) for p in powers), sizes, achieved, connor)
