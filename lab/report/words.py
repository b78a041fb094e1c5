"""The words of a comparison: numbers formatted so they never mislead, the verdict sentences, the decision rule,
and the lines on power, groups, the Bayesian reading and latency. ``describe`` puts the sentences into a summary.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

METRIC_NAMES = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro-F1",
    "top5_accuracy": "top-5 accuracy",
}
INTERVAL_NAMES = {
    "tango": "Tango score",
    "bonett_price": "Bonett-Price",
    "wald": "Wald",
    "bootstrap": "paired bootstrap",
    "cluster_bootstrap": "cluster bootstrap",
    "bayes": "credible",
}
NEUTRAL = ("no_", "non_inferiority_not", "equivalence_not", "inconclusive", "undecided")

# ------------------------------------------------------------------------------------------------ numbers


def finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(x)


def fixed(x: Any, digits: int = 2, sign: bool = False) -> str:
    """x with `digits` decimals, "n/a" when missing; never "-0.00" (a rounded zero has no sign)."""
    if not finite(x):
        return "n/a"
    return f"{round(float(x), digits) + 0.0:{'+' if sign else ''}.{digits}f}"


def pct(x: Any) -> str:
    return "n/a" if not finite(x) else fixed(100 * x) + "%"


def pts(x: Any) -> str:
    return "n/a" if not finite(x) else fixed(100 * x, sign=True)


def level(confidence: float) -> str:
    """A confidence level with the digits it needs: 0.95 -> "95%", 0.995 -> "99.5%", 1 - 0.05/3 -> "98.33%"."""
    for digits in range(2, 8):
        text = f"{round(100 * confidence, digits):g}"
        if float(text) < 100:
            return f"{text}%"
    return f"{100 * confidence}%"


def pvalue_text(p: float | None, alpha: float | None = None) -> str:
    """A p-value without "p": "< 0.001", or two significant digits, more where two would land on the other side
    of alpha (0.0498 at alpha = 0.05 is "0.0498", never "0.05"); fixed-point, never "8.4e-46"."""
    if not finite(p):
        return "n/a"
    floor = 0.001 if alpha is None or alpha > 0.001 else alpha / 10
    if p < floor:
        return f"< {np.format_float_positional(floor, trim='-')}"
    for digits in range(2, 17):
        text = np.format_float_positional(p, precision=digits, unique=False, fractional=False, trim="-")
        if alpha is None or (float(text) < alpha) == (p < alpha):
            return text
    return repr(p)  # pragma: no cover - 17 digits always land on the right side


def format_p(pvalue: float, alpha: float | None = None) -> str:
    """A p-value inside a sentence: "p < 0.001" or "p = 0.042" (see :func:`pvalue_text`)."""
    text = pvalue_text(pvalue, alpha)
    return f"p {text}" if text.startswith("<") else f"p = {text}"


def probability(x: float) -> str:
    """A posterior probability as a percentage: "97.3%", with "> 99.9%" / "< 0.1%" at the ends."""
    if x > 0.999:
        return "> 99.9%"
    return "< 0.1%" if 0 < x < 0.001 else f"{100 * x:.1f}%"


# ---------------------------------------------------------------------------------------------- sentences


def arm_label(summary: dict[str, Any], name: str) -> str:
    """How a sentence names an arm: "spec (name)" where the model spec says more than the name."""
    arm = next(a for a in summary["arms"] if a["name"] == name)
    return f"{arm['spec']} ({name})" if arm["spec"] and arm["spec"] != name else name


def metric_name(summary: dict[str, Any]) -> str:
    return METRIC_NAMES[summary.get("metric", "accuracy")]


def interval_name(pair: dict[str, Any]) -> str:
    """ "95% Tango score CI", "98.33% cluster bootstrap CI", "90% credible interval"."""
    method = pair.get("decision_method", "tango")
    kind = "interval" if method == "bayes" else "CI"
    return f"{level(pair['decision_confidence'])} {INTERVAL_NAMES.get(method, method)} {kind}"


def test_text(summary: dict[str, Any], pair: dict[str, Any]) -> str:
    """The test behind a superiority verdict on accuracy, with the p-value the rule used; "" when none."""
    if pair.get("decision_pvalue") is None:
        return ""
    test = "clustered McNemar" if summary.get("groups") else f"McNemar {pair['mcnemar_method'].replace('_', ' ')}"
    adjusted = "Holm-adjusted " if pair.get("comparisons", 1) > 1 else ""
    return f"{adjusted}{test} {format_p(pair['decision_pvalue'], summary['alpha'])}, "


def images_text(summary: dict[str, Any]) -> str:
    groups = summary.get("groups")
    return f"{summary['n']:,} test images" + (f" in {groups['n_groups']:,} groups" if groups else "")


def verdict_sentence(summary: dict[str, Any], pair: dict[str, Any]) -> str:
    """One sentence for one pair's decision (verdict code, the interval the rule used, its p-value)."""
    a_, b_ = arm_label(summary, pair["a"]), arm_label(summary, pair["b"])
    estimate, low, high = pair.get("metric_diff", pair["acc_diff"]), pair["decision_low"], pair["decision_high"]
    digits = 1 if high - low >= 0.005 else 2  # two decimals once the interval is narrower than half a point

    def points(fraction: float) -> str:
        return fixed(100 * fraction, digits)

    name = interval_name(pair)
    metric = summary.get("metric", "accuracy")
    in_metric = "" if metric == "accuracy" else f" in {metric_name(summary)}"
    tail = test_text(summary, pair) + images_text(summary)
    interval = f"{b_} - {a_} = {points(estimate)} points ({name} {points(low)} to {points(high)})"
    margin, verdict, rule = summary["margin"], pair["verdict"], summary["rule"]
    if rule == "bayes":
        return bayes_sentence(summary, pair, interval, a_, b_)
    if verdict == "b_better":
        return f"{b_} is better than {a_}{in_metric} by {points(estimate)} points ({name} {points(low)} to " \
               f"{points(high)}), {tail}."
    if verdict == "a_better":
        return f"{a_} is better than {b_}{in_metric} by {points(-estimate)} points ({name} {points(-high)} to " \
               f"{points(-low)}), {tail}."
    if verdict == "no_significant_difference":
        return f"No significant difference between {a_} and {b_}{in_metric}: {interval}, {tail}."
    if verdict == "inconclusive":
        return f"No verdict between {a_} and {b_}{in_metric}: {interval}, {tail}; the interval and the test " \
               f"disagree, and a verdict needs both."
    if rule == "non_inferiority":
        at = f"at a margin of {100 * margin:g} points"
        if verdict == "b_non_inferior":
            return f"{b_} is non-inferior to {a_}{in_metric} {at}: {interval}, {tail}."
        return f"Non-inferiority of {b_}{in_metric} {at} not shown: {interval}, {tail}."
    within = f"within ±{100 * margin:g} points"
    if verdict == "equivalent":
        return f"{a_} and {b_} are equivalent{in_metric} {within}: {interval}, {tail}."
    return f"Equivalence{in_metric} {within} not shown: {interval}, {tail}."


