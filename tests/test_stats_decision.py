"""Tests of lab/stats/decision.py: one coherent verdict per rule, checked against the interval and test behind it
over the issue's grid, claim rates at the null boundary and interval coverage by exact enumeration, no claims from
agreement alone, the Bonferroni/Holm family, groups, bootstrap metrics, the Bayesian rule, and the MDE.

Run with ``python -m pytest tests/test_stats_decision.py -q``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import pytest
from scipy import stats as sps
from test_stats_mcnemar import pairs

from lab import stats
from lab.stats.paired import coherent_superiority, margin_decision


def counts_pairs(b: int, c: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Correctness arrays with b images only A right, c only B right, and the rest right for both."""
    return pairs(b, c, n - b - c, 0)


def trinomial(n: int, p_b: float, p_c: float, smallest: float = 1e-12) -> tuple[np.ndarray, ...]:
    """Every (b, c) with b + c <= n and its probability, keeping cells down to `smallest` of mass."""
    b, c = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    keep = b + c <= n
    b, c = b[keep], c[keep]
    log_p = sps.multinomial.logpmf(np.column_stack([b, c, n - b - c]), n, [p_b, p_c, 1 - p_b - p_c])
    p = np.exp(log_p)
    big = p > smallest
    return b[big], c[big], p[big]


# --------------------------------------------------------------------------- superiority


def test_superiority_verdicts_with_the_interval_and_test_behind_them() -> None:
    better = stats.decide(*pairs(100, 190, 7500, 2210))
    assert better.verdict == "b_better" and better.method == "tango" and better.low > 0
    assert (better.metric, better.rule, better.comparisons, better.n_groups) == ("accuracy", "superiority", 1, None)
    assert better.pvalue == stats.mcnemar(*pairs(100, 190, 7500, 2210)).pvalue < 0.05
    assert better.confidence == 0.95 and better.n == 10_000 and better.estimate == pytest.approx(0.009, abs=1e-15)
    ci = stats.paired_diff_ci(100, 190, 10_000, 0.95, "tango")
    assert (better.low, better.high) == (ci.low, ci.high)  # the interval the rule used is the one reported
    worse = stats.decide(*pairs(190, 100, 7500, 2210))
    assert worse.verdict == "a_better" and worse.high < 0
    tied = stats.decide(*pairs(100, 110, 7500, 2290))
    assert tied.verdict == "no_significant_difference" and tied.pvalue > 0.05 and tied.low < 0 < tied.high


@pytest.mark.parametrize("method", stats.MCNEMAR_METHODS)
def test_superiority_is_never_in_conflict_with_its_interval_over_the_grid(method: str) -> None:
    # The issue's grid: n in {50, 200, 1000}, b and c in 0..20, every McNemar method; decide agrees with H4's
    # coherent_superiority cell by cell, and a verdict never contradicts its own interval or p-value.
    counted = {code: 0 for code in stats.VERDICTS["superiority"]}
    for n in (50, 200, 1000):
        for b in range(21):
            for c in range(21):
                d = stats.decide(*counts_pairs(b, c, n), method=method)
                reference = coherent_superiority(b, c, n, 0.05, method)
                assert (d.verdict, d.low, d.high, d.pvalue) == (reference.verdict, reference.low, reference.high,
                                                                 reference.pvalue)  # fmt: skip
                counted[d.verdict] += 1
                if d.verdict == "b_better":
                    assert d.low > 0 and d.pvalue < 0.05
                elif d.verdict == "a_better":
                    assert d.high < 0 and d.pvalue < 0.05
                elif d.verdict == "no_significant_difference":
                    assert d.low <= 0 <= d.high and d.pvalue >= 0.05
                else:
                    assert (d.low > 0 or d.high < 0) != (d.pvalue < 0.05)
    assert sum(counted.values()) == 3 * 21 * 21 and counted["b_better"] > 0 and counted["a_better"] > 0


def test_the_issue_example_is_no_longer_a_contradiction() -> None:
    # n = 50, b = 0, c = 4: exact p = 0.125 keeps the null while the interval excludes 0, so there is no verdict;
    # with mid-p the test rejects but the claim still needs the interval.
    exact = stats.decide(*counts_pairs(0, 4, 50))
    assert (exact.verdict, exact.pvalue) == ("inconclusive", 0.125) and exact.low > 0
    assert stats.decide(*counts_pairs(0, 4, 50), method="chi2").verdict == "b_better"


