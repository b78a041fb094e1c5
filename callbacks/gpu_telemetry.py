"""GPUTelemetry: per-batch latency, throughput, memory and NVML readings of a ``trainer.test`` run.

    trainer = Trainer(callbacks=[GPUTelemetry(warmup_batches=5)], logger=MLFlowLogger(...))
    trainer.test(module, datamodule)
    telemetry.summary   # {"latency_ms_p50": ..., "throughput_img_per_s": ..., ...}
    telemetry.batches   # one row per test batch

On a GPU each batch is timed by a pair of CUDA events (no per-batch synchronize: the events are read
once at the end); ``sync=True`` instead synchronizes around each batch and times it with the host
clock (end to end). On the CPU the host's monotonic clock is used. A background thread samples the
GPU through NVML. Everything is logged once, at the end of the test, on rank zero.
"""

from __future__ import annotations

import math
import os
import platform
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from typing_extensions import override

from callbacks import nvml as nv
from callbacks import ranks

PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0)
MIB = 2**20
MLFLOW_BATCH_LIMIT = 1000  # metrics per MlflowClient.log_batch call
SERIES_KEY = "batch_latency_ms"
ARTIFACT_DIR = "telemetry"


# ---- pure helpers ---------------------------------------------------------------------------


def metric_key(quantity: str, unit: str, stat: str = "") -> str:
    """Metric names carry their unit: ``metric_key("latency", "ms", "p50") == "latency_ms_p50"``."""
    return "_".join(part for part in (quantity, unit, stat) if part)


def percentile_key(q: float) -> str:
    return metric_key("latency", "ms", f"p{q:g}")


def latency_percentiles(latencies_ms: Sequence[float] | np.ndarray) -> dict[str, float]:
    """p50/p90/p99 of batch latencies with numpy's "linear" interpolation, keyed ``latency_ms_p<q>``."""
    values = np.asarray(latencies_ms, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"latencies_ms must be a non-empty 1-D sequence, got shape {values.shape}")
    return {percentile_key(q): float(np.percentile(values, q, method="linear")) for q in PERCENTILES}


def latency_summary(latencies_ms: Sequence[float], batch_sizes: Sequence[int]) -> dict[str, float]:
    """Percentiles, mean, per-image latency and throughput of the measured (post-warm-up) batches."""
    lat = np.asarray(latencies_ms, dtype=float)
    sizes = np.asarray(batch_sizes, dtype=float)
    if lat.shape != sizes.shape:
        raise ValueError(f"one batch size per latency expected, got {sizes.shape} and {lat.shape}")
    summary = latency_percentiles(lat)
    summary[metric_key("latency", "ms", "mean")] = float(lat.mean())
    summary[metric_key("latency", "ms", "per_img")] = float(lat.mean() / sizes.mean())
    summary[metric_key("throughput", "img_per_s")] = float(sizes.sum() / (lat.sum() / 1000.0))
    summary["n_batches_measured"] = float(lat.size)
    return summary


def batch_size_of(batch: Any) -> int:
    """Images in a batch: ``batch[0].shape[0]`` of a tuple/list, the first tensor of a dict."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return int(batch[0].shape[0])
    if isinstance(batch, Mapping):
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                return int(value.shape[0])
    return int(extract_batch_size(batch))


def nearest_indices(sample_times: Sequence[float], query_times: Sequence[float]) -> np.ndarray:
    """For each query time, the index of the nearest sample time (sample_times sorted ascending)."""
    samples = np.asarray(sample_times, dtype=float)
    queries = np.asarray(query_times, dtype=float)
    right = np.clip(np.searchsorted(samples, queries), 1, len(samples) - 1)
    left = right - 1
    return np.where(queries - samples[left] <= samples[right] - queries, left, right)


def reset_peak_rss(clear_refs: str = "/proc/self/clear_refs") -> str:
    """Reset the kernel's peak-RSS mark (VmHWM); returns how, or why it could not."""
    try:
        with open(clear_refs, "w") as f:
            f.write("5")
    except OSError as exc:
        return f"unavailable ({exc.strerror}); cpu_rss_peak_mb is the process lifetime peak"
    return "clear_refs"


def read_peak_rss_mb(status: str = "/proc/self/status") -> float:
    """VmHWM (peak resident set size) in MiB, NaN where /proc is not there."""
    try:
        with open(status) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # the kernel reports kB
    except OSError:
        pass
    return math.nan


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- the callback ---------------------------------------------------------------------------


