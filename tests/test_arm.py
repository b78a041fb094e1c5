"""Tests of lab/arm.py: the out-of-memory retry, and an arm's MLflow traffic.

    .venv/bin/python -m pytest tests/test_arm.py -q

An arm runs in this process (`run_arm`) against a real SQLite store under tmp_path, with a tiny network
in place of the timm model. Running out of GPU memory is simulated on the CPU: the network raises
`torch.cuda.OutOfMemoryError` for batches above a size, as CUDA's allocator would.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections import Counter
from typing import Any

import mlflow
import pandas as pd
import pytest
import torch
from torch import nn

from lab import arm, correctness
from lab.config import Config, build_config
from lab.models import ArmModule, ResolvedModel, preprocess_for

N_CLASSES = 4
MLFLOW_CALLS = ("log_metric", "log_batch", "set_tag", "log_param", "log_artifact", "log_artifacts",
                "set_terminated", "create_run", "log_inputs", "log_outputs")


class OomNet(nn.Module):
    """A small convnet that 'runs out of memory' on batches larger than `fits` in the stages named.

    Every failure first allocates a tensor that only the failing frame holds, as a real forward pass holds
    its activations; `leaked()` tells whether any of those outlived the failure into a later forward pass.
    """

    def __init__(self, fits: int, stages: tuple[str, ...] = ("test",), fail_from_call: int = 1):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, N_CLASSES))
        self.fits, self.stages, self.fail_from_call = fits, stages, fail_from_call
        self.calls: Counter = Counter()  # forward passes by (stage, batch size)
        self._held: list[weakref.ref] = []
        self.alive_at_next_call: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._held:
            self.alive_at_next_call += [ref() is not None for ref in self._held]
            self._held = []
        stage = "fit" if self.training else "test"
        self.calls[stage, x.shape[0]] += 1
        if stage in self.stages and x.shape[0] > self.fits and self.calls[stage, x.shape[0]] >= self.fail_from_call:
            activations = torch.empty(1 << 18)
            self._held.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} batches")
        return self.net(x)


def config(**overrides: Any) -> Config:
    values = {"data": "fake", "fake_samples": 40, "fake_classes": N_CLASSES, "image_size": 8, "epochs": 0,
              "allow_random_head": True, "a": "resnet10t", "b": "mobilenetv3_small_100", "batch_size": 16,
              "warmup_batches": 0, "lr": 0.05}
    return build_config(values | overrides)


def use_network(monkeypatch: pytest.MonkeyPatch, net: nn.Module) -> None:
    """Make every model spec resolve to `net`."""
    resolved = ResolvedModel(net, "oomnet", "timm", "test:oomnet", random_head=True, native=None)
    monkeypatch.setattr(arm, "resolve_model", lambda spec, cfg, num_classes: resolved)


def start_child(cfg: Config, experiment: str = "arm-tests") -> tuple[str, arm.ArmContext]:
    """A parent run in a new experiment and the first arm's child run, as the launcher would make them."""
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment_id = client.create_experiment(experiment)
    parent = client.create_run(experiment_id, tags={"ab.role": "parent"}).info.run_id
    ctx = arm.ArmContext(index=0, parent_run_id=parent, experiment_id=experiment_id)
    return arm.create_child_run(cfg, ctx), ctx


def logged_predictions(run_id: str) -> pd.DataFrame:
    from mlflow import MlflowClient

    return pd.read_parquet(MlflowClient().download_artifacts(run_id, "predictions/predictions.parquet"))


# ---- the out-of-memory retry ---------------------------------------------------------------------


