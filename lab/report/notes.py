"""The report's explanatory lines: the decision rule in plain words, the notes at the top, what the test set could
detect (MDE, achieved power), the design effect of grouped images, the Bayesian reading, and latency.
"""

from __future__ import annotations

import math
from typing import Any

from lab.report.words import (
    INTERVAL_NAMES,
    bayes_probabilities,
    finite,
    fixed,
    format_p,
    level,
    metric_name,
    pct,
    probability,
    pts,
)


def rule_line(summary: dict[str, Any]) -> str:
    """How the verdict was reached, for the reader who wants to check it."""
    pair, alpha = summary["pairs"][0], summary["alpha"]
    m, rule, margin = pair.get("comparisons", 1), summary["rule"], 100 * summary["margin"]
    interval = f"the {level(pair['decision_confidence'])} {INTERVAL_NAMES.get(pair.get('decision_method'), '')} " \
               f"interval for {metric_name(summary)}(B) - {metric_name(summary)}(A)"
    family = ""
    if m > 1:
        holm = ", every McNemar p-value Holm-adjusted" if pair.get("decision_pvalue") is not None else ""
        family = f" With {len(summary['arms'])} arms the {m} decisions are made at once: every interval is at the " \
                 f"Bonferroni level 1 - alpha/{m}{holm}."
    if summary.get("groups"):
        family += " Whole groups of images are resampled (cluster bootstrap), and McNemar is clustered (Durkalski)."
    if rule == "superiority":
        test = ""
        if pair.get("decision_pvalue") is not None:
            name = "the clustered McNemar test" if summary.get("groups") else \
                f"McNemar's {summary['mcnemar_method'].replace('_', ' ')} test"
            test = f" and {name} rejects at alpha = {alpha:g}"
        both = "; when the two disagree there is no verdict (inconclusive)" if test else ""
        return f"Decision rule: B is better than A only when {interval} lies above 0{test} (A better: below 0)" \
               f"{both}.{family}"
    if rule == "non_inferiority":
        return f"Decision rule: B is non-inferior only when {interval} lies above -{margin:g} points (a one-sided " \
               f"test at alpha = {alpha:g}); agreement on every image is evidence only in proportion to n.{family}"
    if rule == "equivalence":
        return f"Decision rule: A and B are equivalent only when {interval} lies within ±{margin:g} points (two " \
               f"one-sided tests at alpha = {alpha:g}).{family}"
    need = probability(1 - alpha / m)
    return f"Decision rule (bayes): a verdict when one region holds at least {need} of the posterior of " \
           f"accuracy(B) - accuracy(A) (Dirichlet over the agreement cells, uniform prior): B better by more than " \
           f"{margin:g} points, within ±{margin:g} (equivalent), or A better by more.{family}"


def power_lines(summary: dict[str, Any]) -> list[str]:
    """What this test set could have detected (the minimum detectable effect), and the power it achieved; where a
    margin rule showed nothing, the smallest margin this data could have supported."""
    lines, alpha = [], summary["alpha"]
    for p in summary["pairs"]:
        head = f"{p['b']} vs {p['a']}"
        if finite(p["mde"]):
            effective = f" (effectively {p['n_effective']:,} independent images)" if p.get("n_effective", summary[
                "n"]) != summary["n"] else ""
            lines.append(
                f"{head}: with {summary['n']:,} test images{effective} and {100 * p['p_discordant']:.1f}% "
                f"discordant pairs, a true accuracy difference of {100 * p['mde']:.2f} points would be detected "
                f"with 80% power at alpha = {alpha:g} (McNemar exact); smaller differences may go unseen. Achieved "
                f"power at the observed difference of {pts(p['acc_diff'])} points: {100 * p['achieved_power']:.0f}%."
            )
        elif p["mcnemar_b"] + p["mcnemar_c"] > 0:
            lines.append(f"{head}: with {summary['n']:,} test images and {100 * p['p_discordant']:.1f}% discordant "
                         "pairs, no accuracy difference would be detected with 80% power, however large: the test "
                         "set is too small.")
        else:
            lines.append(f"{head}: the arms agree on every one of the {summary['n']:,} test images, so the data can "
                         "bound the difference only by the test set's size.")
        if p["verdict"] in ("non_inferiority_not_shown", "equivalence_not_shown"):
            lines.append(f"{head}: not shown at {100 * summary['margin']:g} points; this data supports the claim "
                         f"only at a margin wider than {fixed(100 * p['smallest_margin'])} points. A larger test set "
                         "narrows the interval (`python -m lab plan` sizes it).")
    return lines


