"""Fake ablab evaluations for the history tests: child runs carrying the tags, params and predictions an arm
logs, made in milliseconds without a model. Shared by test_history, test_server, test_ui and test_concurrency."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from lab.compare import Arm

FINGERPRINT = "sha256:" + "ab" * 16
PREPROCESS = "size=32 interp=bilinear crop=1 mean=0.485,0.456,0.406 std=0.229,0.224,0.225"
TAGS = {"ab.role": "child", "ab.dataset": "fake", "ab.dataset_fingerprint": FINGERPRINT, "ab.num_classes": "3",
        "ab.label_map": "labelmap3", "ab.preprocess": PREPROCESS, "ab.precision": "32", "ab.device": "cpu:test",
        "ab.placement": "lockstep"}


def predictions(labels: np.ndarray, correct: np.ndarray, sample_ids: np.ndarray | None = None,
                num_classes: int = 3, seed: int = 0) -> pd.DataFrame:
    """The predictions.parquet columns: right where `correct`, the next class otherwise."""
    labels = np.asarray(labels, dtype=np.int64)
    ids = np.arange(len(labels), dtype=np.int64) if sample_ids is None else np.asarray(sample_ids, dtype=np.int64)
    pred = np.where(correct, labels, (labels + 1) % num_classes)
    confidence = np.random.default_rng(seed).uniform(0.4, 1.0, len(labels))
    return pd.DataFrame({"sample_id": ids, "label": labels, "pred": pred, "confidence": confidence})


def correct_mask(n: int, accuracy: float, seed: int = 0) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[: round(accuracy * n)]] = True
    return mask


def make_arm(name: str, frame: pd.DataFrame, **tag_changes: str) -> Arm:
    """An in-memory arm (no MLflow) with the standard tags, some changed."""
    return Arm(name, f"{name}-run-id-0000", f"model-{name}", TAGS | tag_changes, {}, frame)


def log_parent(client, experiment_id: str, name: str = "parent") -> str:
    run = client.create_run(experiment_id, tags={"ab.role": "parent"}, run_name=name)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def log_child(client, experiment_id: str, frame: pd.DataFrame, *, model: str = "resnet10t",
              identity: str | None = None, parent_run_id: str | None = None, params: dict[str, str] | None = None,
              metrics: dict[str, float] | None = None, status: str = "FINISHED", arm: str = "a",
              **tag_changes: str) -> str:
    """A child run as lab/arm.py leaves it: tags, params, metrics and predictions/predictions.parquet."""
    parent = parent_run_id or log_parent(client, experiment_id)
    tags = TAGS | {"ab.arm": arm, "ab.model": model, "mlflow.parentRunId": parent,
                   "ab.model_identity": identity or f"timm:{model}:pretrained=False:classes=3"} | tag_changes
    run_id = client.create_run(experiment_id, tags=tags, run_name=f"{arm}: {model}").info.run_id
    for key, value in ({"data": "fake", "epochs": "0", "seed": "0"} | (params or {})).items():
        client.log_param(run_id, key, value)
    for key, value in ({"latency_ms_p50": 1.5, "cpu_rss_peak_mb": 900.0} | (metrics or {})).items():
        client.log_metric(run_id, key, value)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "predictions.parquet"
        frame.to_parquet(path, index=False)
        client.log_artifact(run_id, str(path), "predictions")
    client.set_terminated(run_id, status)
    return run_id
