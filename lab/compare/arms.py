"""The arms of a comparison: fetch their predictions, prove them comparable, check and align them.

Predictions come through the MLflow artifacts API, so this works against any tracking URI (a local SQLite store or
a shared `mlflow server`). Before any statistics the comparability guard checks that every arm scored the same
test set: dataset fingerprint, sample ids and labels, class count and label map. A mismatch, or input no statistic
can use (an empty test set, a label outside the classes), stops with one line naming the run and the value.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lab.config import Config

# Child tags that must agree across arms before any statistic means anything: what to call it, and the fix.
# The most specific first: a label map difference also changes the fingerprint, and should be named as such.
GUARDED_TAGS = (
    ("ab.num_classes", "number of classes", "evaluate both models on a dataset with the same classes"),
    (
        "ab.label_map",
        "label map (class names and their order)",
        "the same class index means a different class in each arm; evaluate both on the same dataset",
    ),
)
FINGERPRINT_TAG = (
    "ab.dataset_fingerprint",
    "dataset fingerprint",
    "evaluate both models on the same dataset, split and seed",
)
class ComparisonError(ValueError):
    """Arms that cannot be compared; the message names what differs and both values."""


@dataclass
class Arm:
    name: str
    run_id: str
    spec: str
    tags: dict[str, str]
    metrics: dict[str, float]
    predictions: pd.DataFrame
    batches: pd.DataFrame | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Aligned:
    """The arms' predictions on the common test set, rows in sample_id order, one column per arm."""

    ids: np.ndarray
    labels: np.ndarray
    correct: np.ndarray  # (n, k) bool
    preds: np.ndarray  # (n, k) int
    top5: np.ndarray | None  # (n, k) bool "label in the top 5", where every arm's predictions allow it
    groups: np.ndarray | None  # (n,) group of each sample, when the config asks for groups
    num_classes: int


def prediction_columns(path: str) -> list[str]:
    """The columns a comparison reads: ids, labels, top-1 and its confidence, class probabilities (up to 100
    classes) or the top-5 classes; the top-5 probabilities stay on disk (a fifth less memory at 1,000 classes)."""
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    return [c for c in names if c in ("sample_id", "label", "pred", "confidence") or c.startswith("prob_")
            or (c.startswith("top") and c.endswith("_class"))]


def class_names_of(path: str, label_map: str | None) -> tuple[str, ...] | None:
    """The class names an arm logged (metrics/per_class_accuracy.json, keyed by name in class order), where they
    hash to its `ab.label_map` tag; else None. The parent needs no dataset, and no torch, to name the classes."""
    try:
        names = tuple(json.loads(Path(path).read_text()))
    except (OSError, ValueError):
        return None
    digest = hashlib.sha256(json.dumps(list(names)).encode()).hexdigest()[:16]
    return names if label_map is not None and digest == label_map else None


def fetch_arms(client, run_ids: list[str], names: list[str] | None = None) -> list[Arm]:
    """Download predictions (and telemetry and class names, where logged) of finished child runs."""
    import mlflow

    arms = []
    for i, run_id in enumerate(run_ids):
        run = client.get_run(run_id)
        if run.info.status != "FINISHED":
            raise ComparisonError(f"run {run_id} is {run.info.status}, not FINISHED; compare finished evaluations")
        tags = run.data.tags
        with tempfile.TemporaryDirectory() as tmp:

            def download(path: str, tmp: str = tmp, base: str = run.info.artifact_uri) -> str:
                # From the run's artifact URI: a runs:/ URI would look the run (and its logged models) up again,
                # 0.1 s per file on SQLite.
                return mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{path}", dst_path=tmp)

            try:
                path = download("predictions/predictions.parquet")
            except Exception as err:
                raise ComparisonError(
                    f"run {run_id} has no predictions/predictions.parquet ({type(err).__name__}); "
                    "it is not an ablab evaluation"
                ) from None
            predictions = pd.read_parquet(path, columns=prediction_columns(path))
            batches, classes = None, None
            try:
                batches = pd.read_parquet(download("telemetry/batches.parquet"))
            except Exception:  # telemetry is optional: runs without it are compared on accuracy alone
                pass
            try:
                classes = class_names_of(download("metrics/per_class_accuracy.json"), tags.get("ab.label_map"))
            except Exception:  # older runs: the parent names the classes from the dataset, or by index
                pass
        name = names[i] if names else tags.get("ab.arm", run_id[:8])
        arms.append(
            Arm(name, run_id, tags.get("ab.model", ""), dict(tags), dict(run.data.metrics), predictions, batches,
                {"params": dict(run.data.params), "class_names": classes})  # params: the guard names a setting
        )
    return arms