def group_lines(summary: dict[str, Any]) -> list[str]:
    """The design effect: how much grouping widened the intervals."""
    groups = summary.get("groups")
    if not groups:
        return []
    lines = []
    for p in summary["pairs"]:
        deff = p.get("design_effect")
        widen = f"intervals {math.sqrt(deff):.2f} times as wide as for independent images" if finite(deff) \
            and deff > 0 else "no discordance to measure it on"
        clustered = f", clustered McNemar {format_p(p['clustered_pvalue'], summary['alpha'])}" \
            if p.get("clustered_pvalue") is not None else ""
        lines.append(f"{p['b']} vs {p['a']}: the {summary['n']:,} test images come in {groups['n_groups']:,} groups "
                     f"({groups['source']}); design effect {fixed(deff)}: {widen}{clustered}.")
    return lines


def bayes_lines(summary: dict[str, Any]) -> list[str]:
    """The Bayesian reading beside the verdict (it decides only with rule=bayes)."""
    used = "it decides the verdict (rule=bayes)" if summary["rule"] == "bayes" else "shown, not used for the verdict"
    shrunk = ", counts shrunk by the design effect" if summary.get("groups") else ""
    return [
        f"Bayesian reading of {p['b']} vs {p['a']} (accuracy; Dirichlet posterior, uniform prior{shrunk}): "
        f"{bayes_probabilities(summary, p)}; {used}."
        for p in summary["pairs"]
    ]


def aa_line(summary: dict[str, Any]) -> str | None:
    """An A/A test (every arm the same model): what a clean result looks like, and the noise it measured. With
    more than two arms each arm is read against the baseline, split by whether it shares the baseline's seed."""
    arms = summary["arms"]
    if len(arms) < 2 or len({a["spec"] for a in arms}) != 1:
        return None
    n = summary["n"]
    seeds = [a.get("seed", "") for a in arms]

    def measured(pair: dict[str, Any]) -> str:
        flips = int(pair["mcnemar_b"]) + int(pair["mcnemar_c"])
        return f"{flips} of {n} test images ({pct(flips / n if n else float('nan'))}) changed correctness"

    same = ("with deterministic=true on one device a clean pipeline gives 0; otherwise they are kernel "
            "nondeterminism")
    if len(arms) == 2 and len(set(seeds)) > 1:
        why = (f"trained with seeds {' and '.join(seeds)}: here {measured(summary['pairs'][0])}, the seed-to-seed "
               "noise floor of this recipe")
    elif len(arms) == 2 or len(set(seeds)) == 1:
        worst = max(summary["pairs"], key=lambda p: int(p["mcnemar_b"]) + int(p["mcnemar_c"]))
        why = f"with one seed: here {measured(worst)} ({same})"
    else:
        parts = [f"{p['b']} (seed {arms[j + 1].get('seed', '')}) against {p['a']} (seed {seeds[0]}): "
                 f"{measured(p)}" for j, p in enumerate(summary["pairs"])]
        why = (f"with seeds {', '.join(seeds)}: {'; '.join(parts)}. Arms with the baseline's seed show the pipeline's "
               f"own noise ({same}); arms with another seed show the seed-to-seed noise floor of this recipe")
    return (f"A/A test: every arm is {arms[0]['spec']}, {why}. A clean result is no significant difference (a false "
            f"alarm in at most alpha = {summary['alpha']:g} of A/A tests) with an interval around 0; latency "
            "differences between the arms are the measurement's own noise floor.")


