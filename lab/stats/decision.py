"""Decisions from a paired comparison: one coherent verdict code per rule, with the interval and p-value behind it.

Superiority needs the interval and the test to agree; non-inferiority and equivalence need the interval to clear the
margin; ``rule="bayes"`` reads the Dirichlet posterior. The minimum detectable effect of the exact McNemar test.
lab.report words the verdicts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize

from lab.stats._checks import check_choice, check_count, check_open_unit, paired_bool
from lab.stats.bayes import bayes_verdict, posterior_probabilities
from lab.stats.clustered import clustered_mcnemar
from lab.stats.mcnemar import MCNEMAR_METHODS, mcnemar
from lab.stats.metrics import METRICS, paired_metric_ci
from lab.stats.paired import INTERVAL_METHODS, paired_diff_ci
from lab.stats.planning import achieved_power

DECISION_RULES = ("superiority", "non_inferiority", "equivalence", "bayes")
VERDICTS = {
    "superiority": ("b_better", "a_better", "no_significant_difference", "inconclusive"),
    "non_inferiority": ("b_non_inferior", "non_inferiority_not_shown"),
    "equivalence": ("equivalent", "equivalence_not_shown"),
    "bayes": ("b_better", "a_better", "equivalent", "undecided"),
}
# Verdicts that claim something; the others say the data did not show it.
CLAIMS = frozenset({"b_better", "a_better", "b_non_inferior", "equivalent"})


@dataclass(frozen=True, slots=True)
class DecisionResult:
    verdict: str  # one of VERDICTS[rule]
    rule: str
    margin: float
    alpha: float
    estimate: float  # metric_b - metric_a
    low: float  # the interval the rule used (credible interval for "bayes")
    high: float
    confidence: float
    pvalue: float | None  # the p-value the rule used (superiority on accuracy), else None
    n: int
    metric: str = "accuracy"
    method: str = "tango"  # the interval: tango | bonett_price | wald | bootstrap | cluster_bootstrap | bayes
    comparisons: int = 1  # the Bonferroni family behind the level
    n_groups: int | None = None  # with groups: how many
    design_effect: float | None = None  # with groups: variance under clustering over that of independent images
    probabilities: tuple[float, float, float] | None = None  # "bayes": P(A better), P(within margin), P(B better)


def check_rule(rule: str, margin: float, alpha: float) -> tuple[float, float]:
    """Validated (margin, alpha) for a rule; ValueError naming the value otherwise."""
    check_choice("rule", rule, DECISION_RULES)
    alpha = check_open_unit("alpha", alpha, upper=0.5)
    margin = float(margin)
    if rule == "superiority" and margin != 0.0:
        raise ValueError(f"margin must be 0 for rule='superiority' (use 'non_inferiority'); got {margin!r}")
    if rule in ("non_inferiority", "bayes") and not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must lie in [0, 1) for rule={rule!r}; got {margin!r}")
    if rule == "equivalence" and not 0.0 < margin < 1.0:
        raise ValueError(f"margin must lie in (0, 1) for rule='equivalence'; got {margin!r}")
    return margin, alpha


def interval_confidence(rule: str, alpha: float, comparisons: int = 1) -> float:
    """Level of the interval a rule reads: ``1 - alpha / m`` for superiority, ``1 - 2 alpha / m`` otherwise.

    ``m`` (``comparisons``) is the Bonferroni family: with several arms every interval is simultaneous.
    One-sided tests at alpha (non-inferiority, each half of equivalence, each tail of "bayes") read a two-sided
    ``1 - 2 alpha`` interval.
    """
    comparisons = check_count("comparisons", comparisons, 1)
    return 1.0 - (1.0 if rule == "superiority" else 2.0) * alpha / comparisons


def rule_verdict(rule: str, low: float, high: float, margin: float = 0.0, alpha: float = 0.05,
                 pvalue: float | None = None) -> str:
    """The verdict code an interval (and, for superiority, a p-value) supports; the one rule every path uses.

    ``"superiority"``: ``"b_better"`` if ``low > 0`` and ``p < alpha``; ``"a_better"`` if ``high < 0`` and
    ``p < alpha``; ``"no_significant_difference"`` if the interval holds 0 and ``p >= alpha``; else
    ``"inconclusive"`` (the two disagree, so nothing is claimed). Without a p-value (bootstrap metrics) the
    interval alone decides. ``"non_inferiority"``: ``"b_non_inferior"`` if ``low > -margin``.
    ``"equivalence"``: ``"equivalent"`` if ``-margin < low`` and ``high < margin``.
    """
    if rule == "non_inferiority":
        return "b_non_inferior" if low > -margin else "non_inferiority_not_shown"
    if rule == "equivalence":
        return "equivalent" if -margin < low and high < margin else "equivalence_not_shown"
    check_choice("rule", rule, ("superiority",))
    rejects = (low > 0.0 or high < 0.0) if pvalue is None else pvalue < alpha
    if rejects and low > 0.0:
        return "b_better"
    if rejects and high < 0.0:
        return "a_better"
    return "no_significant_difference" if not rejects and low <= 0.0 <= high else "inconclusive"


def _bayes(a: np.ndarray, b: np.ndarray, margin: float, alpha: float, comparisons: int, groups: object | None,
           ) -> DecisionResult:
    """rule="bayes": the region holding 1 - alpha/m of the posterior; with groups, counts shrunk by the design
    effect (the effective number of independent images)."""
    only_a, only_b, n = int(np.count_nonzero(a & ~b)), int(np.count_nonzero(~a & b)), a.size
    n_groups = deff = None
    if groups is not None:
        clustered = clustered_mcnemar(a, b, groups)
        n_groups, deff = clustered.n_groups, clustered.design_effect
        if math.isfinite(deff) and deff > 1.0:
            only_a, only_b, n = (max(round(x / deff), 0) for x in (only_a, only_b, n))
            n = max(n, only_a + only_b, 1)
    credibility = interval_confidence("bayes", alpha, comparisons)
    post = posterior_probabilities(only_a, only_b, n, margin, credibility=credibility)
    verdict = bayes_verdict(post, threshold=1.0 - alpha / comparisons)
    return DecisionResult(
        verdict, "bayes", margin, alpha, float(b.mean()) - float(a.mean()), post.low, post.high, credibility, None,
        a.size, "accuracy", "bayes", comparisons, n_groups, deff,
        (post.prob_a_better, post.prob_rope, post.prob_b_better),
    )  # fmt: skip


def decide(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    rule: str = "superiority",
    margin: float = 0.0,
    alpha: float = 0.05,
    method: str = "exact",
    interval: str = "tango",
    groups: object | None = None,
    comparisons: int = 1,
    pvalue: float | None = None,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> DecisionResult:
    """Turn the paired accuracy comparison of A and B into a verdict code with the interval and p-value behind it.

    Parameters
    ----------
    correct_a, correct_b : numpy.ndarray of bool, shape (n,)
        Per-image correctness of A and B on the same images.
    rule : {"superiority", "non_inferiority", "equivalence", "bayes"}
        See :func:`rule_verdict`. The interval for ``acc_b - acc_a`` is Tango's score interval (``interval``),
        or with ``groups`` the cluster bootstrap, at :func:`interval_confidence`; superiority also needs McNemar
        (``method``; with groups the clustered McNemar of Durkalski et al.) to reject at ``alpha``.
        ``"bayes"``: ``"b_better"`` / ``"a_better"`` / ``"equivalent"`` when the posterior (Dirichlet, uniform
        prior) gives at least ``1 - alpha / comparisons`` to B ahead by more than ``margin`` / behind by more /
        within it, else ``"undecided"``; the interval is the equal-tailed credible interval.
    margin : float
        Margin as a fraction of accuracy (0.005 is half a point): 0 for superiority, in [0, 1) for
        non-inferiority and "bayes" (the region of practical equivalence), in (0, 1) for equivalence.
    alpha : float
        Significance level, in (0, 0.5).
    method : {"exact", "midp", "chi2", "chi2_corrected"}
        McNemar variant for superiority (ignored with groups).
    interval : {"tango", "bonett_price", "wald"}
        Closed-form interval without groups (:func:`lab.stats.paired.paired_diff_ci`).
    groups : array_like, shape (n,), optional
        Group label of each image: whole groups are resampled, and McNemar is clustered.
    comparisons : int
        Bonferroni family size m of an A/B/n comparison: the interval is read at level ``1 - alpha / m``.
    pvalue : float, optional
        The p-value superiority should use instead of McNemar's (say, Holm-adjusted over several arms).
    n_resamples, seed : int
        The cluster bootstrap (with groups only).

    Returns
    -------
    DecisionResult
        ``verdict``, ``rule``, ``margin``, ``alpha``, ``estimate`` (``acc_b - acc_a``), ``low`` and ``high``
        (the interval the rule used), ``confidence``, ``pvalue`` (the one the rule used, superiority only),
        ``n``, ``metric``, ``method`` (the interval's), ``comparisons``, ``n_groups``, ``design_effect`` and,
        for "bayes", ``probabilities``.

    Raises
    ------
    ValueError
        On an unknown rule or method, a margin the rule does not allow, alpha outside (0, 0.5), or bad inputs.

    References
    ----------
    Tango, T. (1998). Stat. Med. 17(8), 891-908. Fagerland, M. W., Lydersen, S., Laake, P. (2014). Stat. Med.
    33(16), 2850-2875. Schuirmann, D. J. (1987). J. Pharmacokinet. Biopharm. 15(6), 657-680. Durkalski, V. L.
    et al. (2003). Stat. Med. 22(15), 2417-2428.
    """
    margin, alpha = check_rule(rule, margin, alpha)
    check_choice("method", method, MCNEMAR_METHODS)
    check_choice("interval", interval, INTERVAL_METHODS)
    a, b = paired_bool(correct_a, correct_b)
    if rule == "bayes":
        return _bayes(a, b, margin, alpha, comparisons, groups)
    confidence = interval_confidence(rule, alpha, comparisons)
    if groups is None:
        only_a, only_b = int(np.count_nonzero(a & ~b)), int(np.count_nonzero(~a & b))
        ci = paired_diff_ci(only_a, only_b, a.size, confidence, interval)
        estimate, low, high, used, n_groups, deff = ci.estimate, ci.low, ci.high, interval, None, None
        if rule == "superiority" and pvalue is None:
            pvalue = mcnemar(a, b, method).pvalue
    else:
        ones = np.ones(a.size, dtype=np.int64)
        boot = paired_metric_ci(ones, a.astype(np.int64), b.astype(np.int64), "accuracy", 2, n_resamples, seed,
                                groups, confidence)  # fmt: skip
        estimate, low, high, used = boot.estimate, boot.low, boot.high, "cluster_bootstrap"
        n_groups, deff = boot.n_groups, boot.design_effect
        if rule == "superiority" and pvalue is None:
            pvalue = clustered_mcnemar(a, b, groups).pvalue
    verdict = rule_verdict(rule, low, high, margin, alpha, pvalue if rule == "superiority" else None)
    return DecisionResult(
        verdict, rule, margin, alpha, estimate, low, high, confidence, pvalue if rule == "superiority" else None,
        a.size, "accuracy", used, comparisons, n_groups, deff,
    )  # fmt: skip


def decide_metric(
    labels: np.ndarray | None,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    metric: str,
    rule: str = "superiority",
    margin: float = 0.0,
    alpha: float = 0.05,
    n_classes: int | None = None,
    groups: object | None = None,
    comparisons: int = 1,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> DecisionResult:
    """The verdict on a metric with no closed-form interval, from its paired (or cluster) bootstrap interval.

    The same rules as :func:`decide` (superiority: the interval alone, there is no test; ``"bayes"`` is for
    accuracy only). ``metric`` and the arrays are as in :func:`lab.stats.metrics.paired_metric_ci`: class
    predictions, or for ``"top5_accuracy"`` boolean "label in the top 5" arrays.

    Raises
    ------
    ValueError
        On ``rule="bayes"``, an unknown metric, or anything :func:`decide` or ``paired_metric_ci`` refuses.
    """
    margin, alpha = check_rule(rule, margin, alpha)
    check_choice("metric", metric, METRICS)
    if rule == "bayes":
        raise ValueError(f"rule='bayes' reads the accuracy difference only; got metric={metric!r}")
    confidence = interval_confidence(rule, alpha, comparisons)
    boot = paired_metric_ci(labels, pred_a, pred_b, metric, n_classes, n_resamples, seed, groups, confidence)
    grouped = groups is not None
    return DecisionResult(
        rule_verdict(rule, boot.low, boot.high, margin, alpha), rule, margin, alpha, boot.estimate, boot.low,
        boot.high, confidence, None, boot.n, metric, "cluster_bootstrap" if grouped else "bootstrap", comparisons,
        boot.n_groups if grouped else None, boot.design_effect if grouped else None,
    )  # fmt: skip


def mcnemar_power(n: int, p_discordant: float, effect: float, alpha: float = 0.05) -> float:
    """Exact power of the two-sided exact McNemar test: :func:`lab.stats.planning.achieved_power`.

    Parameters
    ----------
    n : int
        Number of paired test images.
    p_discordant : float
        Probability that A and B disagree on correctness, in (0, 1].
    effect : float
        Accuracy difference ``acc_b - acc_a``; ``|effect| <= p_discordant``.
    alpha : float
        Significance level, in (0, 0.5).

    References
    ----------
    Connor, R. J. (1987). Biometrics 43, 207-211. Fagerland, M. W., Lydersen, S., Laake, P. (2013). BMC Med.
    Res. Methodol. 13, 91.
    """
    return achieved_power(n, p_discordant, effect, alpha)


def minimum_detectable_effect(n: int, p_discordant: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest accuracy difference ``|acc_b - acc_a|`` the exact McNemar test detects with ``power``.

    Solves ``mcnemar_power(n, p_discordant, effect, alpha) == power`` for effect in ``(0, p_discordant]``
    with Brent's method.

    Parameters
    ----------
    n : int
        Number of paired test images.
    p_discordant : float
        Expected fraction of images on which A and B disagree on correctness, in (0, 1].
    alpha : float
        Significance level, in (0, 0.5).
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
    mcnemar_power(n, p_discordant, 0.0, alpha)  # checks the arguments
    power = check_open_unit("power", power)
    if power <= alpha:
        raise ValueError(f"power must exceed alpha={alpha}; got {power!r}")

    def shortfall(effect: float) -> float:
        return mcnemar_power(n, p_discordant, effect, alpha) - power

    if shortfall(p_discordant) < 0:
        return math.nan
    return float(optimize.brentq(shortfall, 0.0, p_discordant, xtol=1e-12, rtol=1e-12))