def test_superiority_uses_the_given_pvalue_and_family_level() -> None:
    a, b = pairs(100, 150, 7500, 2250)
    single = stats.decide(a, b)
    family = stats.decide(a, b, comparisons=6, pvalue=0.2)
    assert single.verdict == "b_better" and family.verdict == "inconclusive"  # Holm p 0.2 does not reject
    assert family.confidence == pytest.approx(1 - 0.05 / 6) and family.low < single.low
    assert (family.pvalue, family.comparisons) == (0.2, 6)
    assert stats.decide(a, b, comparisons=6, pvalue=0.001).verdict == "b_better"


def test_rule_verdict_table() -> None:
    rv = stats.rule_verdict
    assert [rv("superiority", 0.01, 0.02, pvalue=p) for p in (0.01, 0.2)] == ["b_better", "inconclusive"]
    assert [rv("superiority", -0.02, -0.01, pvalue=p) for p in (0.01, 0.2)] == ["a_better", "inconclusive"]
    assert [rv("superiority", -0.01, 0.01, pvalue=p) for p in (0.01, 0.2)] == ["inconclusive",
                                                                              "no_significant_difference"]
    assert [rv("superiority", lo, lo + 0.02) for lo in (0.001, -0.03, -0.01)] == ["b_better", "a_better",
                                                                                 "no_significant_difference"]
    assert rv("non_inferiority", -0.004, 0.01, 0.005) == "b_non_inferior"
    assert rv("non_inferiority", -0.005, 0.01, 0.005) == "non_inferiority_not_shown"  # the boundary is no claim
    assert rv("equivalence", -0.004, 0.004, 0.005) == "equivalent"
    assert rv("equivalence", -0.004, 0.005, 0.005) == "equivalence_not_shown"  # both boundaries are no claim
    assert rv("equivalence", -0.005, 0.004, 0.005) == "equivalence_not_shown"
    assert rv("non_inferiority", -0.001, 0.01) == "non_inferiority_not_shown"  # the default margin is 0
    assert rv("non_inferiority", 0.0, 0.01) == "non_inferiority_not_shown" and rv("superiority", 0.0, 0.01) == (
        "no_significant_difference")  # an interval touching 0 shows nothing
    # At the boundaries nothing is claimed: an interval touching 0, or p exactly alpha.
    assert rv("superiority", 0.0, 0.02, pvalue=0.01) == rv("superiority", -0.02, 0.0, pvalue=0.01) == "inconclusive"
    assert rv("superiority", 0.0, 0.02, pvalue=0.2) == rv("superiority", -0.02, 0.0, pvalue=0.2) == (
        "no_significant_difference")
    assert rv("superiority", -0.02, 0.0) == "no_significant_difference"
    assert rv("superiority", -0.01, 0.01, alpha=0.05, pvalue=0.05) == "no_significant_difference"
    with pytest.raises(ValueError, match=r"^rule must be one of 'superiority'; got 'bayes'$"):
        rv("bayes", 0.01, 0.02)  # "bayes" reads a posterior, not an interval


@pytest.mark.parametrize(("rule", "m", "expected"), [("superiority", 1, 0.95), ("superiority", 3, 1 - 0.05 / 3),
                                                     ("non_inferiority", 1, 0.9), ("equivalence", 2, 0.95),
                                                     ("bayes", 1, 0.9)])  # fmt: skip
def test_interval_confidence(rule: str, m: int, expected: float) -> None:
    assert stats.interval_confidence(rule, 0.05, m) == pytest.approx(expected)
    assert stats.interval_confidence(rule, 0.1) == (0.9 if rule == "superiority" else 0.8)  # one comparison