def check_comparable(arms: list[Arm]) -> None:
    """Refuse arms that did not score the same test set; there is no switch to compare anyway.

    One line names both runs and both fingerprints, then what differs, the most specific first: class count,
    label map, sample ids, labels, else the data behind the fingerprint (which also covers the pixels). Where the
    arms' recorded configs (`extra["params"]`, the child runs' params) differ in a setting that picks the test
    set (data, seed, test_fraction, ...), the line names it on each run and says to compare runs made alike.
    """
    base = arms[0]
    for arm in arms[1:]:
        difference = _test_set_difference(base, arm)
        if difference is not None:
            raise ComparisonError(_refusal(base, arm, *difference))


# Recorded settings (child params) that pick the test set, named in a refusal when they differ between arms.
TEST_SET_PARAMS = ("data", "seed", "test_fraction", "fake_samples", "fake_classes")


def _test_set_difference(base: Arm, arm: Arm) -> tuple[str, str] | None:
    """(what differs between the two arms' test sets, the fix when no recorded setting explains it), or None."""
    for key, what, fix in GUARDED_TAGS:
        va, vb = base.tags.get(key, "<missing>"), arm.tags.get(key, "<missing>")
        if va != vb:
            return f"{what} {va} vs {vb}", fix
    ids_a, ids_b = base.predictions["sample_id"].to_numpy(), arm.predictions["sample_id"].to_numpy()
    if len(ids_a) != len(ids_b) or not np.array_equal(np.sort(ids_a), np.sort(ids_b)):
        only = len(np.setxor1d(ids_a, ids_b))
        return f"{only} sample ids in only one, {len(ids_a)} vs {len(ids_b)} samples", FINGERPRINT_TAG[2]
    la = base.predictions.set_index("sample_id")["label"]
    lb = arm.predictions.set_index("sample_id")["label"].reindex(la.index)
    differs = la.to_numpy() != lb.to_numpy()
    if differs.any():
        first = la.index[differs][0]
        return (f"labels differ on {int(differs.sum())} samples, first sample {first}: {la[first]} vs {lb[first]}",
                f"the arms did not score the same ground truth; {FINGERPRINT_TAG[2]}")
    if base.tags.get(FINGERPRINT_TAG[0]) != arm.tags.get(FINGERPRINT_TAG[0]):
        return "same sample ids and labels but different images or class names", FINGERPRINT_TAG[2]
    return None


def _refusal(base: Arm, arm: Arm, what: str, fix: str) -> str:
    pa, pb = base.extra.get("params") or {}, arm.extra.get("params") or {}
    why = [k for k in TEST_SET_PARAMS if k in pa and k in pb and pa[k] != pb[k]]

    def who(a: Arm, params: dict[str, str]) -> str:
        return f"arm {a.name} (run {a.run_id[:8]}…" + "".join(f", {k} {params[k]}" for k in why) + ")"

    def fingerprint(a: Arm) -> str:
        value = a.tags.get(FINGERPRINT_TAG[0], "<missing>")
        return value[:15] + "…" if len(value) > 15 else value

    if why:
        keys = ["data", "seed", "test_fraction", *(k for k in why if k not in ("data", "seed", "test_fraction"))]
        fix = f"compare runs made with the same {', '.join(keys[:-1])} and {keys[-1]}"
    return (f"{who(base, pa)} and {who(arm, pb)} were scored on different test sets (fingerprint {fingerprint(base)} "
            f"vs {fingerprint(arm)}; {what}): {fix}")


