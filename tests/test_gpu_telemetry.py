"""Tests of callbacks/gpu_telemetry.py: the pure helpers, and the callback in a real Trainer.

    .venv/bin/python -m pytest tests/test_gpu_telemetry.py -q

The callback runs in a real Trainer on the CPU and logs to a real MLflow SQLite store. The test marked
``gpu`` runs only where CUDA is, with the real NVML (tests/test_nvml.py covers the NVML helpers with a fake).
"""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import MLFlowLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import nvml as nv
from callbacks.gpu_telemetry import (
    GPUTelemetry,
    batch_size_of,
    latency_percentiles,
    latency_summary,
    metric_key,
    nearest_indices,
)

BATCH = 2
MLFLOW_CALLS = ("log_metric", "log_batch", "set_tag", "log_artifact", "log_artifacts")


# ---- fixtures: a tiny classifier and data ---------------------------------------------------


class TinyNet(LightningModule):
    """Two conv layers; test_step returns nothing, as the arms' modules do."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 2, 3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        images, _labels, _ids = batch
        self(images)


def make_loader(n_batches: int, batch_size: int = BATCH) -> DataLoader:
    n = n_batches * batch_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 8, 8, generator=generator)
    labels = torch.randint(0, 2, (n,), generator=generator)
    return DataLoader(TensorDataset(images, labels, torch.arange(n)), batch_size=batch_size)


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """One SQLite tracking store for the module (creating one costs seconds) and an artifact root."""
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root}/mlflow.db", str(root / "artifacts")


def counting(method: Any, name: str, counts: Counter) -> Any:
    """Wrap a client method so that each call is counted, then made."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        counts[name] += 1
        return method(*args, **kwargs)

    return wrapper


def run_telemetry(
    tracking: tuple[str, str], n_batches: int, monkeypatch: pytest.MonkeyPatch, **kwargs: Any
) -> tuple[GPUTelemetry, str, Counter]:
    """trainer.test on the CPU with GPUTelemetry; returns it, the run id and MLflow calls counted."""
    uri, artifacts = tracking
    logger = MLFlowLogger(experiment_name="telemetry", tracking_uri=uri, artifact_location=artifacts)
    client = logger.experiment  # creates the run, so only the calls made during the test are counted
    counts: Counter = Counter()
    for name in MLFLOW_CALLS:
        monkeypatch.setattr(client, name, counting(getattr(client, name), name, counts))
    telemetry = GPUTelemetry(**kwargs)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        limit_test_batches=n_batches,
        logger=logger,
        callbacks=[telemetry],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.test(TinyNet(), dataloaders=make_loader(n_batches))
    return telemetry, logger.run_id, counts


# ---- pure helpers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [  # by hand: sorted x, h = (n - 1) q, x[floor h] + (h - floor h) (x[floor h + 1] - x[floor h])
        ([5.0], (5.0, 5.0, 5.0)),
        ([1.0, 2.0], (1.5, 1.9, 1.99)),
        ([3.0, 1.0, 2.0, 10.0], (2.5, 7.9, 9.79)),  # sorted 1 2 3 10; h = 1.5, 2.7, 2.97
    ],
)
def test_latency_percentiles_by_hand(values: list[float], expected: tuple[float, float, float]) -> None:
    got = latency_percentiles(values)
    assert list(got) == ["latency_ms_p50", "latency_ms_p90", "latency_ms_p99"]
    np.testing.assert_allclose(list(got.values()), expected, rtol=1e-12)


def test_latency_percentiles_match_the_standard_library() -> None:
    """statistics.quantiles(method="inclusive") is the same definition (Hyndman and Fan's type 7), coded apart."""
    values = list(np.random.default_rng(0).exponential(4.0, 101))
    cuts = statistics.quantiles(values, n=100, method="inclusive")  # cuts[k - 1] is the k-th percentile
    got = latency_percentiles(values)
    np.testing.assert_allclose([got[f"latency_ms_p{q}"] for q in (50, 90, 99)], [cuts[49], cuts[89], cuts[98]])


