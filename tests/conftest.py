"""Shared fixtures: a throwaway SQLite tracking store per test, and the tiny configs the tests run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Small, fast arms for CPU tests: fake data, no training, random weights explicitly allowed.
FAST_ARGS = [
    "--data",
    "fake",
    "--fake_samples",
    "96",
    "--image_size",
    "32",
    "--epochs",
    "0",
    "--allow_random_head",
    "true",
    "--a",
    "resnet10t",
    "--b",
    "mobilenetv3_small_100",
    "--batch_size",
    "16",
    "--warmup_batches",
    "1",
    "--n_resamples",
    "1000",
]


@pytest.fixture
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """MLFLOW_TRACKING_URI pointing at a fresh SQLite store; the test runs inside tmp_path."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)  # restored as they were after the test
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("Default")  # forget an active experiment id left by an earlier test's store
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # which set_experiment exports: `run` would honour it
    yield uri
    if mlflow.active_run():
        mlflow.end_run()


def write_safetensors(module, arch: str, path: Path) -> Path:
    """A checkpoint as lab.models reads `<path>.safetensors`: the weights, and the timm architecture in metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={"arch": arch})
    return path


def subprocess_env(uri: str) -> dict[str, str]:
    # No run or experiment inherited from this process (mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_RUN", "MLFLOW_EXPERIMENT"))}
    env["MLFLOW_TRACKING_URI"] = uri
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["HF_HUB_OFFLINE"] = "1"
    return env


def runs_by_status(uri: str) -> dict[str, int]:
    """How many runs in every experiment of the store are in each status."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    counts: dict[str, int] = {}
    for run in client.search_runs(exps) if exps else []:
        counts[run.info.status] = counts.get(run.info.status, 0) + 1
    return counts


def pytest_collection_finish(session: pytest.Session) -> None:
    """Every test module is imported by now (torch, MLflow, pandas, statsmodels...): move those objects out of
    the cyclic collector's reach. Its full passes would otherwise walk millions of them again and again over a
    suite that runs in one process for minutes; objects the tests create are still collected."""
    import gc

    gc.collect()
    gc.freeze()
