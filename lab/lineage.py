"""MLflow lineage of an evaluation: the test (and training) split as MLflow dataset inputs, each arm's model as a
logged model, and the arm's headline metrics linked to both, so that MLflow's dataset search and the experiment's
Models view find every evaluation of a test set.

    test = split_dataset(cfg, info.fingerprint, len(info.test), info.class_names)
    log_datasets(client, run_id, {"test": test})
    model_id = log_stored_model(client, run_id, experiment_id, write, tags)      # fine-tuned weights
    log_linked_metrics(client, run_id, {"test_accuracy": 0.93}, model_id, test)

A dataset's digest is the fingerprint's hex part, so `dataset.digest = '<hex>'` in `mlflow.search_runs` finds
the parent and children of every job on that test set.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lab.config import Config

# Where each built-in dataset comes from (the dataset's `source` in the MLflow UI).
_SOURCES = {
    "digits": "https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
MODEL_NAME = "model"  # the logged model's name: `runs:/<child run id>/model` finds it
LINKED_METRICS = ("test_accuracy", "latency_ms_p50", "throughput_img_per_s", "gpu_mem_peak_mb", "cpu_rss_peak_mb")
MAX_CLASSES_LISTED = 100


def digest(fingerprint: str) -> str:
    """The dataset digest of a fingerprint: its hex part (32 characters; MLflow keeps digests to 36)."""
    return fingerprint.removeprefix("sha256:")[:36]


def dataset_name(data: str) -> str:
    """`digits`, `cifar10`, or `imagefolder:<folder name>` (the folder, not its whole path)."""
    kind, _, arg = data.partition(":")
    return f"{kind}:{Path(arg).expanduser().resolve().name}" if kind == "imagefolder" else data


def _source(data: str, seed: int):
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.sources import LocalArtifactDatasetSource

    kind, _, arg = data.partition(":")
    if kind == "imagefolder":
        return LocalArtifactDatasetSource(str(Path(arg).expanduser().resolve()))
    if kind in _SOURCES:
        return HTTPDatasetSource(_SOURCES[kind])
    return CodeDatasetSource({"generator": f"ablab {kind}", "seed": str(seed)})


def split_dataset(cfg: Config, fingerprint: str, n: int, class_names: tuple[str, ...] | None,
                  num_classes: int | None = None):
    """One split as an MLflow dataset: name, digest from the fingerprint, source, and a schema and profile with
    the number of samples and the classes."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types.schema import ColSpec, Schema

    classes = list(class_names or ())
    profile = {"num_samples": int(n), "num_classes": int(num_classes or len(classes))}
    if classes:
        profile["classes"] = classes[:MAX_CLASSES_LISTED]

    class _Split(MetaDataset):  # MetaDataset has no profile of its own
        @property
        def profile(self) -> dict[str, Any]:
            return profile

        def to_dict(self) -> dict[str, str]:
            return super().to_dict() | {"profile": json.dumps(profile)}

    schema = Schema([ColSpec("long", "sample_id"), ColSpec("long", "label"), ColSpec("binary", "image")])
    return _Split(_source(cfg.data, cfg.seed), name=dataset_name(cfg.data), digest=digest(fingerprint),
                  schema=schema)


