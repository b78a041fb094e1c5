"""Per-class numbers at any class count: every class in Parquet tables, the classes that matter in the summary.

Past MAX_CLASSES_SHOWN classes (ImageNet has 1,000) a bar per class or a 1,000 x 1,000 matrix reads as nothing,
takes seconds to draw and megabytes of JSON to store. The summary then holds the classes that matter (the largest
changes between arms, then the worst classes) and ``Summary.tables`` the full per-class, confusion and flip
tables, which lab.report.render writes as Parquet. Up to MAX_CLASSES_SHOWN classes every class is shown.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

MAX_CLASSES_SHOWN = 50
FLIP_IDS_KEPT = 1000  # sample ids per side in the summary (a gallery shows 8); all of them in flips.parquet


class Summary(dict):
    """The JSON-able summary of a comparison (a plain dict to JSON), and `tables`: the full per-class, confusion
    and flip tables as DataFrames by name, which lab.report.render writes as Parquet and summary.json leaves out."""

    tables: dict[str, pd.DataFrame]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tables = {}


def per_class_accuracy(correct: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy within each true class (NaN for a class absent from the test set); O(n), not O(n x classes)."""
    support = np.bincount(labels, minlength=num_classes)
    right = np.bincount(labels, weights=correct, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, right / np.maximum(support, 1), np.nan)


def confusion_cells(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> tuple[np.ndarray, ...]:
    """The non-zero cells of the confusion matrix as (true, predicted, count): at most n cells whatever the class
    count, where a dense matrix at 20,000 classes would take 3 GB."""
    cells, counts = np.unique(labels.astype(np.int64) * num_classes + preds, return_counts=True)
    return cells // num_classes, cells % num_classes, counts


def classes_that_matter(accuracy: np.ndarray, net_change: np.ndarray, limit: int = MAX_CLASSES_SHOWN) -> np.ndarray:
    """Class indices to show: all of them, in order, up to `limit` classes; else the classes whose accuracy changed
    most between any two compared arms (net flips, half of `limit`), then the worst classes of any arm.

    `accuracy`: (arms, classes), NaN where a class has no test images; `net_change`: (pairs, classes) net flips.
    """
    k = accuracy.shape[1]
    if k <= limit:
        return np.arange(k)
    change = np.abs(net_change).max(axis=0) if net_change.size else np.zeros(k)
    by_change = [int(c) for c in np.argsort(-change, kind="stable")[: limit // 2] if change[c] > 0]
    worst = np.where(np.isnan(accuracy), np.inf, accuracy).min(axis=0)
    chosen = set(by_change)
    rest = [int(c) for c in np.argsort(worst, kind="stable") if int(c) not in chosen and np.isfinite(worst[c])]
    return np.asarray(by_change + rest[: limit - len(by_change)], dtype=np.int64)


def confusion_shown(cells: tuple[np.ndarray, ...], shown: np.ndarray, num_classes: int) -> dict[str, list]:
    """The confusion matrix on the shown classes (rows true, columns predicted, in `shown` order); where classes
    are left out, "confusion_other" counts each shown row's predictions of a class not shown."""
    true, pred, count = cells
    position = np.full(num_classes, -1, dtype=np.int64)
    position[shown] = np.arange(shown.size)
    rows, cols = position[true], position[pred]
    matrix = np.zeros((shown.size, shown.size), dtype=np.int64)
    inside = (rows >= 0) & (cols >= 0)
    np.add.at(matrix, (rows[inside], cols[inside]), count[inside])
    out: dict[str, list] = {"confusion": matrix.tolist()}
    if shown.size < num_classes:
        other = (rows >= 0) & (cols < 0)
        out["confusion_other"] = np.bincount(rows[other], weights=count[other], minlength=shown.size).astype(
            np.int64).tolist()
    return out


def class_table(class_names: tuple[str, ...], support: np.ndarray, accuracy: dict[str, np.ndarray],
                pairs: dict[str, list[dict[str, Any]]]) -> pd.DataFrame:
    """per_class.parquet: one row per class; accuracy per arm; per pair (by key) the flips and McNemar p-values."""
    k = support.size
    table: dict[str, Any] = {"class": np.arange(k), "name": list(class_names), "n": support}
    table |= {f"accuracy.{name}": values for name, values in accuracy.items()}
    for key, rows in pairs.items():
        index = np.asarray([r["class"] for r in rows], dtype=np.int64)
        for column in ("only_a", "only_b", "pvalue", "pvalue_adjusted"):
            values = np.zeros(k, dtype=np.int64) if column.startswith("only") else np.full(k, np.nan)
            values[index] = [r[column] for r in rows]
            table[f"{key}.{column}"] = values
    return pd.DataFrame(table)


def confusion_table(cells: dict[str, tuple[np.ndarray, ...]]) -> pd.DataFrame:
    """confusion.parquet: every arm's non-zero confusion cells, long form (arm, true, pred, count)."""
    frames = [pd.DataFrame({"arm": name, "true": t, "pred": p, "count": c}) for name, (t, p, c) in cells.items()]
    return pd.concat(frames, ignore_index=True)


def flip_table(flips: dict[str, tuple[str, str, np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """flips.parquet: every sample one arm of a pair got right and the other wrong (pair, sample_id, right)."""
    frames = []
    for key, (a, b, only_a, only_b) in flips.items():
        frames += [pd.DataFrame({"pair": key, "sample_id": only_a, "right": a}),
                   pd.DataFrame({"pair": key, "sample_id": only_b, "right": b})]
    return pd.concat(frames, ignore_index=True)
