"""Fake ablab evaluations: child runs carrying the tags, params and predictions an arm logs, made in milliseconds
without a model, and `FakeArms`, which stands in for lab.launch.run_arms the same way. Shared by test_history,
test_experiment, test_compare_runs, test_leaderboard, test_registry, test_runs, test_server and test_ui."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from conftest import FAST_ARGS
from mlflow.entities import Metric, Param, RunTag

from lab import correctness
from lab.compare import Arm
from lab.config import Config, flat_params, load_config
from lab.launch import ArmOutcome

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
              metrics: dict[str, float] | None = None, status: str = "FINISHED", arm: str = "a", bits: bool = True,
              **tag_changes: str) -> str:
    """A child run as lab/arm.py leaves it: tags, params, metrics, predictions/predictions.parquet and (unless
    `bits=False`, as a run logged before lab/correctness.py) predictions/correct.json."""
    parent = parent_run_id or log_parent(client, experiment_id)
    tags = TAGS | {"ab.arm": arm, "ab.model": model, "mlflow.parentRunId": parent,
                   "ab.model_identity": identity or f"timm:{model}:pretrained=False:classes=3"}
    tags |= ({"ab.complete": "true"} if status == "FINISHED" else {}) | tag_changes  # as lab/lifecycle.py ends it
    run_id = client.create_run(experiment_id, tags=tags, run_name=f"{arm}: {model}").info.run_id
    now = int(time.time() * 1000)
    client.log_batch(run_id, params=[Param(k, v) for k, v in ({"data": "fake", "epochs": "0", "seed": "0"}
                                                             | (params or {})).items()],
                     metrics=[Metric(k, v, now, 0) for k, v in ({"latency_ms_p50": 1.5, "cpu_rss_peak_mb": 900.0}
                                                               | (metrics or {})).items()])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "predictions.parquet"
        frame.to_parquet(path, index=False)
        client.log_artifact(run_id, str(path), "predictions")
        if bits:
            client.log_artifact(run_id, str(correctness.write(frame, Path(tmp))), "predictions")
    client.set_terminated(run_id, status)
    return run_id


# ---- fakes on the FAST_ARGS test set (tests/conftest.py), where the arms of `run` would score --------------


def fast_cfg(**changes: str) -> Config:
    values = dict(zip(FAST_ARGS[::2], FAST_ARGS[1::2], strict=True))
    return load_config(None, {k.removeprefix("--"): v for k, v in values.items()} | changes)


def fast_dataset() -> tuple[str, np.ndarray, np.ndarray, str]:
    """(fingerprint, test ids, test labels, shared preprocessing) of the FAST_ARGS dataset."""
    from lab.data import resolve_dataset  # torch: only the tests that need the real test set load it
    from lab.models import preprocess_for

    cfg = fast_cfg()
    info = resolve_dataset(cfg)
    return info.fingerprint, info.test.sample_ids, info.test.labels, preprocess_for(cfg, None).describe()


def log_fast_child(client, experiment_id: str, accuracy: float, identity: str, seed: int = 0,
                   logged_model: bool = False, **kw) -> str:
    """A fake child on the FAST_ARGS test set, as an arm of that config would log it: with its test set as a
    dataset input, and (`logged_model`) a logged model of fake weights, as a fine-tuned arm logs."""
    from lab import lineage

    fp, ids, labels, pre = fast_dataset()
    frame = predictions(labels, correct_mask(len(labels), accuracy, seed), ids, num_classes=10)
    params = {k: v for k, v in flat_params(fast_cfg()).items() if k not in ("a", "b")}
    run_id = log_child(client, experiment_id, frame, identity=identity, params=params,
                       **{"ab.dataset_fingerprint": fp, "ab.preprocess": pre, "ab.num_classes": "10"} | kw)
    lineage.log_datasets(client, run_id, {"test": lineage.split_dataset(fast_cfg(), fp, len(ids), None, 10)})
    if logged_model:
        model_id = log_fake_model(client, run_id, experiment_id)
        client.log_batch(run_id, tags=[RunTag("ab.logged_model", model_id), RunTag("ab.logged_model_format", "pt2")])
    return run_id


def log_fake_model(client, run_id: str, experiment_id: str) -> str:
    """A logged model `model` of the run holding one small file, as lab.lineage.log_stored_model logs one."""
    from lab import lineage

    def write(folder: Path, record) -> str:
        folder.mkdir(parents=True)
        (folder / "weights.bin").write_bytes(run_id.encode())
        return "pt2"

    return lineage.log_stored_model(client, run_id, experiment_id, write, {"ablab.test": "fake"})[0]


class FakeArms:
    """Stands in for lab.launch.run_arms: logs the child runs the arms would (on the FAST_ARGS test set, with the
    identity lab.models gives the spec), and records which arms it was asked for. `fail` names arms that fail."""

    def __init__(self, accuracy: float | tuple[float, ...] = 0.5, fail: tuple[int, ...] = (),
                 logged_models: bool = False) -> None:
        self.calls: list[list[int]] = []
        self.configs: list[Config] = []
        self.accuracy, self.fail, self.logged_models = accuracy, fail, logged_models

    def __call__(self, cfg, cfg_path, parent_run_id, experiment_id, p, indices=None) -> list[ArmOutcome]:
        from mlflow import MlflowClient

        from lab.models import expected_identity

        indices = list(range(len(cfg.arm_specs))) if indices is None else list(indices)
        self.calls.append(indices)
        self.configs.append(cfg)
        outcomes = []
        for i in indices:
            name, spec = cfg.arm_names[i], cfg.arm_specs[i]
            if i in self.fail:
                outcomes.append(ArmOutcome(i, name, None, 1, f"arm {name} ({spec}): RuntimeError: boom"))
                continue
            accuracy = self.accuracy[i] if isinstance(self.accuracy, tuple) else self.accuracy
            run_id = log_fast_child(MlflowClient(), experiment_id, accuracy, expected_identity(spec, cfg, 10),
                                    seed=i, logged_model=self.logged_models, parent_run_id=parent_run_id, arm=name,
                                    model=spec)
            outcomes.append(ArmOutcome(i, name, run_id, 0, ""))
        return outcomes