def test_latency_percentiles_known_values_and_bad_input() -> None:
    got = latency_percentiles([10.0, 20.0, 30.0, 40.0, 50.0])
    np.testing.assert_allclose(list(got.values()), [30.0, 46.0, 49.6])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        latency_percentiles([])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        latency_percentiles([[1.0, 2.0]])


def test_latency_summary_arithmetic() -> None:
    summary = latency_summary([10.0, 20.0], [2, 4])
    assert summary["latency_ms_mean"] == 15.0
    assert summary["latency_ms_per_img"] == 5.0  # mean batch latency / mean batch size
    np.testing.assert_allclose(summary["throughput_img_per_s"], 6 / 0.030)
    assert summary["n_batches_measured"] == 2
    with pytest.raises(ValueError, match="one batch size per latency"):
        latency_summary([1.0], [1, 2])


def test_metric_keys_carry_units() -> None:
    assert metric_key("latency", "ms", "p50") == "latency_ms_p50"
    assert metric_key("throughput", "img_per_s") == "throughput_img_per_s"
    samples = [nv.NvmlSample(0.0, 50.0, 1000.0, 300.0, 60.0, 1980.0)] * 2
    keys = [*latency_summary([1.0, 2.0], [2, 2]), *nv.summarise_samples(samples)]
    keys += ["gpu_mem_peak_mb", "gpu_mem_reserved_peak_mb", "cpu_rss_peak_mb", "energy_j_per_img"]
    units = ("_ms", "_img_per_s", "_mb", "_pct", "_w", "_c", "_mhz", "_j_per_img")
    for key in keys:
        assert key.startswith("n_") or any(unit in key for unit in units), key
    assert sorted(nv.summarise_samples(samples)) == sorted(
        [
            "gpu_util_pct_mean",
            "gpu_mem_used_mb_max",
            "gpu_power_w_mean",
            "gpu_temp_c_max",
            "gpu_sm_clock_mhz_mean",
        ]
    )


def test_batch_size_of_tuple_dict_and_tensor() -> None:
    images = torch.zeros(3, 3, 4, 4)
    assert batch_size_of((images, torch.zeros(3), torch.arange(3))) == 3
    assert batch_size_of([images]) == 3
    assert batch_size_of({"ids": [0, 1], "images": images}) == 3
    assert batch_size_of(images) == 3


def test_nearest_indices() -> None:
    got = nearest_indices([0.0, 1.0, 2.0, 3.0], [-1.0, 0.4, 0.6, 2.5, 2.51, 9.0])
    np.testing.assert_array_equal(got, [0, 0, 1, 2, 3, 3])


# ---- the callback in a real Trainer, logging to a real MLflow store ----------------------------