def notes(summary: dict[str, Any]) -> list[str]:
    """The notes at the top of the report: an A/A test, preprocessing, precision, reuse, batch sizes, placement
    and latency."""
    out = [line] if (line := aa_line(summary)) else []
    if summary["preprocess_differs"]:
        pre = "; ".join(f"{a['name']}: {a['preprocess']}" for a in summary["arms"])
        out.append(f"The arms' preprocessing differs (each model's native pipeline): {pre}.")
    else:
        out.append(f"Every arm used the same preprocessing ({summary['arms'][0]['preprocess']}).")
    if summary["precision_differs"]:
        out.append("The arms ran at different numeric precisions.")
    for a in summary["arms"]:
        if a.get("reused_from"):
            out.append(f"Arm {a['name']} reused the predictions of run {a['reused_from']}.")
        if a.get("pickle_loaded"):
            out.append(f"Arm {a['name']} was loaded from a pickled MLflow model (allow_pickle_models=true): loading "
                       "it ran code stored with that model.")
    batch = {a["batch_size"] for a in summary["arms"]}
    if len(batch) > 1:
        out.append(
            f"The arms ended with different batch sizes ({', '.join(sorted(batch))}) after out-of-memory "
            "retries: latencies are per batch of different sizes."
        )
    lat = summary["latency"]
    out.append(f"Placement: {lat['placement'] or 'n/a'}. Latency: {lat['note']}.")
    return out


def latency_lines(summary: dict[str, Any]) -> list[str]:
    """p50/p99 batch latency with bootstrap intervals over batches, and the paired differences where comparable."""
    lat, lines = summary["latency"], []
    conf = level(1 - summary["alpha"])
    parts = [f"{name} {q} {fixed(est)} ms ({fixed(lo)} to {fixed(hi)})"
             for name, qs in lat.get("quantiles", {}).items() for q, (est, lo, hi) in qs.items()]
    if parts:
        lines.append(f"Batch latency ({conf} bootstrap CI over batches, warm-up excluded): {'; '.join(parts)}.")
    paired = lat.get("paired")
    if paired:
        a, b = summary["arms"][0]["name"], summary["arms"][1]["name"]
        diffs = ""
        for q in ("p50", "p99"):
            if f"{q}_diff_ms" in paired:
                est, low, high = (fixed(x, sign=True) for x in paired[f"{q}_diff_ms"])
                diffs += f", {q} {est} ms ({low} to {high})"
        lines.append(
            f"Paired batch latency {b} - {a}: mean {fixed(paired['estimate_ms'], sign=True)} ms "
            f"({level(paired['confidence'])} CI {fixed(paired['low_ms'], sign=True)} to "
            f"{fixed(paired['high_ms'], sign=True)}){diffs}, over {paired['n_batches']} batches measured by both arms."
        )
    return lines


def plan_lines(plan: Any, source: str = "given") -> list[str]:
    """`python -m lab plan`: the test-set size at each power (a lab.stats.PlanResult), in words."""
    gain = f"{100 * plan.mde:g} point{'' if 100 * plan.mde == 1 else 's'}"
    where = "" if source == "given" else f" ({source})"
    head = (f"Paired exact McNemar test, two-sided alpha = {plan.alpha:g}: baseline accuracy {100 * plan.acc:.2f}%, "
            f"A and B differ on {100 * plan.disagreement:.2f}% of test images{where}; to detect a gain of {gain}:")
    return [head] + [
        f"  {100 * power:g}% power: {n:,} test images (exact power there {100 * achieved:.1f}%; Connor's normal "
        f"approximation {connor:,})"
        for power, n, achieved, connor in zip(plan.powers, plan.n, plan.achieved, plan.n_connor, strict=True)
    ]