def test_test_oom_halves_the_batch_until_it_fits_and_the_fit_is_not_repeated(
    tracking: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    cfg = config(epochs=1)  # 28 training images (2 batches of 16), 12 test images
    net = OomNet(fits=4, stages=("test",))
    use_network(monkeypatch, net)
    run_id, ctx = start_child(cfg)
    arm.run_arm(cfg, ctx, run_id)

    run = MlflowClient().get_run(run_id)
    assert run.data.tags["ab.batch_size_final"] == "4"  # 16 -> 8 -> 4
    assert run.data.tags["ab.oom_retry"] == "CUDA out of memory in test; batch size halved to 4"
    assert sum(n for (stage, _), n in net.calls.items() if stage == "fit") == 2  # one epoch, once
    assert net.calls["test", 12] == 1 and net.calls["test", 8] == 1 and net.calls["test", 4] == 3  # 12 images
    assert not any(net.alive_at_next_call)  # the failed try's tensors were freed before the retry

    predictions = logged_predictions(run_id)  # the failed tries left nothing behind
    assert sorted(predictions["sample_id"]) == sorted(set(predictions["sample_id"])) and len(predictions) == 12
    accuracy = (predictions["pred"] == predictions["label"]).mean()
    assert run.data.metrics["test_accuracy"] == pytest.approx(accuracy)
    confusion = MlflowClient().download_artifacts(run_id, "metrics/confusion_matrix.json")
    assert sum(map(sum, pd.read_json(confusion, typ="series")["matrix"])) == 12


def test_fit_oom_starts_again_from_the_initial_weights(tracking: str) -> None:
    """After one optimizer step at batch 16, the fit runs out of memory; the retry at batch 8 must end
    exactly where a fit that started at batch 8 ends."""
    cfg = config(epochs=1, fake_samples=60)  # 42 training images
    ctx = arm.ArmContext(index=0, parent_run_id="", experiment_id="")

    def fitted_weights(net: OomNet, batch_size: int, notes: list[str]) -> dict[str, torch.Tensor]:
        import lightning as L

        L.seed_everything(cfg.seed, verbose=False)
        module = ArmModule(net, N_CLASSES, cfg.lr, cfg.weight_decay, cfg.epochs)
        run_cfg = dataclasses.replace(cfg, batch_size=batch_size)
        result = arm.fit_and_test(run_cfg, ctx, module, preprocess_for(run_cfg, None), False, on_retry=notes.append)
        assert result.batch_size == 8 and module.predictions is not None and len(module.predictions) == 18
        return {k: v.clone() for k, v in net.state_dict().items()}

    torch.manual_seed(0)
    failing = OomNet(fits=8, stages=("fit",), fail_from_call=2)
    start = {k: v.clone() for k, v in failing.state_dict().items()}
    notes: list[str] = []
    retried = fitted_weights(failing, 16, notes)
    assert notes == ["CUDA out of memory in fit; batch size halved to 8"]
    assert failing.calls["fit", 16] == 2  # one step taken, then out of memory

    clean = OomNet(fits=8, stages=())
    clean.load_state_dict(start)
    direct = fitted_weights(clean, 8, [])
    assert any(not torch.equal(start[k], direct[k]) for k in start)  # the fit did change the weights
    for key in start:
        torch.testing.assert_close(retried[key], direct[key], msg=key)


def test_other_errors_and_oom_at_the_smallest_batch_are_not_retried(tracking: str) -> None:
    ctx = arm.ArmContext(index=0, parent_run_id="", experiment_id="")
    cfg = config(batch_size=1)
    notes: list[str] = []
    module = ArmModule(OomNet(fits=0), N_CLASSES)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        arm.fit_and_test(cfg, ctx, module, preprocess_for(cfg, None), False, on_retry=notes.append)

    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("not a memory problem")

    cfg = config()
    with pytest.raises(ValueError, match="not a memory problem"):
        arm.fit_and_test(cfg, ctx, ArmModule(Broken(), N_CLASSES), preprocess_for(cfg, None), False,
                         on_retry=notes.append)
    assert notes == []


# ---- MLflow traffic ----------------------------------------------------------------------------


def count_mlflow_calls(monkeypatch: pytest.MonkeyPatch, counts: Counter) -> None:
    """Count every write an MlflowClient makes, from any instance (the arm's and the MLFlowLogger's)."""
    from mlflow import MlflowClient

    for name in MLFLOW_CALLS:
        method = getattr(MlflowClient, name)

        def counted(self: Any, *args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
            counts[_name] += 1
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(MlflowClient, name, counted)


def test_an_arm_makes_the_same_mlflow_calls_whatever_the_number_of_batches(
    tracking: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ArmModule, GPUTelemetry and the predictions artifact: 2 or 12 test batches, the same calls."""
    calls = {}
    for n_test in (8, 48):
        cfg = config(fake_samples=round(n_test / 0.3), batch_size=4, warmup_batches=1)
        use_network(monkeypatch, OomNet(fits=1000))
        run_id, ctx = start_child(cfg, experiment=f"calls-{n_test}")
        counts: Counter = Counter()
        with monkeypatch.context() as patch:
            count_mlflow_calls(patch, counts)
            arm.run_arm(cfg, ctx, run_id)
        assert len(logged_predictions(run_id)) == n_test
        bits = correctness.from_json(mlflow.artifacts.load_text(f"runs:/{run_id}/{correctness.ARTIFACT}"))
        assert (bits.correct == correctness.from_predictions(logged_predictions(run_id)).correct).all()
        calls[n_test] = dict(counts)
    assert calls[8] == calls[48]
    # params+tags, hyperparameters, test_accuracy, telemetry summary, tags and series, per-class metrics; the
    # lineage: dataset inputs, the external model (its output, tags), the metrics linked to it and the test set
    assert calls[8]["log_batch"] <= 9 and calls[8]["log_inputs"] == calls[8]["log_outputs"] == 1, calls[8]
    assert sum(calls[8].values()) <= 14, calls[8]


# ---- lineage: datasets, the logged model, linked metrics ---------------------------------------------------


def test_a_fine_tuned_arm_logs_its_splits_and_a_pt2_model_that_reloads_with_its_preprocessing(
    tracking: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from lab.data import resolve_dataset
    from lab.lineage import digest
    from lab.models import resolve_model

    cfg = config(epochs=1)
    net = OomNet(fits=1000).net  # without the out-of-memory bookkeeping, which torch.export cannot trace
    use_network(monkeypatch, net)
    run_id, ctx = start_child(cfg)
    arm.run_arm(cfg, ctx, run_id)
    client = MlflowClient()
    run = client.get_run(run_id)
    info = resolve_dataset(cfg)
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"test", "train"} and inputs["test"].digest == digest(info.fingerprint)
    assert inputs["test"].name == "fake" and inputs["train"].digest != inputs["test"].digest
    assert '"num_samples": 12' in inputs["test"].profile and '"num_classes": 4' in inputs["test"].profile
    tags = run.data.tags
    assert tags["ab.logged_model_format"] == "pt2"
    model = client.get_logged_model(tags["ab.logged_model"])
    assert (model.name, model.source_run_id, str(model.status)) == ("model", run_id, "READY")
    linked = {m.key: m for m in model.metrics}
    assert linked["test_accuracy"].value == run.data.metrics["test_accuracy"]
    assert linked["test_accuracy"].dataset_digest == digest(info.fingerprint)
    assert {"latency_ms_p50", "throughput_img_per_s", "cpu_rss_peak_mb"} <= set(linked)

    # Its signature: a batch of images in, one logit per class out (what MLflow would infer, without its slow path).
    signature = mlflow.models.get_model_info(f"models:/{model.model_id}").signature.to_dict()
    assert '"shape": [-1, 3, 8, 8]' in signature["inputs"] and f'"shape": [-1, {N_CLASSES}]' in signature["outputs"]
    assert '"dtype": "float32"' in signature["outputs"]

    reloaded = resolve_model(f"runs:/{run_id}/model", config(preprocess="native"), N_CLASSES)
    assert reloaded.native == preprocess_for(cfg, None) and reloaded.identity.startswith("sha256:")
    x = torch.randn(3, 3, 8, 8)
    with torch.inference_mode():
        assert torch.equal(reloaded.module(x), net.eval()(x))


def test_log_model_false_links_an_external_model_without_weights(tracking: str, monkeypatch) -> None:
    from mlflow import MlflowClient

    cfg = config(epochs=1, log_model=False)
    use_network(monkeypatch, OomNet(fits=1000))
    run_id, ctx = start_child(cfg)
    arm.run_arm(cfg, ctx, run_id)
    client = MlflowClient()
    tags = client.get_run(run_id).data.tags
    model = client.get_logged_model(tags["ab.logged_model"])
    assert tags["ab.logged_model_format"] == "external" and model.name == "oomnet"
    assert model.tags["ablab.weights"] == "not logged (log_model=false)"
    assert model.tags["ablab.identity"] == "test:oomnet"
    assert [f.path for f in client.list_logged_model_artifacts(model.model_id)] == ["MLmodel"]  # MLflow's stub


def test_a_model_that_torch_export_cannot_trace_is_logged_as_safetensors_and_says_why(tracking: str,
                                                                                      monkeypatch) -> None:
    from mlflow import MlflowClient

    cfg = config(epochs=1)
    use_network(monkeypatch, OomNet(fits=1000))  # counts its calls in a dict keyed by the batch size: untraceable
    run_id, ctx = start_child(cfg)
    arm.run_arm(cfg, ctx, run_id)
    client = MlflowClient()
    tags = client.get_run(run_id).data.tags
    model = client.get_logged_model(tags["ab.logged_model"])
    assert tags["ab.logged_model_format"] == "safetensors" and str(model.status) == "READY"
    assert model.tags["ablab.format"].startswith("safetensors (pt2 export failed: ")
    files = {f.path for f in client.list_logged_model_artifacts(model.model_id)}
    assert files == {"model.safetensors", "extra_files"}


def test_past_50_classes_the_confusion_matrix_is_sparse_parquet(tracking: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dense k x k JSON grows as k squared (4 MB at 1,000 classes): past 50 classes the arm logs the non-zero
    cells, which must add up to the same counts as the predictions."""
    from mlflow import MlflowClient

    classes = 60
    cfg = config(fake_classes=classes, fake_samples=200, test_fraction=0.5)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes))
    use_network(monkeypatch, net)
    run_id, ctx = start_child(cfg)
    arm.run_arm(cfg, ctx, run_id)
    listed = {f.path for f in MlflowClient().list_artifacts(run_id, "metrics")}
    assert "metrics/confusion.parquet" in listed and "metrics/confusion_matrix.json" not in listed
    cells = pd.read_parquet(MlflowClient().download_artifacts(run_id, "metrics/confusion.parquet"))
    predictions = logged_predictions(run_id)
    expected = predictions.groupby(["label", "pred"]).size()
    assert cells.set_index(["label", "pred"])["count"].sort_index().equals(expected.sort_index().rename("count"))
    assert (cells["count"] > 0).all() and cells["count"].sum() == len(predictions) == 100