def check_inputs(arms: list[Arm], num_classes: int) -> None:
    """One line naming the run and the value for predictions no statistic can use: an empty test set, or a
    label or prediction outside 0..num_classes-1 (which would index past, or wrap around, the classes)."""
    for arm in arms:
        where = f"run {arm.run_id[:8]} (arm {arm.name})"
        if len(arm.predictions) == 0:
            raise ComparisonError(f"{where} has an empty test set (0 predictions); there is nothing to compare")
        for column in ("label", "pred"):
            values = arm.predictions[column].to_numpy()
            bad = (values < 0) | (values >= num_classes)
            if bad.any():
                raise ComparisonError(
                    f"{where}: {column} {values[bad][0]} of sample {arm.predictions['sample_id'].to_numpy()[bad][0]} "
                    f"is outside the {num_classes} classes (0..{num_classes - 1}); {int(bad.sum())} such samples"
                )


def align(arms: list[Arm]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample ids, labels, n x k correctness) with every arm's rows in sample_id order."""
    frames = [a.predictions.sort_values("sample_id", kind="stable").reset_index(drop=True) for a in arms]
    ids, labels = frames[0]["sample_id"].to_numpy(), frames[0]["label"].to_numpy()
    correct = np.stack([(f["pred"].to_numpy() == labels) for f in frames], axis=1)
    for a, f in zip(arms, frames, strict=True):
        a.predictions = f
    return ids, labels, correct


def top5_hits(frame: pd.DataFrame, num_classes: int) -> np.ndarray | None:
    """Whether each label is among the arm's 5 most probable classes, from `prob_<k>` or `top1..5_class`."""
    labels = frame["label"].to_numpy()
    probs = [f"prob_{k}" for k in range(num_classes)]
    tops = [f"top{k}_class" for k in range(1, min(num_classes, 5) + 1)]
    if set(probs) <= set(frame.columns):
        order = np.argsort(-frame[probs].to_numpy(), axis=1, kind="stable")[:, :5]
    elif set(tops) <= set(frame.columns):
        order = frame[tops].to_numpy()
    else:
        return None
    return (order == labels[:, None]).any(axis=1)


def _group_array(cfg: Config, ids: np.ndarray, groups: Mapping[int, Any] | None) -> np.ndarray | None:
    if cfg.group_by == "none" and not cfg.groups:
        return None
    if groups is None:
        raise ComparisonError("the config asks for groups (group_by/groups) but none were given for the test set; "
                              "run where the dataset resolves, or set group_by=none")
    missing = [int(i) for i in ids if int(i) not in groups]
    if missing:
        raise ComparisonError(f"groups: {len(missing)} test samples have no group (first: sample {missing[0]})")
    return np.asarray([str(groups[int(i)]) for i in ids])


def aligned(cfg: Config, arms: list[Arm], groups: Mapping[int, Any] | None = None) -> Aligned:
    """Guard, check and align the arms: everything the statistics read, in sample_id order."""
    check_comparable(arms)
    labels_seen = arms[0].predictions["label"].to_numpy()
    num_classes = int(arms[0].tags.get("ab.num_classes", int(labels_seen.max(initial=0)) + 1))
    check_inputs(arms, num_classes)
    ids, labels, correct = align(arms)
    preds = np.stack([a.predictions["pred"].to_numpy().astype(np.int64) for a in arms], axis=1)
    hits = [top5_hits(a.predictions, num_classes) for a in arms]
    top5 = None if any(h is None for h in hits) else np.stack(hits, axis=1)
    if cfg.metric == "top5_accuracy" and top5 is None:
        lacking = next(a for a, h in zip(arms, hits, strict=True) if h is None)
        raise ComparisonError(f"metric=top5_accuracy needs prob_<k> or top1..5_class columns; run "
                              f"{lacking.run_id[:8]} (arm {lacking.name}) has neither")
    return Aligned(ids, labels.astype(np.int64), correct, preds, top5, _group_array(cfg, ids, groups), num_classes)
