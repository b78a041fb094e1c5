"""Fetch every arm's predictions, prove the arms comparable, align them and run the statistics (numbers only).

    from lab.compare import fetch_arms, analyse
    arms = fetch_arms(client, [run_id_a, run_id_b])
    summary = report.describe(analyse(cfg, arms))  # lab.report words the verdicts

``arms``: fetch, the comparability guard, input checks, alignment. ``analysis``: the decisions and the summary.
``latency``: whether latencies compare, and their intervals. ``classes``: per-class numbers at any class count
(the classes a report shows; every class in ``Summary.tables``).
"""

from lab.compare.analysis import (
    CALIBRATION_KEYS,
    TELEMETRY_KEYS,
    accuracy_ci,
    analyse,
    arm_summary,
    decide_family,
    family_pvalues,
    metric_values,
    overall_verdict,
    pair_summary,
    parent_metrics,
    several_arms,
)
from lab.compare.arms import (
    FINGERPRINT_TAG,
    GUARDED_TAGS,
    Aligned,
    Arm,
    ComparisonError,
    align,
    aligned,
    check_comparable,
    check_inputs,
    fetch_arms,
    top5_hits,
)
from lab.compare.classes import FLIP_IDS_KEPT, MAX_CLASSES_SHOWN, Summary, classes_that_matter
from lab.compare.latency import LATENCY_QUANTILES, latency_comparison, latency_verdict, paired_batches

__all__ = [
    "CALIBRATION_KEYS",
    "FINGERPRINT_TAG",
    "FLIP_IDS_KEPT",
    "GUARDED_TAGS",
    "LATENCY_QUANTILES",
    "MAX_CLASSES_SHOWN",
    "TELEMETRY_KEYS",
    "Aligned",
    "Arm",
    "ComparisonError",
    "Summary",
    "accuracy_ci",
    "align",
    "aligned",
    "analyse",
    "arm_summary",
    "check_comparable",
    "check_inputs",
    "classes_that_matter",
    "decide_family",
    "family_pvalues",
    "fetch_arms",
    "latency_comparison",
    "latency_verdict",
    "metric_values",
    "overall_verdict",
    "pair_summary",
    "paired_batches",
    "parent_metrics",
    "several_arms",
    "top5_hits",
]