class GPUTelemetry(Callback):
    """Latency, throughput, memory and GPU readings of every test batch, logged at the end of the test.

    Args:
        warmup_batches: the first batches left out of the statistics (all are kept if the test has
            no more than this; the tag ``ab.warmup_batches_excluded`` says how many were left out).
        sync: time each batch end to end (synchronize, host clock) instead of with CUDA events.
        sample_interval_s: NVML sampling period, in (0, 0.1].
        log_series: also log the metric ``batch_latency_ms`` (step = batch_idx) to MLflow loggers.

    After the test, ``summary`` holds the logged metrics, ``batches`` the per-batch table and
    ``tags`` the MLflow tags.
    """

    def __init__(
        self,
        warmup_batches: int = 5,
        sync: bool = False,
        sample_interval_s: float = 0.1,
        log_series: bool = True,
    ) -> None:
        self.warmup_batches = warmup_batches
        self.sync = sync
        self.sample_interval_s = sample_interval_s
        self.log_series = log_series
        self.summary: dict[str, float] = {}
        self.batches: pd.DataFrame = pd.DataFrame()
        self.tags: dict[str, str] = {}
        self._nvml: Any = None
        self._nvml_status = "not used: cpu"
        self._sampler: nv.NvmlSampler | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.warmup_batches < 0:
            raise ValueError(f"warmup_batches must be >= 0, got {self.warmup_batches}")
        if not 0 < self.sample_interval_s <= 0.1:
            raise ValueError(f"sample_interval_s must be in (0, 0.1] s, got {self.sample_interval_s}")
        if not trainer.loggers:
            rank_zero_warn("GPUTelemetry: the trainer has no logger; results stay in .summary/.batches")
        if trainer.strategy.root_device.type == "cuda" and self._nvml is None:
            try:
                self._nvml = nv.load_nvml()
                self._nvml_status = "ok"
            except Exception as exc:  # ImportError or any NVMLError: carry on without
                self._nvml_status = f"unavailable: {type(exc).__name__}: {exc}"

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.device = pl_module.device
        self.on_cuda = self.device.type == "cuda"
        self.mode = ("sync_wall" if self.sync else "cuda_events") if self.on_cuda else "cpu_monotonic"
        self.summary, self.batches, self.tags = {}, pd.DataFrame(), self._device_tags()
        self.rank_batches: pd.DataFrame | None = None  # DDP: every rank's batches, with a `rank` column
        self._meta: list[tuple[int, int, int]] = []  # (batch_idx, dataloader_idx, batch_size)
        self._spans: list[tuple[Any, Any]] = []  # (start, end): CUDA events or perf_counter_ns
        self._t_end: list[float] = []  # time.monotonic() at each batch end (wall modes)
        self._energy_start_mj: float | None = None
        self._sampler = None
        if self.on_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            torch.cuda.synchronize(self.device)
            self._start_sampler()
            # The stream is idle now, so this event marks t_ref on the GPU's clock too.
            self._ref_event = self._record_event()
            self._t_ref = time.monotonic()
        else:
            self.tags["ab.rss_peak_reset"] = reset_peak_rss()

    @override
    def on_test_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.mode == "sync_wall":
            torch.cuda.synchronize(self.device)
        self._start = self._record_event() if self.mode == "cuda_events" else time.perf_counter_ns()

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.mode == "cuda_events":
            end: Any = self._record_event()
        else:
            if self.mode == "sync_wall":
                torch.cuda.synchronize(self.device)
            end = time.perf_counter_ns()
            self._t_end.append(time.monotonic())
        self._spans.append((self._start, end))
        self._meta.append((batch_idx, dataloader_idx, batch_size_of(batch)))

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
        samples = self._stop_sampler()
        latencies, t_end = self._read_latencies()
        self.batches = self._batch_table(latencies, t_end, samples)
        self.summary = self._summarise(samples)
        if trainer.world_size > 1:  # DDP: rank 0 logs the aggregate of every rank's batches (callbacks/ranks.py)
            parts = ranks.gather((self.summary, self.batches), trainer.world_size)
            self.summary = ranks.aggregate_summaries([part[0] for part in parts])
            self.rank_batches = ranks.merge_batches([part[1] for part in parts])  # self.batches: rank 0's
            self.tags.update(ranks.rank_tags(trainer.world_size))
        if trainer.is_global_zero:
            self._log(trainer)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._stop_sampler()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop_sampler()

    # ---- helpers of the hooks, in the order they are used -----------------------------------

    def _device_tags(self) -> dict[str, str]:
        tags = {
            "ab.device": f"cpu:{cpu_model()}",
            "ab.gpu_name": "none",
            "ab.gpu_uuid": "none",
            "ab.driver_version": "unknown",
            "ab.cuda_version": str(torch.version.cuda or "none"),
            "ab.torch_version": torch.__version__,
            "ab.cpu_model": cpu_model(),
            "ab.cpu_threads": str(torch.get_num_threads()),
            "ab.latency_mode": self.mode,
            "ab.nvml": self._nvml_status,
        }
        if self.on_cuda:
            name = torch.cuda.get_device_name(self.device)
            uuid, _ = nv.torch_device_identity(self._cuda_index())
            tags.update({"ab.device": f"cuda:{name}", "ab.gpu_name": name})
            if uuid:  # NVML's form; replaced by NVML's own reading when NVML works
                tags["ab.gpu_uuid"] = f"GPU-{nv.normalise_uuid(uuid)}"
        return tags

    def _cuda_index(self) -> int:
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _start_sampler(self) -> None:
        if self._nvml is None:
            return
        try:
            handle = nv.nvml_handle_for_torch_device(self._cuda_index(), self._nvml)
            self.tags.update(nv.nvml_identity(self._nvml, handle))
            self._sampler = nv.NvmlSampler(self._nvml, handle, self.sample_interval_s)
            self._sampler.start()
            self._energy_start_mj = nv.read_energy_mj(self._nvml, handle)
        except Exception as exc:  # telemetry must not fail the arm
            self.tags["ab.nvml"] = f"unavailable: {type(exc).__name__}: {exc}"
            self._sampler = None

    def _record_event(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def _stop_sampler(self) -> list[nv.NvmlSample]:
        if self._sampler is None:
            return []
        samples = self._sampler.stop()
        if self._sampler.error is not None:
            self.tags["ab.nvml"] = f"sampler stopped early: {self._sampler.error!r}"
        return samples

    def _read_latencies(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-batch latency (ms) and monotonic end time (s); CUDA events are read here, once."""
        if self.mode == "cuda_events":
            lat = [start.elapsed_time(end) for start, end in self._spans]
            t_end = [self._t_ref + self._ref_event.elapsed_time(end) / 1000.0 for _, end in self._spans]
        else:
            lat = [(end - start) / 1e6 for start, end in self._spans]
            t_end = self._t_end
        return np.asarray(lat, dtype=float), np.asarray(t_end, dtype=float)

    def _batch_table(
        self, latencies: np.ndarray, t_end: np.ndarray, samples: list[nv.NvmlSample]
    ) -> pd.DataFrame:
        n = len(self._meta)
        n_warmup = self.warmup_batches if n > self.warmup_batches else 0
        self.tags["ab.warmup_batches_excluded"] = str(n_warmup)
        if n and not n_warmup and self.warmup_batches:
            self.tags["ab.warmup_note"] = f"{n} batches <= warmup_batches={self.warmup_batches}: all kept"
        table = pd.DataFrame(self._meta, columns=["batch_idx", "dataloader_idx", "batch_size"])
        table["latency_ms"] = latencies
        table["warmup"] = np.arange(n) < n_warmup
        table["t_end_s"] = t_end
        nearest = nearest_indices([s.t_s for s in samples], t_end) if len(samples) >= 2 and n else None
        for field in nv.SAMPLE_FIELDS:
            values = np.asarray([getattr(s, field) for s in samples], dtype=float)
            table[field] = values[nearest] if nearest is not None else math.nan
        return table

    def _summarise(self, samples: list[nv.NvmlSample]) -> dict[str, float]:
        measured = self.batches[~self.batches["warmup"]]
        summary = latency_summary(measured["latency_ms"], measured["batch_size"]) if len(measured) else {}
        if self.on_cuda:
            summary[metric_key("gpu_mem_peak", "mb")] = torch.cuda.max_memory_allocated(self.device) / MIB
            summary[metric_key("gpu_mem_reserved_peak", "mb")] = (
                torch.cuda.max_memory_reserved(self.device) / MIB
            )
        else:
            summary[metric_key("cpu_rss_peak", "mb")] = read_peak_rss_mb()
        summary.update(nv.summarise_samples(samples))
        summary.update(self._energy(samples))
        return {key: value for key, value in summary.items() if math.isfinite(value)}

    def _energy(self, samples: list[nv.NvmlSample]) -> dict[str, float]:
        """GPU energy over the whole test (warm-up included) per image tested."""
        n_images = int(self.batches["batch_size"].sum()) if len(self.batches) else 0
        if self._sampler is None or n_images == 0:
            return {}
        end_mj = nv.read_energy_mj(self._nvml, self._sampler.handle)
        energy_j, self.tags["ab.energy_source"] = nv.window_energy_j(self._energy_start_mj, end_mj, samples)
        return {metric_key("energy", "j_per_img"): nv.energy_j_per_img(energy_j, n_images)}

    def _log(self, trainer: pl.Trainer) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(self.summary)
            if isinstance(logger, MLFlowLogger):
                log_to_mlflow(logger.experiment, logger.run_id, self.batches, self.tags, self.log_series)
                if self.rank_batches is not None:
                    ranks.log_rank_batches(logger.experiment, logger.run_id, self.rank_batches, ARTIFACT_DIR)


def log_to_mlflow(
    client: Any, run_id: str, batches: pd.DataFrame, tags: Mapping[str, str], log_series: bool
) -> None:
    """Tags in one call, the latency series in chunks of 1000, the table as one artifact.

    The number of calls does not grow with the number of batches below 1000.
    """
    from mlflow.entities import Metric, RunTag

    client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])
    if batches.empty:
        return
    if log_series:
        # Wall-clock timestamps of the batch ends, from their monotonic times.
        wall_ms = (time.time() - time.monotonic() + batches["t_end_s"].to_numpy()) * 1000.0
        metrics = [
            Metric(SERIES_KEY, float(lat), int(ts), int(step))
            for lat, ts, step in zip(batches["latency_ms"], wall_ms, batches["batch_idx"], strict=True)
        ]
        for i in range(0, len(metrics), MLFLOW_BATCH_LIMIT):
            client.log_batch(run_id, metrics=metrics[i : i + MLFLOW_BATCH_LIMIT])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "batches.parquet")
        batches.to_parquet(path, index=False)
        client.log_artifact(run_id, path, ARTIFACT_DIR)
