"""Tests of lab/stats/bayes.py against brute force: Monte Carlo from gamma draws, 2-D integration over the simplex,
closed forms, and baycomp's sign-test posterior read on the accuracy difference.

Run with ``python -m pytest tests/test_stats_bayes.py -q``.
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy import integrate
from scipy import stats as sps
from scipy.special import gammaln

from lab.stats.bayes import bayes_verdict, posterior_probabilities

CASES = [(3, 7, 30, 0.05), (0, 0, 200, 0.005), (5, 15, 1000, 0.005), (40, 10, 500, 0.01), (1, 0, 100_000, 1e-5)]


def gamma_draws(alphas: tuple[float, float, float], size: int, seed: int) -> np.ndarray:
    """Dirichlet draws built from independent gammas (not numpy's dirichlet, which the module uses)."""
    gammas = np.random.default_rng(seed).gamma(np.asarray(alphas), size=(size, 3))
    return gammas / gammas.sum(axis=1, keepdims=True)


@pytest.mark.parametrize(("b", "c", "n", "margin"), CASES)
@pytest.mark.parametrize("prior", ["uniform", "jeffreys"])
def test_exact_matches_brute_force_monte_carlo(b: int, c: int, n: int, margin: float, prior: str) -> None:
    result = posterior_probabilities(b, c, n, margin, prior)
    a0 = {"uniform": 1.0, "jeffreys": 0.5}[prior]
    draws = gamma_draws((b + a0, c + a0, n - b - c + a0), 400_000, seed=b + 7 * c)
    diff = draws[:, 1] - draws[:, 0]
    brute = np.array([np.mean(diff < -margin), np.mean(np.abs(diff) <= margin), np.mean(diff > margin)])
    ours = np.array([result.prob_a_better, result.prob_rope, result.prob_b_better])
    se = np.sqrt(ours * (1 - ours) / diff.size)
    assert np.all(np.abs(ours - brute) <= 5 * se + 1e-6), (ours, brute)
    assert_allclose(ours.sum(), 1.0, atol=1e-12)
    assert_allclose(result.mean, diff.mean(), atol=5 * diff.std() / np.sqrt(diff.size))
    assert_allclose((result.low, result.high), np.quantile(diff, [0.025, 0.975]), atol=0.02 * diff.std())


def test_exact_matches_integration_over_the_simplex() -> None:
    b, c, n, margin = 3, 7, 30, 0.05
    alphas = np.array([b + 1, c + 1, n - b - c + 1], dtype=float)
    log_norm = gammaln(alphas.sum()) - gammaln(alphas).sum()

    def density(p_c: float, p_b: float) -> float:  # Dirichlet density of (p_b, p_c, 1 - p_b - p_c)
        cells = np.maximum([p_b, p_c, 1 - p_b - p_c], 1e-300)
        return float(np.exp(log_norm + ((alphas - 1) * np.log(cells)).sum()))

    # P(p_c - p_b > margin): p_b in (0, 1), p_c in (p_b + margin, 1 - p_b).
    above, _ = integrate.dblquad(density, 0, (1 - margin) / 2, lambda p_b: p_b + margin, lambda p_b: 1 - p_b,
                                 epsabs=1e-11)  # fmt: skip
    below, _ = integrate.dblquad(density, margin, 1, 0, lambda p_b: min(p_b - margin, 1 - p_b), epsabs=1e-11)
    result = posterior_probabilities(b, c, n, margin)
    assert_allclose((result.prob_b_better, result.prob_a_better), (above, below), atol=1e-8)


def test_margin_zero_has_a_closed_form() -> None:
    # P(p_c > p_b) = P(Q > 1/2) with Q ~ Beta(c + 1, b + 1), whatever the concordant count.
    for b, c, n in [(2, 9, 50), (30, 22, 4000), (0, 1, 10)]:
        result = posterior_probabilities(b, c, n, 0.0)
        assert_allclose(result.prob_b_better, sps.beta(c + 1, b + 1).sf(0.5), atol=1e-11)
        assert result.prob_rope == pytest.approx(0.0, abs=1e-11)


def test_monte_carlo_method_agrees_and_is_seeded() -> None:
    exact = posterior_probabilities(5, 15, 1000, 0.005)
    first = posterior_probabilities(5, 15, 1000, 0.005, method="monte_carlo", seed=3)
    assert first == posterior_probabilities(5, 15, 1000, 0.005, method="monte_carlo", seed=3)
    assert_allclose(first.prob_b_better, exact.prob_b_better, atol=0.005)
    assert_allclose((first.low, first.high), (exact.low, exact.high), rtol=0.02)


def test_swapping_the_arms_swaps_the_probabilities() -> None:
    one, other = posterior_probabilities(4, 11, 300, 0.01), posterior_probabilities(11, 4, 300, 0.01)
    assert_allclose((one.prob_a_better, one.prob_rope), (other.prob_b_better, other.prob_rope), atol=1e-12)
    assert_allclose((one.low, one.high), (-other.high, -other.low), atol=1e-9)


def baycomp_sign_test_sample(x: np.ndarray, y: np.ndarray, rope: float, size: int, seed: int) -> np.ndarray:
    """baycomp.SignTest.sample (Benavoli et al. 2014), as baycomp 1.0.3 writes it: Dirichlet over the counts of
    per-image differences left of, inside and right of the rope, +1e-4 each and the prior (1) on the rope."""
    diff = y - x
    counts = np.array([np.sum(diff < -rope), 0.0, np.sum(diff > rope)])
    counts[1] = diff.size - counts[0] - counts[2]
    return np.random.RandomState(seed).dirichlet(counts + 0.0001 + np.array([0, 1.0, 0]), size)


def baycomp_regions(b: int, c: int, n: int, margin: float) -> tuple[np.ndarray, np.ndarray]:
    x = np.repeat([1.0, 0.0, 1.0], [b, c, n - b - c])  # A right on b and on the concordant images
    y = np.repeat([0.0, 1.0, 1.0], [b, c, n - b - c])
    sample = baycomp_sign_test_sample(x, y, margin, 200_000, seed=1)
    diff = sample[:, 2] - sample[:, 0]  # columns: left (A only right), rope (concordant), right (B only right)
    return np.array([np.mean(diff < -margin), np.mean(np.abs(diff) <= margin), np.mean(diff > margin)]), sample


@pytest.mark.parametrize(("b", "c", "n"), [(3, 7, 300), (20, 35, 2000)])
def test_same_posterior_as_baycomp_sign_test_read_on_the_accuracy_difference(b: int, c: int, n: int) -> None:
    regions, _ = baycomp_regions(b, c, n, 0.005)
    ours = posterior_probabilities(b, c, n, 0.005, prior=(1e-4, 1e-4, 1 + 1e-4))
    assert_allclose((ours.prob_a_better, ours.prob_rope, ours.prob_b_better), regions, atol=0.004)


def test_against_the_real_baycomp_when_installed() -> None:
    baycomp = pytest.importorskip("baycomp")
    x = np.repeat([1.0, 0.0, 1.0], [3, 7, 290])
    y = np.repeat([0.0, 1.0, 1.0], [3, 7, 290])
    sample = baycomp.SignTest.sample(x, y, rope=0.005, prior=1, nsamples=200_000, random_state=1)
    assert_allclose(sample, baycomp_sign_test_sample(x, y, 0.005, 200_000, seed=1))


def test_why_the_prior_sits_on_every_cell() -> None:
    # baycomp's prior puts its weight on the rope cell: 200 images that all agree then look like certain
    # equivalence within half a point. A prior on every cell (uniform, Jeffreys) keeps the doubt 200 images leave.
    regions, sample = baycomp_regions(0, 0, 200, 0.005)
    assert regions[1] > 0.999
    assert np.mean(np.argmax(sample, axis=1) == 1) == 1.0  # baycomp's own reading: the rope cell is the largest
    assert posterior_probabilities(0, 0, 200, 0.005).prob_rope == pytest.approx(0.6367, abs=1e-4)
    assert posterior_probabilities(0, 0, 200, 0.005, prior="jeffreys").prob_rope == pytest.approx(0.7926, abs=1e-4)


def test_many_concordant_images_behave() -> None:
    sizes = (10, 200, 539, 596, 1000, 2000, 100_000)
    results = [posterior_probabilities(0, 0, n, 0.005) for n in sizes]
    rope = [r.prob_rope for r in results]
    assert np.all(np.diff(rope) >= 0)
    assert_allclose(rope[:5], [0.0584, 0.6367, 0.9336, 0.9501, 0.9934], atol=1e-4)  # recorded for the note
    assert rope[-1] > 1 - 1e-9
    for r in results:
        assert r.prob_a_better == pytest.approx(r.prob_b_better, abs=1e-12)
        assert r.low < 0 < r.high
    verdicts = [bayes_verdict(r) for r in results]
    assert verdicts == ["undecided"] * 3 + ["equivalent"] * 4
    assert bayes_verdict(posterior_probabilities(0, 30, 1000, 0.005)) == "b_better"
    assert bayes_verdict(posterior_probabilities(30, 0, 1000, 0.005)) == "a_better"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"b": 5, "c": 6, "n": 10}, "b \\+ c <= n; got b=5, c=6, n=10"),
        ({"margin": 1.0}, r"margin must lie in \[0, 1\); got 1\.0"),
        ({"prior": "flat"}, "prior must be one of 'uniform', 'jeffreys'; got 'flat'"),
        ({"prior": (1.0, 0.0, 1.0)}, "three positive numbers"),
        ({"method": "mcmc"}, "method must be one of 'exact', 'monte_carlo'; got 'mcmc'"),
        ({"b": 1.5}, "integers"),
    ],
)
def test_bad_input_names_what_was_received(kwargs: dict, message: str) -> None:
    call = {"b": 1, "c": 2, "n": 10} | kwargs
    with pytest.raises(ValueError, match=message):
        posterior_probabilities(**call)
    with pytest.raises(ValueError, match=r"threshold must lie strictly between 0\.5 and 1; got 0\.5"):
        bayes_verdict(posterior_probabilities(1, 2, 10), 0.5)
