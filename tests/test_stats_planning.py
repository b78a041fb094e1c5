"""Tests of lab/stats/planning.py: exact power against seeded simulation of the exact McNemar test, sample sizes
against Connor's (1987) closed form, and the monotone neighbourhood of every size it reports.

Run with ``python -m pytest tests/test_stats_planning.py -q``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

from lab import stats as lab_stats
from lab.stats.planning import achieved_power, connor_n, plan, required_n


def simulated_power(n: int, p_disc: float, effect: float, alpha: float, reps: int, seed: int) -> float:
    """Share of simulated experiments where the exact McNemar test (p from scipy's binomial) rejects."""
    p_b, p_c = (p_disc - effect) / 2, (p_disc + effect) / 2
    counts = np.random.default_rng(seed).multinomial(n, [p_b, p_c, 1 - p_disc], size=reps)
    b, c = counts[:, 0], counts[:, 1]
    pvalue = np.where(b + c > 0, np.minimum(1.0, 2 * sps.binom.cdf(np.minimum(b, c), b + c, 0.5)), 1.0)
    return float(np.mean(pvalue < alpha))


POINTS = [(500, 0.1, 0.03), (3290, 0.04, 0.01), (200, 0.02, 0.01), (60, 0.3, 0.15), (1000, 0.05, -0.015)]


@pytest.mark.parametrize(("n", "p_disc", "effect"), POINTS)
def test_exact_power_matches_simulation(n: int, p_disc: float, effect: float) -> None:
    exact = achieved_power(n, p_disc, effect)
    simulated = simulated_power(n, p_disc, effect, 0.05, reps=6000, seed=n)
    assert abs(exact - simulated) <= 0.03, (exact, simulated)
    # Monte Carlo error is 0.0065 at most with 6,000 experiments, so the match is much closer than 0.03.
    assert abs(exact - simulated) <= 4 * math.sqrt(exact * (1 - exact) / 6000) + 1e-9


def test_size_of_the_test_is_below_alpha() -> None:
    for n, p_disc in [(50, 0.2), (400, 0.05), (3000, 0.02)]:
        size = achieved_power(n, p_disc, 0.0)
        assert 0.0 < size < 0.05
        assert abs(size - simulated_power(n, p_disc, 0.0, 0.05, reps=6000, seed=1)) <= 0.012


def test_rejection_region_agrees_with_statsmodels() -> None:
    # The power sums the rejection region; on small d write it out from statsmodels' exact test instead.
    n, p_disc, effect = 40, 0.3, 0.12
    q = 0.5 + effect / (2 * p_disc)
    total = 0.0
    for d in range(n + 1):
        reject = [sm_mcnemar([[0, d - x], [x, 0]], exact=True).pvalue < 0.05 if d else False for x in range(d + 1)]
        total += sps.binom.pmf(d, n, p_disc) * sum(sps.binom.pmf(x, d, q) for x in range(d + 1) if reject[x])
    assert_allclose(achieved_power(n, p_disc, effect), total, rtol=1e-10)


def test_agrees_with_the_power_the_report_uses() -> None:
    mcnemar_power = getattr(lab_stats, "mcnemar_power", None)
    if mcnemar_power is None:
        pytest.skip("lab.stats.mcnemar_power is not exported")
    for n, p_disc, effect in POINTS:
        assert_allclose(achieved_power(n, p_disc, effect), mcnemar_power(n, p_disc, effect), rtol=1e-12)


def test_issue_example_and_its_simulation() -> None:
    # python -m lab plan --acc 0.95 --disagreement 0.04 --mde 0.01
    result = plan(0.95, 0.04, 0.01)
    assert result.n == (3290, 4337) and result.n_connor == (3138, 4199)
    assert result.achieved[0] >= 0.8 and result.achieved[1] >= 0.9
    for n, target in zip(result.n, result.powers, strict=True):
        assert abs(simulated_power(n, 0.04, 0.01, 0.05, reps=6000, seed=n) - target) <= 0.03


@pytest.mark.parametrize(("p_disc", "effect"), [(0.04, 0.01), (0.1, 0.03), (0.3, 0.15), (0.02, 0.01), (0.5, 0.1)])
def test_required_n_is_the_smallest_and_the_power_stays_above(p_disc: float, effect: float) -> None:
    n = required_n(p_disc, effect)
    powers = np.array([achieved_power(m, p_disc, effect) for m in range(max(1, n - 60), n + 60)])
    assert powers[min(60, n - 1) - 1] < 0.8 <= powers[min(60, n - 1)]
    assert np.all(powers[min(60, n - 1) :] >= 0.8)


@pytest.mark.parametrize(("p_disc", "effect"), [(0.04, 0.005), (0.1, 0.01), (0.02, 0.002)])
def test_close_to_connor_at_large_n(p_disc: float, effect: float) -> None:
    for power in (0.8, 0.9):
        exact, connor = required_n(p_disc, effect, power=power), connor_n(p_disc, effect, power=power)
        assert connor < exact <= 1.04 * connor  # the exact test is a little conservative
        assert abs(achieved_power(math.ceil(connor), p_disc, effect) - power) <= 0.02


def test_larger_effects_need_fewer_images() -> None:
    sizes = [required_n(0.06, e) for e in (0.01, 0.02, 0.03, 0.06)]
    assert sizes == sorted(sizes, reverse=True)
    assert required_n(0.06, 0.02, power=0.9) > required_n(0.06, 0.02, power=0.8)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0.99, 0.04, 0.01), "impossible"),
        ((0.95, 0.04, 0.05), r"mde must lie in \(0, disagreement=0\.04\]; got 0\.05"),
        ((0.95, 0.0, 0.01), "disagreement must lie in"),
        ((1.0, 0.04, 0.01), "acc must lie strictly between 0 and 1; got 1.0"),
    ],
)
def test_plan_rejects_impossible_inputs(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan(*args)


def test_power_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"\|effect\| must not exceed p_disc=0\.02; got effect=0\.03"):
        achieved_power(100, 0.02, 0.03)
    with pytest.raises(ValueError, match="n must be at least 1; got 0"):
        achieved_power(0, 0.02, 0.01)
    with pytest.raises(ValueError, match="effect != 0"):
        required_n(0.02, 0.0)
