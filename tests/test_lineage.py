"""lab/lineage.py: datasets, logged models and linked metrics as MLflow records, against a SQLite store.

    .venv/bin/python -m pytest tests/test_lineage.py -q

The arm that logs them is tested in tests/test_arm.py, a whole job in tests/test_e2e.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from lab import lineage
from lab.config import build_config

FINGERPRINT = "sha256:" + "2a5a" * 8
CLASSES = tuple(str(i) for i in range(10))


def test_digest_and_name_of_a_dataset() -> None:
    assert lineage.digest(FINGERPRINT) == "2a5a" * 8
    assert lineage.dataset_name("digits") == "digits"
    assert lineage.dataset_name("imagefolder:/data/pets/") == "imagefolder:pets"


@pytest.mark.parametrize(("data", "source_type", "where"), [
    ("digits", "http", "scikit-learn.org"),
    ("cifar10", "http", "cs.toronto.edu"),
    ("fake", "code", "ablab fake"),
    ("imagefolder:/data/pets", "local", "/data/pets"),
])
def test_a_split_names_its_source_classes_and_size(data: str, source_type: str, where: str) -> None:
    ds = lineage.split_dataset(build_config({"data": data}), FINGERPRINT, 539, CLASSES)
    entity = ds._to_mlflow_entity()
    assert (entity.name, entity.digest, entity.source_type) == (lineage.dataset_name(data), "2a5a" * 8, source_type)
    assert where in entity.source
    assert json.loads(entity.profile) == {"num_samples": 539, "num_classes": 10, "classes": list(CLASSES)}
    assert [c["name"] for c in json.loads(entity.schema)["mlflow_colspec"]] == ["sample_id", "label", "image"]


def test_runs_sharing_a_test_set_are_found_by_its_digest(tracking: str) -> None:
    """MLflow's dataset search (`dataset.digest = ...`) finds the parent and its children, and only them."""
    client = mlflow.MlflowClient()
    exp = client.create_experiment("e")
    cfg = build_config({})
    test = lineage.split_dataset(cfg, FINGERPRINT, 539, CLASSES)
    other = lineage.split_dataset(cfg, "sha256:" + "77d0" * 8, 539, CLASSES)
    parent, a, b, elsewhere = (client.create_run(exp).info.run_id for _ in range(4))
    for child in (a, b):
        lineage.log_datasets(client, child, {"test": test, "train": other})
    lineage.log_datasets(client, elsewhere, {"test": other})
    assert lineage.copy_test_input(client, a, parent)
    assert not lineage.copy_test_input(client, client.create_run(exp).info.run_id, parent)  # nothing to copy

    found = mlflow.search_runs([exp], filter_string=f"dataset.digest = '{lineage.digest(FINGERPRINT)}'",
                               output_format="list")
    assert {r.info.run_id for r in found} == {parent, a, b}
    # A split logged for training in one run and for testing in another: the digest finds both uses.
    other_uses = mlflow.search_runs([exp], output_format="list", filter_string="dataset.digest = '" + "77d0" * 8 + "'")
    assert {r.info.run_id for r in other_uses} == {a, b, elsewhere}
    [copied] = client.get_run(parent).inputs.dataset_inputs
    assert (copied.dataset.digest, copied.tags[0].value) == ("2a5a" * 8, "test")


def test_a_stored_model_is_ready_and_found_by_runs_uri(tracking: str) -> None:
    client = mlflow.MlflowClient()
    exp = client.create_experiment("e")
    run_id = client.create_run(exp).info.run_id
    records = []

    def write(folder: Path, record) -> str:
        records.append(record)
        (folder / "extra_files").mkdir(parents=True)
        (folder / "extra_files" / "ablab_spec.json").write_text('{"arch": "resnet18"}')
        return "safetensors (pt2 export failed: why)"

    model_id, fmt = lineage.log_stored_model(client, run_id, exp, write, {"ablab.arch": "resnet18"})
    model = client.get_logged_model(model_id)
    assert (model.name, model.experiment_id, model.source_run_id, str(model.status)) == ("model", exp, run_id, "READY")
    assert model.tags["ablab.format"] == fmt == "safetensors (pt2 export failed: why)"
    assert records[0].model_id == model_id and records[0].run_id == run_id
    assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [model_id]
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model"))
    assert json.loads((local / "extra_files" / "ablab_spec.json").read_text()) == {"arch": "resnet18"}


def test_metrics_are_linked_to_the_model_and_the_test_set(tracking: str) -> None:
    """What the experiment's Models view lists: each model with its metrics on each dataset."""
    client = mlflow.MlflowClient()
    exp = client.create_experiment("e")
    run_id = client.create_run(exp).info.run_id
    test = lineage.split_dataset(build_config({}), FINGERPRINT, 539, CLASSES)
    model_id = lineage.link_external_model(client, run_id, exp, "resnet18", {"ablab.pretrained": "true"})
    lineage.log_linked_metrics(client, run_id, {"test_accuracy": 0.9, "latency_ms_p50": float("nan")}, model_id,
                               test)
    [metric] = client.get_logged_model(model_id).metrics
    assert (metric.key, metric.value, metric.dataset_name, metric.dataset_digest) == (
        "test_accuracy", 0.9, "digits", "2a5a" * 8)
    assert client.get_run(run_id).data.metrics == {"test_accuracy": 0.9}
    on_test = client.search_logged_models([exp], datasets=[{"dataset_name": "digits", "dataset_digest": "2a5a" * 8}])
    assert [m.model_id for m in on_test] == [model_id]
    assert client.get_logged_model(model_id).tags["mlflow.model.isExternal"] == "true"


def test_the_logged_model_behind_an_mlflow_spec(tracking: str) -> None:
    client = mlflow.MlflowClient()
    exp = client.create_experiment("e")
    run_id = client.create_run(exp).info.run_id
    model_id, _ = lineage.log_stored_model(client, run_id, exp, lambda folder, record: folder.mkdir() or "pt2", {})
    client.create_registered_model("clf")
    client.create_model_version("clf", f"models:/{model_id}", run_id=run_id, model_id=model_id)
    client.create_model_version("clf", "file:///elsewhere")
    assert lineage.source_model_id(client, "models:/clf@x", "models:/clf/1") == model_id
    assert lineage.source_model_id(client, "models:/clf/2", "models:/clf/2") is None  # registered from a path
    assert lineage.source_model_id(client, f"models:/{model_id}", "sha256:0") == model_id
    assert lineage.source_model_id(client, f"runs:/{run_id}/model", "sha256:0") == model_id
    assert lineage.source_model_id(client, "models:/clf/9", "models:/clf/9") is None  # no such version