def bayes_sentence(summary: dict[str, Any], pair: dict[str, Any], interval: str, a_: str, b_: str) -> str:
    """rule=bayes: the region holding enough posterior mass, or none."""
    post, margin = pair["bayes"], summary["margin"]
    by = f"by more than {100 * margin:g} points" if margin else ""
    need = probability(1 - summary["alpha"] / pair.get("comparisons", 1))
    tail = images_text(summary)
    if pair["verdict"] == "b_better":
        return f"{b_} is better than {a_} {by} with posterior probability {probability(post['prob_b_better'])}: " \
               f"{interval}, {tail}.".replace("  ", " ")
    if pair["verdict"] == "a_better":
        return f"{a_} is better than {b_} {by} with posterior probability {probability(post['prob_a_better'])}: " \
               f"{interval}, {tail}.".replace("  ", " ")
    if pair["verdict"] == "equivalent":
        return f"{a_} and {b_} are practically equivalent (within ±{100 * margin:g} points) with posterior " \
               f"probability {probability(post['prob_within'])}: {interval}, {tail}."
    return f"No verdict between {a_} and {b_}: no region holds {need} of the posterior " \
           f"({bayes_probabilities(summary, pair)}); {interval}, {tail}."


def chance(event: str, x: float) -> str:
    """ "P(event) = 97.3%", or "P(event) > 99.9%" at the ends."""
    text = probability(x)
    return f"P({event}) {text}" if text[0] in "<>" else f"P({event}) = {text}"