def log_datasets(client, run_id: str, datasets: dict[str, Any]) -> None:
    """Log `{context: dataset}` (`test`, `train`) as the run's dataset inputs in one call."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = [DatasetInput(ds._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)])
              for context, ds in datasets.items()]
    try:
        client.log_inputs(run_id, datasets=inputs)
    except Exception as err:  # arms started at once insert the same new dataset; the loser's retry links the winner's
        if "unique" not in str(err).lower():
            raise
        client.log_inputs(run_id, datasets=inputs)


def copy_test_input(client, source_run_id: str, run_id: str) -> bool:
    """Log another run's `test` dataset input on `run_id` (a parent names its children's test set); False when
    the source has none (a run from before ablab logged datasets)."""
    from mlflow.entities import DatasetInput
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = client.get_run(source_run_id).inputs
    for item in inputs.dataset_inputs if inputs else []:
        if any(t.key == MLFLOW_DATASET_CONTEXT and t.value == "test" for t in item.tags):
            client.log_inputs(run_id, datasets=[DatasetInput(item.dataset, item.tags)])
            return True
    return False


def log_stored_model(client, run_id: str, experiment_id: str, write: Callable[[Path, Any], str],
                     tags: dict[str, str]) -> tuple[str, str]:
    """A logged model named `model` of the run, filled by `write(folder, mlflow_model) -> format`.

    Returns (model_id, format). The model is READY once its files are uploaded; its format and, where export
    failed, why, are tags (`ablab.format`).
    """
    import mlflow
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    logged = mlflow.initialize_logged_model(name=MODEL_NAME, source_run_id=run_id, experiment_id=experiment_id,
                                            tags=tags, model_type="ablab")
    with tempfile.TemporaryDirectory(prefix="ablab-model-") as tmp:
        folder = Path(tmp) / MODEL_NAME
        record = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id,
                       model_id=logged.model_id)
        fmt = write(folder, record)
        client.log_model_artifacts(logged.model_id, str(folder))
    client.set_logged_model_tags(logged.model_id, {"ablab.format": fmt[:5000]})
    mlflow.finalize_logged_model(logged.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return logged.model_id, fmt


def link_external_model(client, run_id: str, experiment_id: str, name: str, tags: dict[str, str]) -> str:
    """An external logged model for an arm whose weights live elsewhere (a timm name and its pretrained tag, a
    checkpoint file), so the Models view lists it with its metrics. Returns its model id."""
    import mlflow
    from mlflow.entities import LoggedModelOutput

    logged = mlflow.create_external_model(name=name.replace("/", "_")[:100] or MODEL_NAME, source_run_id=run_id,
                                          tags=tags, model_type="ablab", experiment_id=experiment_id)
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return logged.model_id


def source_model_id(client, spec: str, identity: str) -> str | None:
    """The logged model behind an MLflow model spec: a registry version's, `models:/m-<id>` itself, or the model
    named in `runs:/<run id>/<name>`; None where there is none (a version registered from a plain path)."""
    from mlflow.exceptions import MlflowException

    try:
        if spec.startswith("models:/m-"):
            return spec.removeprefix("models:/").split("/")[0]
        if identity.startswith("models:/"):
            name, _, version = identity.removeprefix("models:/").partition("/")
            mv = client.get_model_version(name, version)
            # SQL stores leave model_id unset; the source of a version registered from a logged model names it.
            return mv.model_id or (mv.source.removeprefix("models:/") if mv.source.startswith("models:/m-") else None)
        if spec.startswith("runs:/"):
            run_id, _, name = spec.removeprefix("runs:/").partition("/")
            experiment_id = client.get_run(run_id).info.experiment_id
            found = client.search_logged_models([experiment_id], filter_string=f"name = '{name.split('/')[0]}'")
            return next((m.model_id for m in found if m.source_run_id == run_id), None)
    except MlflowException:  # a lineage link is a nicety: the arm's numbers stand without it
        return None
    return None


def log_linked_metrics(client, run_id: str, metrics: dict[str, float], model_id: str, dataset) -> None:
    """The arm's headline metrics once more, linked to its logged model and the test dataset (the Models view
    shows them per model and dataset; the run's own values do not change)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0, model_id=model_id, dataset_name=dataset.name, dataset_digest=dataset.digest)
             for k, v in metrics.items() if v is not None and np.isfinite(v)]
    if batch:
        client.log_batch(run_id, metrics=batch)


def link_input_model(client, run_id: str, model_id: str) -> None:
    """A logged model from elsewhere (a registry version's) that this run evaluated, as the run's model input."""
    from mlflow.entities import LoggedModelInput

    client.log_inputs(run_id, models=[LoggedModelInput(model_id)])
