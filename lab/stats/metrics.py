"""Paired bootstrap intervals for metrics beyond accuracy, optionally resampling whole groups of images.

Every metric here is a function of additive per-image sums (per-class support, true positives, predictions), so a
resample is one row of draw counts times a sparse matrix: no loop over resamples (lab.stats.clustered).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

from lab.stats._checks import check_choice, check_count, check_open_unit
from lab.stats.clustered import cluster_bootstrap, group_codes

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy")


@dataclass(frozen=True, slots=True)
class MetricDiffResult:
    metric: str
    estimate: float  # value_b - value_a
    value_a: float
    value_b: float
    low: float
    high: float
    confidence: float
    n: int
    n_groups: int  # n when no groups were given
    design_effect: float  # var(group bootstrap) / var(image bootstrap); nan without groups
    n_resamples: int
    seed: int


def _label_vector(name: str, values: object, n: int | None) -> np.ndarray:
    array = np.asarray(values)
    if not np.issubdtype(array.dtype, np.integer) or array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D integer array; got dtype {array.dtype}, shape {array.shape}")
    if n is not None and array.size != n:
        raise ValueError(f"{name} must have one entry per image ({n}); got {array.size}")
    return array.astype(np.int64)


def _inputs(labels, pred_a, pred_b, metric, n_classes) -> tuple[np.ndarray, ...]:
    """Validated (labels, pred_a, pred_b) and the number of classes K (1 for top-5, which takes booleans)."""
    if metric == "top5_accuracy":
        hits = [np.asarray(x) for x in (pred_a, pred_b)]
        for name, hit in zip(("pred_a", "pred_b"), hits, strict=True):
            if hit.dtype != np.bool_ or hit.ndim != 1 or hit.size == 0:
                raise ValueError(f"{name} must be a non-empty 1-D boolean 'label in top 5' array for top5_accuracy; "
                                 f"got dtype {hit.dtype}, shape {hit.shape}")  # fmt: skip
        if hits[0].size != hits[1].size:
            raise ValueError(f"pred_a and pred_b must have equal length; got {hits[0].size} and {hits[1].size}")
        zeros = np.zeros(hits[0].size, dtype=np.int64)
        return zeros, hits[0].astype(np.int64), hits[1].astype(np.int64), 1
    labels = _label_vector("labels", labels, None)
    pred_a = _label_vector("pred_a", pred_a, labels.size)
    pred_b = _label_vector("pred_b", pred_b, labels.size)
    k = int(max(labels.max(), pred_a.max(), pred_b.max())) + 1 if n_classes is None else n_classes
    k = check_count("n_classes", k, 1)
    for name, array in (("labels", labels), ("pred_a", pred_a), ("pred_b", pred_b)):
        if array.min() < 0 or array.max() >= k:
            bad = array[(array < 0) | (array >= k)][0]
            raise ValueError(f"{name} must lie in 0..{k - 1} (n_classes={k}); got {bad}")
    return labels, pred_a, pred_b, k


def _image_sums(labels, pred_a, pred_b, metric: str, k: int) -> sparse.csr_matrix:
    """Per-image additive sums, one row per image; columns per metric (see _statistic)."""
    n = labels.size
    rows = np.arange(n)
    if metric in ("accuracy", "top5_accuracy"):
        hit_a = pred_a == labels if metric == "accuracy" else pred_a.astype(bool)
        hit_b = pred_b == labels if metric == "accuracy" else pred_b.astype(bool)
        return sparse.csr_matrix(np.column_stack([np.ones(n), hit_a, hit_b]))
    # Blocks of K columns: support, true positives of A, of B, then (macro-F1) predictions of A, of B.
    blocks = [(labels, np.ones(n)), (labels, pred_a == labels), (labels, pred_b == labels)]
    if metric == "macro_f1":
        blocks += [(pred_a, np.ones(n)), (pred_b, np.ones(n))]
    cols = np.concatenate([j * k + index for j, (index, _) in enumerate(blocks)])
    vals = np.concatenate([value.astype(np.float64) for _, value in blocks])
    return sparse.csr_matrix((vals, (np.tile(rows, len(blocks)), cols)), shape=(n, len(blocks) * k))


def _statistic(metric: str, k: int):
    """Vectorised metric difference B - A from totals of shape (R, m), and each arm's value."""

    def per_arm(totals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if metric in ("accuracy", "top5_accuracy"):
            return totals[:, 1] / totals[:, 0], totals[:, 2] / totals[:, 0]
        support = totals[:, :k]
        values = []
        for arm in (0, 1):
            tp = totals[:, (1 + arm) * k : (2 + arm) * k]
            if metric == "balanced_accuracy":  # mean recall over the classes present (sklearn)
                present, ratio_num, ratio_den = support > 0, tp, support
            else:  # mean F1 = 2 tp / (support + predicted) over classes seen in labels or predictions (sklearn)
                predicted = totals[:, (3 + arm) * k : (4 + arm) * k]
                present, ratio_num, ratio_den = support + predicted > 0, 2 * tp, support + predicted
            ratio = np.divide(ratio_num, ratio_den, out=np.zeros_like(tp), where=present)
            values.append(ratio.sum(axis=1) / present.sum(axis=1))
        return values[0], values[1]

    def difference(totals: np.ndarray) -> np.ndarray:
        value_a, value_b = per_arm(totals)
        return value_b - value_a

    return per_arm, difference


def _collapse(sums: sparse.csr_matrix, labels, pred_a, pred_b, metric: str) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Images with identical sums merged into one unit with a multiplicity (same bootstrap law, fewer units).

    An image's row is fixed by (correct A, correct B) for accuracy, by its two top-5 hits for top-5, and by
    (label, prediction A, prediction B) for the per-class metrics.
    """
    if metric == "accuracy":
        key = np.column_stack([pred_a == labels, pred_b == labels])
    elif metric == "top5_accuracy":
        key = np.column_stack([pred_a, pred_b])
    else:
        key = np.column_stack([labels, pred_a, pred_b])
    _, first, counts = np.unique(key, axis=0, return_index=True, return_counts=True)
    return sums[first], counts


def paired_metric_ci(
    labels: np.ndarray | None,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    metric: str = "accuracy",
    n_classes: int | None = None,
    n_resamples: int = 10_000,
    seed: int = 0,
    groups: object | None = None,
    confidence: float = 0.95,
) -> MetricDiffResult:
    """Paired percentile bootstrap interval for ``metric(B) - metric(A)`` on the same test images.

    The images (or, with ``groups``, whole groups of images) are resampled with replacement and both arms
    are scored on the same resample, which keeps the pairing. Balanced accuracy is the mean per-class recall
    over the classes present in the labels, macro-F1 the mean per-class F1 over the classes present in the
    labels or that arm's predictions (both as scikit-learn computes them, resample by resample). With groups
    the result also carries the design effect: the variance of the group bootstrap over that of the image
    bootstrap (same seed), about 1 for independent images and up to the group size for near-duplicates.

    Parameters
    ----------
    labels : numpy.ndarray of int, shape (n,), or None
        True classes; ignored (may be None) for ``"top5_accuracy"``.
    pred_a, pred_b : numpy.ndarray, shape (n,)
        Predicted classes (int), or for ``"top5_accuracy"`` booleans: the label is in that arm's top 5.
    metric : {"accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy"}
        What to compare.
    n_classes : int, optional
        Number of classes K (labels and predictions in 0..K-1); default: the largest value seen plus 1.
    n_resamples, seed : int
        Bootstrap resamples and the seed of ``numpy.random.default_rng``.
    groups : array_like, shape (n,), optional
        Group label per image; whole groups are resampled (the cluster bootstrap). At least 2 groups.
    confidence : float
        Two-sided level, in (0, 1).

    Returns
    -------
    MetricDiffResult
        ``metric``, ``estimate`` (B - A), ``value_a``, ``value_b``, ``low``, ``high``, ``confidence``, ``n``,
        ``n_groups``, ``design_effect``, ``n_resamples`` and ``seed``.

    Raises
    ------
    ValueError
        On an unknown metric, arrays of the wrong dtype, shape or length, labels or predictions outside
        0..K-1, a single group, or an invalid option.

    References
    ----------
    Efron, B., Tibshirani, R. J. (1993). An Introduction to the Bootstrap, ch. 13 (percentile interval).
    Davison, A. C., Hinkley, D. V. (1997). Bootstrap Methods and their Application, sec. 3.8.
    Miller, E. (2024). Adding error bars to evals: a statistical approach to language model evaluations.
    arXiv:2411.00640 (clustered standard errors).
    """
    check_choice("metric", metric, METRICS)
    confidence = check_open_unit("confidence", confidence)
    n_resamples = check_count("n_resamples", n_resamples, 1)
    labels, pred_a, pred_b, k = _inputs(labels, pred_a, pred_b, metric, n_classes)
    n = labels.size
    n_groups, design_effect = n, float("nan")
    if groups is not None:
        codes, n_groups = group_codes(groups, n)
        if n_groups < 2:
            raise ValueError(f"groups must name at least 2 groups; got {n_groups}")
    sums = _image_sums(labels, pred_a, pred_b, metric, k)
    per_arm, difference = _statistic(metric, k)
    value_a, value_b = (float(v[0]) for v in per_arm(np.asarray(sums.sum(axis=0))))
    units, multiplicity = _collapse(sums, labels, pred_a, pred_b, metric)
    draws = cluster_bootstrap(units, difference, n_resamples, seed, multiplicity)
    if groups is not None:
        membership = sparse.csr_matrix((np.ones(n), (codes, np.arange(n))), shape=(n_groups, n))
        iid_variance = draws.var()
        draws = cluster_bootstrap(membership @ sums, difference, n_resamples, seed)
        design_effect = float(draws.var() / iid_variance) if iid_variance > 0 else float("nan")
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    return MetricDiffResult(
        metric, value_b - value_a, value_a, value_b, float(low), float(high), confidence, n, n_groups,
        design_effect, n_resamples, seed,
    )  # fmt: skip