def bayes_probabilities(summary: dict[str, Any], pair: dict[str, Any]) -> str:
    post, m = pair["bayes"], 100 * pair["bayes"]["margin"]
    if not m:
        return f"{chance(pair['b'] + ' better', post['prob_b_better'])}, " \
               f"{chance(pair['a'] + ' better', post['prob_a_better'])}"
    a, b = pair["a"], pair["b"]
    return ", ".join([chance(f"{b} better by more than {m:g} points", post["prob_b_better"]),
                      chance(f"within ±{m:g}", post["prob_within"]),
                      chance(f"{a} better by more than {m:g}", post["prob_a_better"])])


def overall_sentence(summary: dict[str, Any]) -> str:
    """The headline: two arms, the pair's sentence; more, what the simultaneous pair verdicts add up to."""
    pairs, arms, verdict = summary["pairs"], summary["arms"], summary["verdict"]
    if len(arms) == 2:
        return verdict_sentence(summary, pairs[0])
    metric, n = summary.get("metric", "accuracy"), images_text(summary)
    best = max(arms, key=lambda r: r["metrics"][metric] if "metrics" in r else r["accuracy"])
    value = best["metrics"][metric] if "metrics" in best else best["accuracy"]
    q = summary.get("cochran")
    cochran = f"; Cochran's Q (accuracy) {format_p(q['pvalue'], summary['alpha'])}" if q else ""
    how = f"simultaneous {level(pairs[0]['decision_confidence'])} intervals" + (
        ", Holm-adjusted McNemar" if pairs[0].get("decision_pvalue") is not None else "")
    if summary["rule"] in ("non_inferiority", "equivalence"):
        return margin_overall(summary, how, n)
    if verdict == f"{best['name']}_best":
        return f"{best['name']} is the best arm on {metric_name(summary)} ({pct(value)}), better than every other " \
               f"({how}){cochran}, {n}."
    if verdict == "differences_found":
        wins = [f"{p['b'] if p['verdict'] == 'b_better' else p['a']} beats "
                f"{p['a'] if p['verdict'] == 'b_better' else p['b']}"
                for p in summary["pairwise"] if p.get("verdict") in ("a_better", "b_better")]
        return f"The arms differ on {metric_name(summary)} ({'; '.join(wins)}) but no single arm beats all others " \
               f"({how}); {best['name']} has the highest value ({pct(value)}){cochran}."
    if verdict in ("no_significant_difference", "undecided", "all_equivalent"):
        said = {"no_significant_difference": "No significant difference", "undecided": "No verdict",
                "all_equivalent": "Practical equivalence of all pairs"}[verdict]
        return f"{said} among the {len(arms)} arms on {metric_name(summary)} ({how}){cochran}, {n}."
    raise ValueError(f"unknown overall verdict {verdict!r}")  # pragma: no cover - lab.compare makes the codes


def margin_overall(summary: dict[str, Any], how: str, n: str) -> str:
    """A/B/n under non-inferiority or equivalence: which arms were shown so against the baseline."""
    pairs, verdict, base = summary["pairs"], summary["verdict"], summary["arms"][0]["name"]
    word = "non-inferior to" if summary["rule"] == "non_inferiority" else "equivalent to"
    shown = [p["b"] for p in pairs if p["verdict"] in ("b_non_inferior", "equivalent")]
    at = f"at a margin of {100 * summary['margin']:g} points ({how}), {n}"
    if verdict.startswith("all_"):
        return f"Every arm is {word} {base} on {metric_name(summary)} {at}."
    if verdict.startswith("some_"):
        rest = [p["b"] for p in pairs if p["b"] not in shown]
        return f"{', '.join(shown)} {'is' if len(shown) == 1 else 'are'} {word} {base} on {metric_name(summary)} " \
               f"{at}; not shown for {', '.join(rest)}."
    return f"No arm is shown {word} {base} on {metric_name(summary)} {at}."


def set_after(row: dict[str, Any], after: str, key: str, value: Any) -> None:
    """row[key] = value, placed right after `after` so summary.json keeps its key order."""
    items = [(k, v) for k, v in row.items() if k != key]
    row.clear()
    for k, v in items:
        row[k] = v
        if k == after:
            row[key] = value
    row.setdefault(key, value)


def describe(summary: dict[str, Any]) -> dict[str, Any]:
    """Add the English to an analysed summary, in place: each pair's "sentence" and the overall "sentence".

    The numbers and verdict codes come from lab.compare.analyse; this only words them. Returns the summary.
    """
    for pair in summary["pairs"]:
        set_after(pair, "verdict", "sentence", verdict_sentence(summary, pair))
    set_after(summary, "verdict", "sentence", overall_sentence(summary))
    return summary
