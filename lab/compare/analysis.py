"""The numbers of a comparison: every decision of the run (simultaneous over its family), each arm's row, each
pair's row, the overall verdict code, and the parent run's metrics. Numbers and codes only: lab.report words them.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from typing import Any

import numpy as np

from lab import stats
from lab.compare.arms import Aligned, Arm, aligned
from lab.compare.classes import (
    FLIP_IDS_KEPT,
    Summary,
    class_table,
    classes_that_matter,
    confusion_cells,
    confusion_shown,
    confusion_table,
    flip_table,
    per_class_accuracy,
)
from lab.compare.latency import latency_comparison
from lab.config import Config

# Child metrics copied into each arm's row of the summary, where the arm logged them.
TELEMETRY_KEYS = tuple(
    """
    latency_ms_p50 latency_ms_p90 latency_ms_p99 latency_ms_mean throughput_img_per_s
    gpu_mem_peak_mb gpu_mem_reserved_peak_mb cpu_rss_peak_mb gpu_util_pct_mean gpu_power_w_mean
    gpu_temp_c_max gpu_sm_clock_mhz_mean energy_j_per_img
    """.split()
)
CALIBRATION_KEYS = ("mean_confidence", "accuracy", "count", "bin_lower", "bin_upper")


def _decide_pair(cfg: Config, data: Aligned, i: int, j: int, comparisons: int,
                 pvalue: float | None) -> stats.DecisionResult:
    metric = cfg.metric
    common = {"rule": cfg.rule, "margin": cfg.margin, "alpha": cfg.alpha, "groups": data.groups,
              "comparisons": comparisons, "n_resamples": cfg.n_resamples, "seed": cfg.seed}
    if metric == "accuracy":
        return stats.decide(data.correct[:, i], data.correct[:, j], method=cfg.mcnemar_method, pvalue=pvalue, **common)
    if metric == "top5_accuracy":
        return stats.decide_metric(None, data.top5[:, i], data.top5[:, j], metric, **common)
    return stats.decide_metric(data.labels, data.preds[:, i], data.preds[:, j], metric,
                               n_classes=data.num_classes, **common)  # fmt: skip


def family_pvalues(cfg: Config, data: Aligned, family: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Raw and Holm-adjusted p-values of the pairs: McNemar (`mcnemar_method`), or clustered McNemar with groups."""
    c = data.correct
    if data.groups is None:
        raw = [stats.mcnemar(c[:, i], c[:, j], cfg.mcnemar_method).pvalue for i, j in family]
    else:
        raw = [stats.clustered_mcnemar(c[:, i], c[:, j], data.groups).pvalue for i, j in family]
    return np.asarray(raw), stats.adjust_pvalues(raw, "holm")


def decide_family(cfg: Config, data: Aligned) -> dict[tuple[int, int], stats.DecisionResult]:
    """Every decision of the run, simultaneous over its family, by pair (i, j) of arm indices.

    Superiority and "bayes" decide every pair (the overall verdict names a best arm); the margin rules decide
    each arm against the baseline. With m decisions each interval is read at a Bonferroni level (alpha / m);
    superiority on accuracy also needs the pair's Holm-adjusted p-value below alpha. Two arms: m = 1.
    """
    k = data.correct.shape[1]
    every = cfg.rule in ("superiority", "bayes")
    family = list(itertools.combinations(range(k), 2)) if every else [(0, j) for j in range(1, k)]
    holm: dict[tuple[int, int], float] = {}
    if cfg.rule == "superiority" and cfg.metric == "accuracy":
        holm = dict(zip(family, family_pvalues(cfg, data, family)[1].tolist(), strict=True))
    return {pair: _decide_pair(cfg, data, *pair, len(family), holm.get(pair)) for pair in family}


