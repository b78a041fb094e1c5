"""Calibration of one classifier: top-label expected calibration error and reliability-diagram bins."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lab.stats._checks import bool_array, check_count, real_vector


@dataclass(frozen=True, slots=True)
class CalibrationResult:
    ece: float
    n_bins: int
    bin_lower: tuple[float, ...]
    bin_upper: tuple[float, ...]
    count: tuple[int, ...]
    mean_confidence: tuple[float, ...]  # nan for an empty bin
    accuracy: tuple[float, ...]  # nan for an empty bin


def calibration(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> CalibrationResult:
    """Top-label expected calibration error and the bins of a reliability diagram.

    Parameters
    ----------
    confidence : numpy.ndarray of float, shape (n,)
        Probability the model gave its predicted (top-1) class, in [0, 1].
    correct : numpy.ndarray of bool, shape (n,)
        Whether that prediction was right.
    n_bins : int
        Number of equal-width bins on [0, 1]; bins are ``[lower, upper)``, the last one closed.

    Returns
    -------
    CalibrationResult
        ``ece`` = sum over bins of ``count / n * |accuracy - mean_confidence|``, as
        ``torchmetrics.classification.MulticlassCalibrationError(norm="l1")``, which gives
        confidences of exactly 1.0 a group of their own (so ``ece`` can differ slightly from the
        sum over the diagram's bins when such confidences occur); ``n_bins`` and per-bin tuples
        ``bin_lower``, ``bin_upper``, ``count``, ``mean_confidence``, ``accuracy``.

    References
    ----------
    Naeini, M. P., Cooper, G., Hauskrecht, M. (2015). Obtaining well calibrated probabilities
    using Bayesian binning. AAAI. Guo, C., Pleiss, G., Sun, Y., Weinberger, K. Q. (2017). On
    calibration of modern neural networks. ICML.
    """
    n_bins = check_count("n_bins", n_bins, 1)
    conf = real_vector("confidence", confidence)
    hit = bool_array("correct", correct, 1)
    if hit.shape != conf.shape:
        raise ValueError(f"confidence and correct must have equal length; got {conf.size} and {hit.size}")
    if conf.min() < 0.0 or conf.max() > 1.0:
        raise ValueError(f"confidence must lie in [0, 1]; got values in [{conf.min()}, {conf.max()}]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Group n_bins holds confidences of exactly 1.0, as torch.bucketize(right=True) does.
    group = np.searchsorted(edges, conf, side="right") - 1
    count = np.bincount(group, minlength=n_bins + 1)
    conf_sum = np.bincount(group, weights=conf, minlength=n_bins + 1)
    hit_sum = np.bincount(group, weights=hit, minlength=n_bins + 1)
    filled = count > 0
    ece = float(np.abs(hit_sum[filled] - conf_sum[filled]).sum() / conf.size)
    # The diagram folds the 1.0 group into the last bin.
    count = np.concatenate([count[: n_bins - 1], [count[n_bins - 1 :].sum()]])
    conf_sum = np.concatenate([conf_sum[: n_bins - 1], [conf_sum[n_bins - 1 :].sum()]])
    hit_sum = np.concatenate([hit_sum[: n_bins - 1], [hit_sum[n_bins - 1 :].sum()]])
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_confidence = np.where(count > 0, conf_sum / count, np.nan)
        accuracy = np.where(count > 0, hit_sum / count, np.nan)
    return CalibrationResult(
        ece,
        n_bins,
        tuple(edges[:-1].tolist()),
        tuple(edges[1:].tolist()),
        tuple(count.tolist()),
        tuple(mean_confidence.tolist()),
        tuple(accuracy.tolist()),
    )
