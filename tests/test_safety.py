"""Safety (issue 11, item 9): credentials never reach params, tags, artifacts or logs, and no artifact is a pickle.

The pickle rule: a file is a pickle when its suffix is .pkl/.pickle, or it starts with the PROTO opcode (0x80 and
protocol 2-5) and ends with STOP (`.`); a zip archive (torch.save's format, MLflow's pt2 models) holds a pickle
when a member is named *.pkl (torch.save's `data.pkl`). The members of a pt2 archive (torch.export) are JSON, and
raw tensor bytes under data/weights and data/constants, which are not read as pickles (any float may start 0x80).
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import FAST_ARGS, ROOT, subprocess_env

CANARY = "canary-s3cr3t-7f1d9a"
SECRETS = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY",
           "DATABRICKS_TOKEN", "AZURE_STORAGE_ACCESS_KEY")


def is_pickle(path: Path) -> bool:
    if path.suffix.lower() in (".pkl", ".pickle"):
        return True
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(".pkl") for name in archive.namelist())
    data = path.read_bytes()
    return len(data) > 2 and data[0] == 0x80 and data[1] in (2, 3, 4, 5) and data.endswith(b".")


def test_the_pickle_rule(tmp_path: Path) -> None:
    (tmp_path / "p.bin").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    torch.save({"w": torch.ones(2)}, tmp_path / "state.pt")  # a zip holding data.pkl
    net = torch.nn.Linear(3, 2).eval()
    torch.export.save(torch.export.export(net, (torch.zeros(1, 3),)), tmp_path / "model.pt2")
    (tmp_path / "x.json").write_text("{}")
    assert [p.name for p in sorted(tmp_path.iterdir()) if is_pickle(p)] == ["p.bin", "state.pt"]


def all_text_of_the_store(uri: str, tmp_path: Path) -> tuple[list[str], list[Path]]:
    """Every param, tag and metric name and value of every run, and every artifact file of every run and logged
    model (downloaded)."""
    from mlflow import MlflowClient, artifacts

    client = MlflowClient(uri)
    texts, files = [], []
    experiments = [e.experiment_id for e in client.search_experiments()]
    for model in client.search_logged_models(experiments):
        texts += [f"{k}={v}" for k, v in {**model.tags, **(model.params or {})}.items()]
        local = Path(artifacts.download_artifacts(artifact_uri=model.artifact_location, tracking_uri=uri,
                                                  dst_path=str(tmp_path / "models" / model.model_id)))
        files += [p for p in local.rglob("*") if p.is_file()]
    for run in client.search_runs(experiments):
        texts += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
        texts += list(run.data.metrics)
        local = Path(artifacts.download_artifacts(run_id=run.info.run_id, tracking_uri=uri,
                                                  dst_path=str(tmp_path / "artifacts" / run.info.run_id)))
        files += [p for p in local.rglob("*") if p.is_file()]
    return texts, files


@pytest.mark.slow  # a one-epoch job (fine-tuned weights are logged as pt2 models) in a subprocess
def test_a_job_leaks_no_credentials_and_logs_no_pickles(tracking: str, tmp_path: Path) -> None:
    env = subprocess_env(tracking) | dict.fromkeys(SECRETS, CANARY)
    args = list(FAST_ARGS)
    args[args.index("--epochs") + 1] = "1"  # a fine-tune: its weights are logged as a model, scanned too
    done = subprocess.run([sys.executable, "-m", "lab", "run", *args, "--image_size", "16"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert CANARY not in done.stdout + done.stderr
    texts, files = all_text_of_the_store(tracking, tmp_path)
    assert any(p.suffix in (".pt2", ".safetensors") for p in files), "no logged model was scanned"
    assert [t for t in texts if CANARY in t] == []
    assert [str(p) for p in files if CANARY.encode() in p.read_bytes()] == []
    assert [str(p) for p in files if is_pickle(p)] == []


def test_a_pickled_mlflow_model_loads_only_with_the_opt_in(tracking: str) -> None:
    import mlflow
    import timm

    from lab.config import build_config
    from lab.models import ModelError, resolve_model

    net = timm.create_model("resnet10t", num_classes=10).eval()
    with mlflow.start_run() as run:
        mlflow.pytorch.log_model(net, name="model", serialization_format="pickle")
    spec = f"runs:/{run.info.run_id}/model"
    with pytest.raises(ModelError, match=r"logged with pickle serialization.*set allow_pickle_models=true"):
        resolve_model(spec, build_config({"a": "resnet10t", "b": spec}), 10)
    resolved = resolve_model(spec, build_config({"a": "resnet10t", "b": spec, "allow_pickle_models": True}), 10)
    assert resolved.pickled and resolved.source == "mlflow"
    with torch.no_grad():
        assert resolved.module.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
