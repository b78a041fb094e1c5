"""Tests of lab/stats/clustered.py: the clustered McNemar test and design effect, and the group bootstrap engine.

References: statsmodels' McNemar, the formulas of Durkalski et al. (2003) and Obuchowski (1998) written out
per group, brute-force index resampling, and seeded simulations of the type-I error under correlated clusters.
Run with ``python -m pytest tests/test_stats_clustered.py -q``.
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy import sparse
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

from lab.stats.clustered import cluster_bootstrap, clustered_mcnemar, clustered_mcnemar_counts, group_codes


def null_clusters(rng: np.random.Generator, reps: int, groups: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group (b, c) under the null with strongly correlated groups (near-duplicate images).

    Each group has its own discordance p ~ Beta(2, 8) and its own direction q ~ Beta(0.2, 0.2): the pairs of
    one group mostly favour the same model, yet E[c - b] = 0.
    """
    p = rng.beta(2, 8, size=(reps, groups))
    q = rng.beta(0.2, 0.2, size=(reps, groups))
    counts = rng.multinomial(size, np.stack([p * (1 - q), p * q, 1 - p], axis=-1))
    return counts[..., 0], counts[..., 1]


def arrays_from_group_counts(b: np.ndarray, c: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image correctness and group labels with the given per-group discordant counts."""
    correct_a, correct_b, groups = [], [], []
    for g, (bg, cg) in enumerate(zip(b, c, strict=True)):
        rest = size - bg - cg
        correct_a += [True] * bg + [False] * cg + [True] * rest
        correct_b += [False] * bg + [True] * cg + [True] * rest
        groups += [f"scene-{g:03d}"] * size
    return np.array(correct_a), np.array(correct_b), np.array(groups)


# --------------------------------------------------------------------------- clustered McNemar


def test_singleton_groups_give_mcnemar_and_a_design_effect_of_one() -> None:
    rng = np.random.default_rng(0)
    correct_a = rng.random(300) < 0.8
    correct_b = np.where(rng.random(300) < 0.15, ~correct_a, correct_a)
    result = clustered_mcnemar(correct_a, correct_b, np.arange(300))
    b, c = result.b, result.c
    reference = sm_mcnemar([[0, b], [c, 0]], exact=False, correction=False)
    assert_allclose((result.statistic, result.pvalue), (reference.statistic, reference.pvalue), rtol=1e-12)
    assert_allclose(result.design_effect, 1.0, rtol=1e-12)
    assert (result.n, result.n_groups, result.method) == (300, 300, "durkalski")


def test_statistics_match_the_published_formulas() -> None:
    rng = np.random.default_rng(3)
    b, c = null_clusters(rng, 1, 25, 8)
    b, c = b[0], c[0]
    correct_a, correct_b, groups = arrays_from_group_counts(b, c, 8)
    x_a = np.add.reduceat(correct_a.astype(float), np.arange(0, 200, 8))  # per-group correct counts
    x_b = np.add.reduceat(correct_b.astype(float), np.arange(0, 200, 8))
    k, n, m = 25, 200, np.full(25, 8.0)
    # Durkalski et al. (2003): (sum (b_k - c_k))**2 / sum (b_k - c_k)**2.
    durkalski = (b - c).sum() ** 2 / ((b - c) ** 2).sum()
    # Obuchowski (1998): (p1 - p2)**2 / (var1 + var2 - 2 cov) with ratio-estimator (co)variances.
    p1, p2 = x_a.sum() / n, x_b.sum() / n
    var1 = k / (k - 1) / n**2 * ((x_a - m * p1) ** 2).sum()
    var2 = k / (k - 1) / n**2 * ((x_b - m * p2) ** 2).sum()
    cov = k / (k - 1) / n**2 * ((x_a - m * p1) * (x_b - m * p2)).sum()
    obuchowski = (p1 - p2) ** 2 / (var1 + var2 - 2 * cov)
    for method, statistic in (("durkalski", durkalski), ("obuchowski", obuchowski)):
        result = clustered_mcnemar(correct_a, correct_b, groups, method)
        assert_allclose(result.statistic, statistic, rtol=1e-10)
        assert_allclose(result.pvalue, sps.chi2.sf(statistic, 1), rtol=1e-10)
        # Design effect: Obuchowski's variance of p1 - p2 over the independent-images variance.
        naive = ((correct_b.astype(float) - correct_a).var(ddof=1)) / n
        assert_allclose(result.design_effect, (var1 + var2 - 2 * cov) / naive, rtol=1e-10)


def test_no_discordance_gives_statistic_zero() -> None:
    correct = np.ones(20, dtype=bool)
    result = clustered_mcnemar(correct, correct, np.repeat([0, 1], 10))
    assert (result.statistic, result.pvalue) == (0.0, 1.0)
    assert np.isnan(result.design_effect)


def test_design_effect_is_about_one_for_independent_images() -> None:
    rng = np.random.default_rng(5)
    correct_a = rng.random(6000) < 0.9
    correct_b = np.where(rng.random(6000) < 0.08, ~correct_a, correct_a)
    groups = rng.integers(0, 600, size=6000)  # groups of about 10 that share nothing
    design_effect = clustered_mcnemar(correct_a, correct_b, groups).design_effect
    assert 0.8 <= design_effect <= 1.2, design_effect


def test_design_effect_reaches_the_group_size_for_duplicates() -> None:
    rng = np.random.default_rng(6)
    correct_a = rng.random(600) < 0.9
    correct_b = np.where(rng.random(600) < 0.08, ~correct_a, correct_a)
    # Every image appears 10 times in its group: the information of 600 images in 6000 rows.
    result = clustered_mcnemar(np.repeat(correct_a, 10), np.repeat(correct_b, 10), np.repeat(np.arange(600), 10))
    assert 9.0 <= result.design_effect <= 10.5, result.design_effect


def test_type_one_error_under_correlated_clusters() -> None:
    rng = np.random.default_rng(2024)
    reps, size = 4000, 10
    rates = {}
    for groups in (30, 60):
        b, c = null_clusters(rng, reps, groups, size)
        sizes = np.full(b.shape, size)
        for method in ("durkalski", "obuchowski"):
            rates[method, groups] = float((clustered_mcnemar_counts(b, c, sizes, method)[1] < 0.05).mean())
        total_b, total_c = b.sum(axis=1), c.sum(axis=1)
        naive = sps.chi2.sf((total_c - total_b) ** 2 / np.maximum(total_b + total_c, 1), 1)
        rates["naive", groups] = float((naive < 0.05).mean())
        rates["design_effect", groups] = float(np.nanmedian(clustered_mcnemar_counts(b, c, sizes)[2]))
    # Recorded for the closing note (seed 2024, 4,000 experiments each, alpha = 0.05).
    for groups in (30, 60):
        assert 0.035 <= rates["durkalski", groups] <= 0.065, rates
        assert rates["obuchowski", groups] <= 0.075, rates
        assert rates["naive", groups] >= 0.18, rates  # McNemar treating the images as independent
        assert rates["design_effect", groups] > 2.0, rates


def test_power_of_the_clustered_test_under_an_alternative() -> None:
    rng = np.random.default_rng(7)
    p = rng.beta(2, 8, size=(2000, 60))
    q = rng.beta(2.0, 0.8, size=(2000, 60))  # most groups favour B
    counts = rng.multinomial(10, np.stack([p * (1 - q), p * q, 1 - p], axis=-1))
    pvalues = clustered_mcnemar_counts(counts[..., 0], counts[..., 1], np.full((2000, 60), 10))[1]
    assert (pvalues < 0.05).mean() > 0.8


def test_clustered_mcnemar_rejects_bad_input() -> None:
    correct = np.ones(4, dtype=bool)
    with pytest.raises(ValueError, match="at least 2 groups; got 1"):
        clustered_mcnemar(correct, correct, np.zeros(4))
    with pytest.raises(ValueError, match=r"one label per image \(4\); got shape \(3,\)"):
        clustered_mcnemar(correct, correct, [0, 1, 1])
    with pytest.raises(ValueError, match="method must be one of 'durkalski', 'obuchowski'; got 'gee'"):
        clustered_mcnemar(correct, correct, [0, 0, 1, 1], method="gee")
    with pytest.raises(ValueError, match="boolean"):
        clustered_mcnemar(np.ones(4), correct, [0, 0, 1, 1])
    with pytest.raises(ValueError, match="b \\+ c <= size"):
        clustered_mcnemar_counts([3, 1], [2, 0], [4, 4])


def test_group_codes_accept_any_sortable_labels() -> None:
    codes, count = group_codes(np.array(["b", "a", "b", "c"]), 4)
    assert count == 3 and codes.tolist() == [1, 0, 1, 2]


# --------------------------------------------------------------------------- the bootstrap engine


def accuracy_difference(totals: np.ndarray) -> np.ndarray:
    return (totals[:, 2] - totals[:, 1]) / totals[:, 0]


def test_cluster_bootstrap_matches_brute_force_group_resampling() -> None:
    rng = np.random.default_rng(11)
    sizes = rng.integers(1, 12, size=40)
    groups = np.repeat(np.arange(40), sizes)
    n = groups.size
    correct_a = rng.random(n) < 0.7
    correct_b = np.where(rng.random(n) < np.repeat(rng.random(40) * 0.4, sizes), ~correct_a, correct_a)
    per_image = np.column_stack([np.ones(n), correct_a, correct_b])
    per_group = np.zeros((40, 3))
    np.add.at(per_group, groups, per_image)
    draws = cluster_bootstrap(per_group, accuracy_difference, 4000, seed=1)
    # Brute force: draw group ids, gather their images, score them.
    brute = np.empty(4000)
    other = np.random.default_rng(99)
    for r in range(4000):
        chosen = np.concatenate([np.flatnonzero(groups == g) for g in other.integers(0, 40, size=40)])
        brute[r] = correct_b[chosen].mean() - correct_a[chosen].mean()
    assert_allclose(draws.std(), brute.std(), rtol=0.06)
    assert_allclose(draws.mean(), brute.mean(), atol=0.1 * brute.std())
    assert_allclose(np.quantile(draws, [0.05, 0.95]), np.quantile(brute, [0.05, 0.95]), atol=0.15 * brute.std())


def test_multiplicity_collapses_identical_images_without_changing_the_law() -> None:
    # 3 kinds of image (A only right, B only right, concordant) with multiplicities: the image bootstrap.
    units = np.array([[1.0, 1, 0], [1, 0, 1], [1, 1, 1]])
    draws = cluster_bootstrap(units, accuracy_difference, 20000, seed=0, multiplicity=np.array([30, 50, 920]))
    # Exact law: n * diff = N01 - N10 with (N10, N01) multinomial; variance (p10 + p01 - (p01 - p10)**2) / n.
    assert_allclose(draws.mean(), 0.02, atol=0.0005)
    assert_allclose(draws.var(), (0.08 - 0.02**2) / 1000, rtol=0.03)


def test_cluster_bootstrap_is_seeded_chunked_and_takes_sparse_input() -> None:
    units = sparse.random(500, 3, density=1.0, random_state=0, format="csr") + sparse.csr_matrix(np.ones((500, 3)))
    first = cluster_bootstrap(units, accuracy_difference, 300, seed=4)
    assert_allclose(first, cluster_bootstrap(units.toarray(), accuracy_difference, 300, seed=4))
    assert not np.array_equal(first, cluster_bootstrap(units, accuracy_difference, 300, seed=5))
    with pytest.raises(ValueError, match="multiplicity must hold 500 counts >= 1"):
        cluster_bootstrap(units, accuracy_difference, 10, multiplicity=np.zeros(500))
    with pytest.raises(ValueError, match="n_resamples must be at least 1; got 0"):
        cluster_bootstrap(units, accuracy_difference, 0)
