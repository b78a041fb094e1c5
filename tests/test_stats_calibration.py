"""Tests of lab/stats/calibration.py against torchmetrics and bins counted by hand, including confidences of 1.0.

Run with ``python -m pytest tests/test_stats_calibration.py -q``.
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from lab import stats


@pytest.mark.parametrize("n_bins", [10, 15])
def test_calibration_ece_matches_torchmetrics(n_bins: int) -> None:
    torch = pytest.importorskip("torch")
    from torchmetrics.classification import MulticlassCalibrationError

    rng = np.random.default_rng(n_bins)
    probs = rng.dirichlet(np.full(10, 0.3), size=5000).astype(np.float32)
    probs[:300] = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 300)]  # confidences of exactly 1.0
    target = np.where(rng.random(5000) < 0.7, probs.argmax(1), rng.integers(0, 10, 5000))
    metric = MulticlassCalibrationError(num_classes=10, n_bins=n_bins, norm="l1")
    reference = float(metric(torch.from_numpy(probs), torch.from_numpy(target)))
    result = stats.calibration(probs.max(1).astype(np.float64), probs.argmax(1) == target, n_bins)
    assert result.ece == pytest.approx(reference, abs=1e-5)


def test_calibration_bins() -> None:
    confidence = np.array([0.05, 0.15, 0.15, 0.5, 0.95, 1.0])
    correct = np.array([False, True, False, True, True, True])
    result = stats.calibration(confidence, correct, n_bins=4)
    assert result.bin_lower == (0.0, 0.25, 0.5, 0.75) and result.bin_upper == (0.25, 0.5, 0.75, 1.0)
    assert result.count == (3, 0, 1, 2)
    assert_allclose(result.mean_confidence, [0.35 / 3, np.nan, 0.5, 0.975])
    assert_allclose(result.accuracy, [1 / 3, np.nan, 1.0, 1.0])
    # Per bin |accuracy - confidence| weighted by count, with 1.0 in a group of its own (torchmetrics).
    expected = (abs(1 - 0.35) + abs(1 - 0.5) + abs(1 - 0.95) + abs(1 - 1.0)) / 6
    assert result.ece == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("confidence", "correct", "n_bins", "match"),
    [
        (np.array([0.2, 1.2]), np.array([True, False]), 15, r"confidence must lie in \[0, 1\]; got values"),
        (np.array([0.2, 0.4]), np.array([True]), 15, "equal length; got 2 and 1"),
        (np.array([0.2, 0.4]), np.array([1, 0]), 15, "correct must be a boolean array"),
        (np.array([0.2, 0.4]), np.array([True, False]), 0, "n_bins must be at least 1; got 0"),
    ],
)
def test_calibration_rejects_bad_inputs(confidence: np.ndarray, correct: np.ndarray, n_bins: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        stats.calibration(confidence, correct, n_bins)


def test_calibration_gives_confidence_one_a_group_of_its_own() -> None:
    # 0.95 right and 1.0 wrong share the diagram's last bin [0.75, 1.0]. Pooled they would give
    # |1 - 1.95| = 0.95; torchmetrics' grouping (1.0 alone, as torch.bucketize(right=True)) gives 0.05 + 1.0.
    confidence = np.array([0.1, 0.95, 1.0, 1.0])
    correct = np.array([False, True, False, True])
    result = stats.calibration(confidence, correct, n_bins=4)
    assert result.count == (1, 0, 0, 3)  # the diagram folds 1.0 into the last bin
    assert_allclose(result.mean_confidence[3], (0.95 + 1.0 + 1.0) / 3, rtol=1e-12)
    assert_allclose(result.accuracy[3], 2 / 3, rtol=1e-12)
    assert result.ece == pytest.approx((0.1 + abs(1 - 0.95) + abs(1 - 2.0)) / 4, rel=1e-12)


def test_calibration_ece_with_confidence_one_matches_torchmetrics() -> None:
    torch = pytest.importorskip("torch")
    from torchmetrics.classification import MulticlassCalibrationError

    # In the last of 4 bins, 0.95 is right (twice) and 1.0 is wrong: pooling them would change the ECE.
    probs = torch.tensor([[0.6, 0.4], [0.95, 0.05], [1.0, 0.0], [0.05, 0.95], [0.3, 0.7]])
    target = torch.tensor([0, 0, 1, 1, 0])
    reference = float(MulticlassCalibrationError(num_classes=2, n_bins=4, norm="l1")(probs, target))
    top = probs.max(1)
    result = stats.calibration(top.values.double().numpy(), (top.indices == target).numpy(), n_bins=4)
    assert result.ece == pytest.approx(reference, abs=1e-6)