def analyse(
    cfg: Config, arms: list[Arm], class_names: tuple[str, ...] | None = None, groups: Mapping[int, Any] | None = None
) -> Summary:
    """Every number the report shows, as one JSON-able summary of numbers and verdict codes.

    `groups` maps sample_id to its group (lab.data.test_groups) when the config names groups. lab.report.describe
    adds the sentences; lab.report.render lays the summary out. Per-class rows, bars and confusion matrices cover
    "classes_shown" (every class up to 50, else the classes that matter); `Summary.tables` holds all of them.
    """
    data = aligned(cfg, arms, groups)
    n, k = data.correct.shape
    names = [a.name for a in arms]
    class_names = class_names or tuple(str(c) for c in range(data.num_classes))
    decisions = decide_family(cfg, data)
    arm_rows = [arm_summary(arm, data, j, cfg.alpha) for j, arm in enumerate(arms)]
    pairs = [pair_summary(cfg, data, (names[0], names[j]), j, decisions[0, j], class_names) for j in range(1, k)]
    tables, shown = per_class_views(data, class_names, arm_rows, pairs)
    summary = Summary({
        "dataset": arms[0].tags.get("ab.dataset", ""),
        "fingerprint": arms[0].tags.get("ab.dataset_fingerprint"),
        "n": n,
        "num_classes": data.num_classes,
        "class_names": list(class_names),
        "classes_shown": shown.tolist(),
        "rule": cfg.rule,
        "margin": cfg.margin,
        "alpha": cfg.alpha,
        "metric": cfg.metric,
        "mcnemar_method": cfg.mcnemar_method,
        "n_resamples": cfg.n_resamples,
        "comparisons": decisions[0, 1].comparisons,
        "groups": None if data.groups is None else {"source": _group_source(cfg),
                                                    "n_groups": int(np.unique(data.groups).size)},
        "arms": arm_rows,
        "pairs": pairs,
        "preprocess_differs": len({r["preprocess"] for r in arm_rows}) > 1,
        "precision_differs": len({r["precision"] for r in arm_rows}) > 1,
        "latency": latency_comparison(cfg, arms, arms[0].tags.get("ab.placement", "") or cfg.placement, cfg.seed),
    })
    summary.tables = tables
    if k > 2:
        summary |= several_arms(cfg, data, names, decisions)
        holm = {(p["a"], p["b"]): p["pvalue_holm"] for p in summary["pairwise"]}
        for pair in pairs:
            pair["pvalue_holm"] = holm[pair["a"], pair["b"]]
    summary["verdict"] = overall_verdict(summary)
    return summary


def per_class_views(data: Aligned, class_names: tuple[str, ...], arm_rows: list[dict[str, Any]],
                    pairs: list[dict[str, Any]]) -> tuple[dict[str, Any], np.ndarray]:
    """(the full tables, the classes shown): picks the classes that matter, narrows each pair's per-class rows
    and each arm's confusion matrix to them, in place, and builds per_class, confusion and flips tables."""
    k = data.num_classes
    accuracy = np.asarray([row["per_class_accuracy"] for row in arm_rows], dtype=float).reshape(len(arm_rows), k)
    net = np.zeros((len(pairs), k))
    for i, pair in enumerate(pairs):
        for row in pair["per_class"]:
            net[i, row["class"]] = row["only_b"] - row["only_a"]
    shown = classes_that_matter(accuracy, net)
    cells = {row["name"]: confusion_cells(data.labels, data.preds[:, j], k) for j, row in enumerate(arm_rows)}
    for row in arm_rows:
        row |= confusion_shown(cells[row["name"]], shown, k)
    tables = {
        "per_class": class_table(class_names, np.bincount(data.labels, minlength=k),
                                 dict(zip(cells, accuracy, strict=True)), {p["key"]: p["per_class"] for p in pairs}),
        "confusion": confusion_table(cells),
    }
    if pairs:
        a = data.correct[:, 0]
        tables["flips"] = flip_table({p["key"]: (p["a"], p["b"], data.ids[a & ~data.correct[:, j + 1]],
                                                 data.ids[~a & data.correct[:, j + 1]]) for j, p in enumerate(pairs)})
    if shown.size < k:
        order = {c: i for i, c in enumerate(shown.tolist())}
        for pair in pairs:
            pair["per_class"] = sorted((r for r in pair["per_class"] if r["class"] in order),
                                       key=lambda r: order[r["class"]])
    return tables, shown


def _group_source(cfg: Config) -> str:
    return f"csv:{cfg.groups}" if cfg.groups else cfg.group_by