def test_decision_results_are_small_frozen_records_with_documented_defaults() -> None:
    assert tuple(stats.VERDICTS) == stats.DECISION_RULES == ("superiority", "non_inferiority", "equivalence", "bayes")
    assert stats.VERDICTS["superiority"] == ("b_better", "a_better", "no_significant_difference", "inconclusive")
    assert stats.VERDICTS["non_inferiority"] == ("b_non_inferior", "non_inferiority_not_shown")
    assert stats.VERDICTS["equivalence"] == ("equivalent", "equivalence_not_shown")
    assert stats.VERDICTS["bayes"] == ("b_better", "a_better", "equivalent", "undecided")
    bare = stats.DecisionResult("b_better", "superiority", 0.0, 0.05, 0.01, 0.005, 0.02, 0.95, 0.01, 100)
    assert (bare.metric, bare.method, bare.comparisons, bare.n_groups, bare.design_effect, bare.probabilities) == (
        "accuracy", "tango", 1, None, None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        bare.verdict = "a_better"  # type: ignore[misc]
    assert not hasattr(bare, "__dict__")  # slots


# --------------------------------------------------------------------------- margins: evidence before a claim


def test_margin_rules_match_the_paired_margin_decision() -> None:
    for counts in [(110, 100, 7500, 2290), (105, 105, 7500, 2290), (3, 0, 190, 7)]:
        a, b = pairs(*counts)
        for rule, margin in [("non_inferiority", 0.005), ("non_inferiority", 0.001), ("equivalence", 0.005)]:
            d = stats.decide(a, b, rule, margin)
            ref = margin_decision(counts[0], counts[1], a.size, rule, margin)
            assert (d.verdict, d.low, d.high, d.confidence, d.pvalue) == (ref.verdict, ref.low, ref.high,
                                                                          ref.confidence, None)  # fmt: skip


@pytest.mark.parametrize("n", [10, 200])
@pytest.mark.parametrize("rule", ["non_inferiority", "equivalence", "bayes"])
def test_no_claim_from_fully_concordant_images(n: int, rule: str) -> None:
    a = np.ones(n, dtype=bool)
    d = stats.decide(a, a.copy(), rule, 0.005)
    assert d.verdict not in stats.CLAIMS, d
    assert d.low < -0.005 or d.high > 0.005  # the interval shows why: agreement on n images bounds little


def test_concordance_becomes_evidence_once_n_is_large_enough() -> None:
    a = np.ones(5000, dtype=bool)
    assert stats.decide(a, a.copy(), "non_inferiority", 0.005).verdict == "b_non_inferior"
    assert stats.decide(a, a.copy(), "equivalence", 0.005).verdict == "equivalent"


@pytest.mark.parametrize("rule", ["non_inferiority", "equivalence"])
def test_claim_rate_at_the_null_boundary_is_at_most_alpha(rule: str) -> None:
    # The issue: n = 200, 0.5% discordance, B truly worse by exactly the margin (every discordant pair favours A).
    # The claim rate is summed exactly over every outcome (b, c) of the experiment, each decided by `decide`.
    n, margin = 200, 0.005
    b, c, p = trinomial(n, 0.005, 0.0)
    claims = [stats.decide(*counts_pairs(int(bb), int(cc), n), rule, margin).verdict in stats.CLAIMS
              for bb, cc in zip(b, c, strict=True)]  # fmt: skip
    assert p @ np.asarray(claims) <= 0.05 + 0.01


def test_claim_rate_at_the_null_boundary_with_more_data() -> None:
    # n = 2000, 4% discordance, true difference -margin: the rate stays below alpha + 0.01 and is not far below it.
    n, margin = 2000, 0.01
    b, c, p = trinomial(n, 0.025, 0.015, smallest=1e-8)
    assert p.sum() > 1 - 1e-5
    claims = np.array([stats.decide(*counts_pairs(int(bb), int(cc), n), "non_inferiority", margin).verdict
                       == "b_non_inferior" for bb, cc in zip(b, c, strict=True)])  # fmt: skip
    assert 0.02 <= p @ claims <= 0.06


def test_interval_coverage_at_rare_discordance() -> None:
    # n = 100, 2% discordance, accuracy near 0.99, true differences -1 to +1 point: decide's 95% interval covers
    # the truth in at least 93% of experiments, 93% to 99% on average (exact enumeration over every outcome).
    n, p_disc, values = 100, 0.02, []
    for diff in (-0.01, -0.005, 0.0, 0.005, 0.01):
        b, c, p = trinomial(n, (p_disc - diff) / 2, (p_disc + diff) / 2)
        decisions = [stats.decide(*counts_pairs(int(bb), int(cc), n)) for bb, cc in zip(b, c, strict=True)]
        values.append(p @ np.array([d.low <= diff <= d.high for d in decisions]))
    assert min(values) >= 0.93 and 0.93 <= np.mean(values) <= 0.99, values


# --------------------------------------------------------------------------- groups, other metrics, bayes


def test_groups_widen_the_interval_and_cluster_the_test() -> None:
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(100), 10)
    # Whole groups flip together (near-duplicates): 10 groups only B right, 4 only A right.
    kind = rng.permutation(np.repeat([0, 1, 2], [10, 4, 86]))
    a = np.repeat(kind != 0, 10)
    b = np.repeat(kind != 1, 10)
    plain = stats.decide(a, b)
    grouped = stats.decide(a, b, groups=groups, n_resamples=4000)
    assert plain.verdict == "b_better" and grouped.verdict == "no_significant_difference"
    assert grouped.method == "cluster_bootstrap" and grouped.n_groups == 100 and grouped.design_effect > 5
    assert grouped.pvalue == stats.clustered_mcnemar(a, b, groups).pvalue
    assert grouped.high - grouped.low > 2 * (plain.high - plain.low)
    independent = stats.decide(*pairs(60, 100, 700, 140), groups=np.arange(1000) // 10, n_resamples=4000)
    assert 0.7 < independent.design_effect < 1.4


def test_bayes_with_groups_reads_the_effective_counts() -> None:
    # Near-duplicates in groups of 5: the posterior sees n / design effect images, so it is less sure.
    kind = np.random.default_rng(2).permutation(np.repeat([0, 1, 2], [12, 6, 182]))
    a, b = np.repeat(kind != 0, 5), np.repeat(kind != 1, 5)
    groups = np.repeat(np.arange(200), 5)
    plain, grouped = stats.decide(a, b, "bayes"), stats.decide(a, b, "bayes", groups=groups)
    deff = stats.clustered_mcnemar(a, b, groups).design_effect
    assert 4.5 < deff < 5.5 and (grouped.n_groups, grouped.design_effect) == (200, deff)
    effective = [round(x / deff) for x in (30, 60, 1000)]
    post = stats.posterior_probabilities(*effective, 0.0, credibility=0.9)
    assert grouped.probabilities == (post.prob_a_better, post.prob_rope, post.prob_b_better)
    assert (grouped.rule, grouped.metric, grouped.method) == ("bayes", "accuracy", "bayes")
    assert grouped.estimate == plain.estimate == pytest.approx(0.03)
    assert plain.verdict == "b_better" and grouped.verdict == "undecided"
    independent = stats.decide(*pairs(30, 50, 800, 120), "bayes", groups=np.arange(1000))  # design effect 1
    assert independent.probabilities == stats.decide(*pairs(30, 50, 800, 120), "bayes").probabilities
    assert plain.n_groups is None and plain.design_effect is None


def grouped_kinds(kinds: list[tuple[int, ...]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Correctness of A and B and the group of each image, from per-group image kinds (0: only B right, 1: only A
    right, 2: both right)."""
    kind = np.concatenate(kinds)
    return kind != 0, kind != 1, np.repeat(np.arange(len(kinds)), [len(k) for k in kinds])


@pytest.mark.parametrize(("kinds", "deff", "counts"), [
    ([(0, 0)] * 10 + [(0, 2)] * 10 + [(1, 2)] * 8 + [(2, 2)] * 272, 1.52, (5, 20, 395)),  # shrunk by 1.5
    ([(0, 1)] * 10 + [(0, 2)] * 12 + [(2, 2)] * 278, 0.36, (10, 22, 600)),  # below 1: never inflated
    ([(1, 2, 2, 2, 2)] + [(0,) * 5] * 6 + [(2,) * 5] * 193, 4.89, (0, 6, 205)),  # one A-only image: 0.2 -> 0
])  # fmt: skip
def test_bayes_effective_counts(kinds: list, deff: float, counts: tuple[int, int, int]) -> None:
    a, b, groups = grouped_kinds(kinds)
    d = stats.decide(a, b, "bayes", groups=groups)
    assert d.design_effect == pytest.approx(deff, abs=0.01)
    post = stats.posterior_probabilities(*counts, 0.0, credibility=0.9)
    assert d.probabilities == (post.prob_a_better, post.prob_rope, post.prob_b_better)


def test_bayes_threshold_is_simultaneous_over_the_family() -> None:
    a, b = pairs(40, 62, 800, 98)
    single, family = stats.decide(a, b, "bayes"), stats.decide(a, b, "bayes", comparisons=6)
    assert single.probabilities == family.probabilities and 0.95 < single.probabilities[2] < 1 - 0.05 / 6
    assert (single.verdict, family.verdict) == ("b_better", "undecided")
    assert family.confidence == pytest.approx(1 - 0.1 / 6)


def test_cluster_bootstrap_defaults_are_the_documented_ones() -> None:
    a, b = pairs(60, 100, 700, 140)
    groups = np.arange(1000) // 4
    assert stats.decide(a, b, groups=groups) == stats.decide(a, b, groups=groups, n_resamples=10_000, seed=0)
    labels = np.arange(1000) % 4
    pred_a, pred_b = np.where(a, labels, (labels + 1) % 4), np.where(b, labels, (labels + 1) % 4)
    default = stats.decide_metric(labels, pred_a, pred_b, "macro_f1", groups=groups)
    assert default == stats.decide_metric(labels, pred_a, pred_b, "macro_f1", groups=groups, comparisons=1,
                                          n_resamples=10_000, seed=0)  # fmt: skip
    assert (default.method, default.metric, default.confidence, default.n_groups) == ("cluster_bootstrap",
                                                                                    "macro_f1", 0.95, 250)
    with pytest.raises(ValueError, match=r"^metric must be one of 'accuracy', 'balanced_accuracy'"):
        stats.decide_metric(labels, pred_a, pred_b, "f1")


def test_decide_metric_follows_its_bootstrap_interval() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, 800)
    pred_a = np.where(rng.random(800) < 0.7, labels, (labels + 1) % 5)
    pred_b = np.where(rng.random(800) < 0.8, labels, (labels + 2) % 5)
    for rule, margin in [("superiority", 0.0), ("non_inferiority", 0.02), ("equivalence", 0.02)]:
        d = stats.decide_metric(labels, pred_a, pred_b, "macro_f1", rule, margin, n_resamples=2000, seed=4)
        ci = stats.paired_metric_ci(labels, pred_a, pred_b, "macro_f1", n_resamples=2000, seed=4,
                                    confidence=d.confidence)  # fmt: skip
        assert (d.estimate, d.low, d.high, d.method, d.pvalue) == (ci.estimate, ci.low, ci.high, "bootstrap", None)
        assert d.verdict == stats.rule_verdict(rule, d.low, d.high, margin)
    assert stats.decide_metric(labels, pred_a, pred_b, "balanced_accuracy", n_resamples=500).verdict == "b_better"
    with pytest.raises(ValueError, match=r"^rule='bayes' reads the accuracy difference only; got metric='macro_f1'$"):
        stats.decide_metric(labels, pred_a, pred_b, "macro_f1", "bayes")


def test_bayes_rule_reads_the_posterior_and_its_credible_interval() -> None:
    seen = set()
    for counts, margin in [((100, 190, 7500, 2210), 0.0), ((190, 100, 7500, 2210), 0.0),
                           ((105, 105, 7500, 2290), 0.005), ((8, 12, 150, 30), 0.005)]:  # fmt: skip
        d = stats.decide(*pairs(*counts), "bayes", margin)
        post = stats.posterior_probabilities(counts[0], counts[1], sum(counts), margin, credibility=0.9)
        assert d.probabilities == (post.prob_a_better, post.prob_rope, post.prob_b_better)
        assert (d.low, d.high, d.confidence, d.method) == (post.low, post.high, 0.9, "bayes")
        assert d.verdict == stats.bayes_verdict(post, 0.95)
        if d.verdict == "b_better":
            assert d.low >= margin  # P(diff > margin) >= 95%: the 90% interval's lower end is above the margin
        if d.verdict == "equivalent":
            assert -margin <= d.low and d.high <= margin
        seen.add(d.verdict)
    assert seen == set(stats.VERDICTS["bayes"])


def test_verdict_codes_are_the_documented_ones() -> None:
    for rule, codes in stats.VERDICTS.items():
        assert set(codes) <= stats.CLAIMS | {"no_significant_difference", "inconclusive", "non_inferiority_not_shown",
                                             "equivalence_not_shown", "undecided"}, rule  # fmt: skip
    result = stats.decide(*pairs(5, 5, 5, 5))
    assert {f.name for f in dataclasses.fields(result)} >= {"verdict", "low", "high", "pvalue"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rule": "better"}, "rule must be one of 'superiority', 'non_inferiority', 'equivalence', 'bayes'; got 'b"),
        ({"rule": "non_inferiority", "margin": -0.01}, r"^margin must lie in \[0, 1\).*got -0.01$"),
        ({"rule": "equivalence", "margin": 0.0}, r"^margin must lie in \(0, 1\).*got 0.0$"),
        ({"rule": "superiority", "margin": 0.01}, r"^margin must be 0 for rule='superiority' \(use "
                                                  r"'non_inferiority'\); got 0.01$"),
        ({"rule": "bayes", "margin": 1.0}, r"^margin must lie in \[0, 1\) for rule='bayes'; got 1.0$"),
        ({"rule": "equivalence", "margin": 1.0}, r"^margin must lie in \(0, 1\) for rule='equivalence'; got 1.0$"),
        ({"rule": "non_inferiority", "margin": 1.0}, r"^margin must lie in \[0, 1\) for rule='non_inferiority'"),
        ({"alpha": 0.5}, "alpha must lie strictly between 0 and 0.5; got 0.5"),
        ({"alpha": 0.0}, "alpha must lie strictly between 0 and 0.5; got 0.0"),
        ({"method": "fisher"}, "method must be one of 'exact', 'midp'"),
        ({"interval": "exact"}, "interval must be one of 'tango', 'bonett_price', 'wald'"),
        ({"comparisons": 0}, "comparisons must be at least 1"),
    ],
)
def test_decide_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        stats.decide(*pairs(5, 5, 5, 5), **kwargs)


# --------------------------------------------------------------------------- power


def test_mcnemar_power_is_the_planning_power() -> None:
    for n, p_disc, effect in [(300, 0.1, 0.04), (2000, 0.05, -0.012), (800, 0.2, 0.0)]:
        assert stats.mcnemar_power(n, p_disc, effect) == stats.achieved_power(n, p_disc, effect)


@pytest.mark.parametrize(("n", "p_discordant", "effect"), [(300, 0.1, 0.04), (2000, 0.05, -0.012)])
def test_mcnemar_power_matches_simulation(n: int, p_discordant: float, effect: float) -> None:
    rng = np.random.default_rng(n)
    p10, p01 = (p_discordant - effect) / 2, (p_discordant + effect) / 2
    counts = rng.multinomial(n, [p10, p01, 1 - p10 - p01], size=4000)
    b, c = counts[:, 0], counts[:, 1]
    pvalues = np.minimum(1.0, 2 * sps.binom.cdf(np.minimum(b, c), b + c, 0.5))
    assert abs(stats.mcnemar_power(n, p_discordant, effect) - np.mean(pvalues < 0.05)) <= 0.03


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
        (lambda: stats.mcnemar_power(100, 0.1, 0.2), r"\|effect\| must not exceed p_disc=0.1; got effect"),
        (lambda: stats.mcnemar_power(100, 0.0, 0.0), r"p_disc must lie in \(0, 1\]; got 0.0"),
        (lambda: stats.mcnemar_power(0, 0.1, 0.0), "n must be at least 1; got 0"),
        (lambda: stats.minimum_detectable_effect(100, 0.1, power=0.04), "^power must exceed alpha=0.05; got 0.04$"),
        (lambda: stats.minimum_detectable_effect(100, 0.1, power=0.05), "^power must exceed alpha=0.05; got 0.05$"),
        (lambda: stats.minimum_detectable_effect(100, 0.1, power=1.0), "^power must lie strictly between 0 and 1"),
        (lambda: stats.minimum_detectable_effect(100, 0.1, alpha=0.5), "alpha must lie strictly between 0 a"),
    ],
)
def test_power_rejects_bad_arguments(call: Callable[[], float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