def test_cpu_run_logs_metrics_tags_series_and_table(
    tracking: tuple[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    telemetry, run_id, _ = run_telemetry(tracking, 6, monkeypatch, warmup_batches=2)
    client = MlflowClient(tracking[0])
    run = client.get_run(run_id)
    metrics, tags = run.data.metrics, run.data.tags

    assert metrics["latency_ms_p50"] <= metrics["latency_ms_p90"] <= metrics["latency_ms_p99"]
    assert metrics["latency_ms_mean"] > 0 and metrics["latency_ms_per_img"] > 0
    assert metrics["throughput_img_per_s"] > 0
    assert metrics["n_batches_measured"] == 4  # 6 batches, 2 warm-up
    assert metrics["cpu_rss_peak_mb"] > 10
    assert not any(key.startswith("gpu_") for key in metrics)
    assert {key: metrics[key] for key in telemetry.summary} == pytest.approx(telemetry.summary)
    assert tags["ab.device"].startswith("cpu:") and tags["ab.latency_mode"] == "cpu_monotonic"
    assert tags["ab.torch_version"] == torch.__version__ and int(tags["ab.cpu_threads"]) >= 1
    assert tags["ab.warmup_batches_excluded"] == "2" and tags["ab.nvml"] == "not used: cpu"

    history = client.get_metric_history(run_id, "batch_latency_ms")
    assert sorted(m.step for m in history) == list(range(6))

    path = client.download_artifacts(run_id, "telemetry/batches.parquet", str(tmp_path))
    table = pd.read_parquet(path)
    assert len(table) == 6 and list(table["batch_idx"]) == list(range(6))
    assert list(table["warmup"]) == [True, True, False, False, False, False]
    assert (table["batch_size"] == BATCH).all() and (table["latency_ms"] > 0).all()
    assert table["gpu_util_pct"].isna().all() and table["gpu_sm_clock_mhz"].isna().all()
    measured = table.loc[~table["warmup"], "latency_ms"]
    assert metrics["latency_ms_p50"] == pytest.approx(np.percentile(measured, 50))
    assert metrics["throughput_img_per_s"] == pytest.approx(4 * BATCH / (measured.sum() / 1000))


def test_mlflow_calls_do_not_grow_with_batches(
    tracking: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    short, _, short_calls = run_telemetry(tracking, 4, monkeypatch, warmup_batches=5)
    long, _, long_calls = run_telemetry(tracking, 40, monkeypatch, warmup_batches=5)
    assert short_calls == long_calls
    # summary + tags + one chunk of the series; one artifact; nothing per batch
    assert long_calls == Counter(log_batch=3, log_artifact=1)
    # A run no longer than the warm-up keeps every batch and says so.
    assert short.summary["n_batches_measured"] == 4 and not short.batches["warmup"].any()
    assert "all kept" in short.tags["ab.warmup_note"] and short.tags["ab.warmup_batches_excluded"] == "0"
    assert long.summary["n_batches_measured"] == 35 and long.batches["warmup"].sum() == 5


def test_bad_arguments_raise_at_setup() -> None:
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="sample_interval_s"):
        GPUTelemetry(sample_interval_s=0.5).setup(trainer, TinyNet(), "test")
    with pytest.raises(ValueError, match="warmup_batches"):
        GPUTelemetry(warmup_batches=-1).setup(trainer, TinyNet(), "test")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sync", [False, True])
def test_gpu_run_with_real_nvml(sync: bool) -> None:
    pytest.importorskip("pynvml")
    telemetry = GPUTelemetry(warmup_batches=2, sync=sync, sample_interval_s=0.02)
    trainer = Trainer(
        accelerator="gpu",
        devices=1,
        limit_test_batches=20,
        logger=False,
        callbacks=[telemetry],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.test(TinyNet(), dataloaders=make_loader(20, batch_size=64))
    summary, tags, table = telemetry.summary, telemetry.tags, telemetry.batches
    assert tags["ab.latency_mode"] == ("sync_wall" if sync else "cuda_events")
    assert tags["ab.device"].startswith("cuda:") and tags["ab.nvml"] == "ok", tags
    assert tags["ab.gpu_uuid"].startswith("GPU-") and tags["ab.driver_version"] != "unknown"
    assert summary["n_batches_measured"] == 18 and summary["throughput_img_per_s"] > 0
    assert summary["latency_ms_p50"] <= summary["latency_ms_p90"] <= summary["latency_ms_p99"]
    assert (
        summary["gpu_mem_peak_mb"] > 0 and summary["gpu_mem_reserved_peak_mb"] >= summary["gpu_mem_peak_mb"]
    )
    for key in ("gpu_util_pct_mean", "gpu_mem_used_mb_max", "gpu_temp_c_max", "gpu_sm_clock_mhz_mean"):
        assert key in summary, (key, summary)
    assert summary.get("energy_j_per_img", 0.0) >= 0
    assert table["gpu_mem_used_mb"].notna().all() and (table["latency_ms"] > 0).all()
    print(tags, summary, table.head(), sep="\n")