def metric_values(labels: np.ndarray, pred: np.ndarray, top5: np.ndarray | None, num_classes: int) -> dict:
    """One arm's accuracy, balanced accuracy (mean recall over the classes present), macro-F1 (over the classes
    in the labels or predictions, as scikit-learn) and top-5 accuracy (None without the columns)."""
    support = np.bincount(labels, minlength=num_classes)
    predicted = np.bincount(pred, minlength=num_classes)
    tp = np.bincount(labels[pred == labels], minlength=num_classes)
    seen = support + predicted > 0
    return {
        "accuracy": float(np.mean(pred == labels)),
        "balanced_accuracy": float(np.mean(tp[support > 0] / support[support > 0])),
        "macro_f1": float(np.mean(2 * tp[seen] / (support + predicted)[seen])),
        "top5_accuracy": None if top5 is None else float(np.mean(top5)),
    }


def arm_summary(arm: Arm, data: Aligned, j: int, alpha: float) -> dict[str, Any]:
    """One arm's row: accuracy with its Wilson interval, other metrics, calibration, per class, telemetry."""
    correct, labels, num_classes = data.correct[:, j], data.labels, data.num_classes
    n = correct.size
    w = stats.wilson_ci(int(correct.sum()), n, 1 - alpha)
    conf = arm.predictions["confidence"].to_numpy()
    cal = stats.calibration(conf, correct)
    top5 = None if data.top5 is None else data.top5[:, j]
    return {
        "name": arm.name,
        "spec": arm.spec,
        "run_id": arm.run_id,
        "accuracy": w.estimate,
        "acc_low": w.low,
        "acc_high": w.high,
        "n_correct": int(correct.sum()),
        "metrics": metric_values(labels, data.preds[:, j], top5, num_classes),
        "confidence_mean": float(conf.mean()),
        "confidence_std": float(conf.std(ddof=1)) if n > 1 else 0.0,
        "ece": cal.ece,
        "calibration": {key: list(getattr(cal, key)) for key in CALIBRATION_KEYS},
        "per_class_accuracy": per_class_accuracy(correct, labels, num_classes).tolist(),
        "confusion": None,  # on the classes shown: filled in by per_class_views
        "preprocess": arm.tags.get("ab.preprocess", ""),
        "device": arm.tags.get("ab.device", ""),
        "precision": arm.tags.get("ab.precision", ""),
        "batch_size": arm.tags.get("ab.batch_size_final", ""),
        "reused_from": arm.extra.get("reused_from"),
        "seed": arm.tags.get("ab.seed", ""),  # the arm's own seed (seed_b for B): an A/A test's noise floor
        "pickle_loaded": arm.tags.get("ab.pickle_loaded") == "true",
        "telemetry": {key: arm.metrics[key] for key in TELEMETRY_KEYS if key in arm.metrics},
        "latencies_ms": (
            arm.batches.loc[~arm.batches["warmup"], "latency_ms"].tolist() if arm.batches is not None else []
        ),
    }


def accuracy_ci(cfg: Config, data: Aligned, j: int, confidence: float = 0.95) -> tuple[float, float, float, str]:
    """(estimate, low, high, method) of acc_j - acc_0: Tango's interval, or the cluster bootstrap with groups."""
    a, b = data.correct[:, 0], data.correct[:, j]
    if data.groups is None:
        ci = stats.paired_diff_ci(int((a & ~b).sum()), int((~a & b).sum()), a.size, confidence, "tango")
        return ci.estimate, ci.low, ci.high, "tango"
    ones = np.ones(a.size, dtype=np.int64)
    boot = stats.paired_metric_ci(ones, a.astype(np.int64), b.astype(np.int64), "accuracy", 2, cfg.n_resamples,
                                  cfg.seed, data.groups, confidence)  # fmt: skip
    return boot.estimate, boot.low, boot.high, "cluster_bootstrap"


def pair_summary(
    cfg: Config, data: Aligned, names: tuple[str, str], j: int, d: stats.DecisionResult, class_names: tuple[str, ...]
) -> dict[str, Any]:
    """Arm j against the baseline: the rule's decision, a 95% accuracy interval, McNemar, the Bayesian reading,
    the MDE and achieved power, per-class flips. "pvalue_holm" is None here; analyse fills it in for A/B/n."""
    a, b, n = data.correct[:, 0], data.correct[:, j], data.correct.shape[0]
    estimate, low, high, method = accuracy_ci(cfg, data, j)
    m = stats.mcnemar(a, b, method=cfg.mcnemar_method)
    p_disc = (m.b + m.c) / n
    # With groups the exact test's power is that of n / design effect independent images.
    n_eff = max(1, round(n / d.design_effect)) if d.design_effect and d.design_effect > 1 else n
    mde = stats.minimum_detectable_effect(n_eff, p_disc, alpha=cfg.alpha) if p_disc > 0 else float("nan")
    observed = (m.c - m.b) / n  # exact: the cluster bootstrap's estimate can carry a rounding error past p_disc
    achieved = stats.achieved_power(n_eff, p_disc, observed, cfg.alpha) if p_disc > 0 else float("nan")
    reading = d if cfg.rule == "bayes" else stats.decide(a, b, "bayes", cfg.margin, cfg.alpha, groups=data.groups)
    per_class = stats.per_class_mcnemar(a, b, data.labels, method="exact", adjust="holm")
    return {
        "a": names[0], "b": names[1], "key": f"{names[1]}_vs_{names[0]}",
        "acc_diff": estimate, "ci_low": low, "ci_high": high, "ci_confidence": 0.95, "ci_method": method,
        "mcnemar_b": m.b, "mcnemar_c": m.c, "mcnemar_pvalue": m.pvalue, "mcnemar_statistic": m.statistic,
        "mcnemar_method": m.method,
        "clustered_pvalue": None if data.groups is None else stats.clustered_mcnemar(a, b, data.groups).pvalue,
        "pvalue_holm": None,
        "metric": d.metric, "metric_diff": d.estimate,
        "verdict": d.verdict,
        "decision_low": d.low, "decision_high": d.high, "decision_confidence": d.confidence,
        "decision_method": d.method, "decision_pvalue": d.pvalue, "comparisons": d.comparisons,
        "design_effect": d.design_effect, "n_groups": d.n_groups,
        "bayes": dict(zip(("prob_a_better", "prob_within", "prob_b_better"),
                          (min(max(p, 0.0), 1.0) for p in reading.probabilities), strict=True))  # 1 - a - b: -1e-24
        | {"margin": cfg.margin, "verdict": reading.verdict, "low": reading.low, "high": reading.high,
           "credibility": reading.confidence},
        "p_discordant": p_disc, "mde": mde, "achieved_power": achieved, "n_effective": n_eff,
        "smallest_margin": max(0.0, -d.low) if cfg.rule == "non_inferiority" else max(0.0, -d.low, d.high),
        "per_class": [
            {"class": int(c.label)} | dataclasses.asdict(c)
            | {"label": class_names[c.label] if c.label < len(class_names) else str(c.label)}
            for c in per_class.classes
        ],
        # The first FLIP_IDS_KEPT on each side (mcnemar_b and _c count them all; flips.parquet lists them all).
        "flips_only_a": data.ids[a & ~b][:FLIP_IDS_KEPT].tolist(),
        "flips_only_b": data.ids[~a & b][:FLIP_IDS_KEPT].tolist(),
    }  # fmt: skip


def several_arms(cfg: Config, data: Aligned, names: list[str], decisions: dict) -> dict[str, Any]:
    """A/B/n only: Cochran's Q (accuracy) over all arms, and every pair's McNemar test with its Holm-adjusted
    p-value and, where the rule decides it, its verdict and interval."""
    q = stats.cochrans_q(data.correct)
    family = list(itertools.combinations(range(len(names)), 2))
    raw, holm = family_pvalues(cfg, data, family)
    rows = []
    for (i, j), p, p_holm in zip(family, raw, holm, strict=True):
        a, b = data.correct[:, i], data.correct[:, j]
        row = {"a": names[i], "b": names[j], "b_count": int((a & ~b).sum()), "c_count": int((~a & b).sum()),
               "pvalue": float(p), "pvalue_holm": float(p_holm)}  # fmt: skip
        if (i, j) in decisions:
            d = decisions[i, j]
            row |= {"verdict": d.verdict, "decision_low": d.low, "decision_high": d.high, "estimate": d.estimate}
        rows.append(row)
    return {"cochran": {"statistic": q.statistic, "pvalue": q.pvalue, "df": q.df}, "pairwise": rows}


def overall_verdict(summary: dict[str, Any]) -> str:
    """Two arms: the pair's verdict. More, read off the same simultaneous pair verdicts, so never in conflict:

    superiority and "bayes": "<arm>_best" when that arm (the best on the metric) beats every other,
    "differences_found" when some pair differs, else "no_significant_difference" (superiority), or
    "all_equivalent" / "undecided" ("bayes"). Non-inferiority and equivalence, against the baseline:
    "all_non_inferior" / "some_non_inferior" / "non_inferiority_not_shown", and likewise "..._equivalent".
    """
    arms = summary["arms"]
    if len(arms) == 2:
        return summary["pairs"][0]["verdict"]
    rule, verdicts = summary["rule"], [p["verdict"] for p in summary["pairs"]]
    if rule in ("non_inferiority", "equivalence"):
        claim = "b_non_inferior" if rule == "non_inferiority" else "equivalent"
        word = "non_inferior" if rule == "non_inferiority" else "equivalent"
        shown = sum(v == claim for v in verdicts)
        return f"all_{word}" if shown == len(verdicts) else f"some_{word}" if shown else f"{rule}_not_shown"
    metric = summary.get("metric", "accuracy")
    best = max(arms, key=lambda r: r["metrics"][metric] if "metrics" in r else r["accuracy"])["name"]
    pairwise = summary["pairwise"]
    wins = [p for p in pairwise if p.get("verdict") == ("b_better" if p["b"] == best else "a_better")
            and best in (p["a"], p["b"])]  # fmt: skip
    if len(wins) == len(arms) - 1:
        return f"{best}_best"
    if any(p.get("verdict") in ("a_better", "b_better") for p in pairwise):
        return "differences_found"
    if rule == "bayes":
        return "all_equivalent" if all(p.get("verdict") == "equivalent" for p in pairwise) else "undecided"
    return "no_significant_difference"


def parent_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Metric names for the parent: two-arm names stay short; A/B/n names carry the pair."""
    out: dict[str, float] = {}
    arms, pairs = summary["arms"], summary["pairs"]
    for row in arms:
        out[f"acc.{row['name']}"] = row["accuracy"]
    if len(arms) == 2:
        out |= {"acc_a": arms[0]["accuracy"], "acc_b": arms[1]["accuracy"]}
        p = pairs[0]
        out |= {"acc_diff": p["acc_diff"], "acc_diff_ci_low": p["ci_low"], "acc_diff_ci_high": p["ci_high"],
                "mcnemar_pvalue": p["mcnemar_pvalue"], "mcnemar_b": p["mcnemar_b"], "mcnemar_c": p["mcnemar_c"],
                "mde": p["mde"], "decision_ci_low": p["decision_low"], "decision_ci_high": p["decision_high"],
                "metric_diff": p["metric_diff"], "achieved_power": p["achieved_power"],
                "design_effect": p["design_effect"], "prob_b_better": p["bayes"]["prob_b_better"],
                "prob_within_margin": p["bayes"]["prob_within"], "prob_a_better": p["bayes"]["prob_a_better"]}
    for p in pairs:
        key = p["key"]
        out |= {f"acc_diff.{key}": p["acc_diff"], f"acc_diff_ci_low.{key}": p["ci_low"],
                f"acc_diff_ci_high.{key}": p["ci_high"], f"mcnemar_pvalue.{key}": p["mcnemar_pvalue"]}
        if p["pvalue_holm"] is not None:
            out[f"mcnemar_pvalue_holm.{key}"] = p["pvalue_holm"]
    if "cochran" in summary:
        out |= {"cochran_q": summary["cochran"]["statistic"], "cochran_pvalue": summary["cochran"]["pvalue"]}
    lat = summary["latency"].get("paired")
    if lat:
        out |= {"latency_diff_ms": lat["estimate_ms"], "latency_diff_ms_ci_low": lat["low_ms"],
                "latency_diff_ms_ci_high": lat["high_ms"]}
        for q in ("p50", "p99"):
            out |= dict(zip((f"latency_{q}_diff_ms", f"latency_{q}_diff_ms_ci_low", f"latency_{q}_diff_ms_ci_high"),
                            lat[f"{q}_diff_ms"], strict=True))
    return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}
