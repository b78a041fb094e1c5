"""NVML helpers for GPUTelemetry: find the GPU a torch device runs on and sample it in a thread.

NVML numbers GPUs physically and ignores CUDA_VISIBLE_DEVICES, so a torch device index is matched to
its NVML handle by UUID (falling back to the PCI address). Every function takes the NVML module as an
argument (``pynvml`` from nvidia-ml-py by default) so tests can pass a fake one.

    nvml = load_nvml()
    handle = nvml_handle_for_torch_device(0, nvml)
    sampler = NvmlSampler(nvml, handle, interval_s=0.05)
    sampler.start(); ...; samples = sampler.stop()
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

MIB = 2**20


class NvmlSample(NamedTuple):
    """One reading of one GPU; a field the device does not support is NaN."""

    t_s: float  # time.monotonic() when the reading was taken
    gpu_util_pct: float
    gpu_mem_used_mb: float
    gpu_power_w: float
    gpu_temp_c: float
    gpu_sm_clock_mhz: float


SAMPLE_FIELDS: tuple[str, ...] = NvmlSample._fields[1:]
# How each sampled field is summarised over the test; the metric is f"{field}_{stat}".
SUMMARY_STATS: dict[str, str] = {
    "gpu_util_pct": "mean",
    "gpu_mem_used_mb": "max",
    "gpu_power_w": "mean",
    "gpu_temp_c": "max",
    "gpu_sm_clock_mhz": "mean",
}


def load_nvml(nvml: Any = None) -> Any:
    """Import (unless given) and initialise NVML; raises ImportError or the NVML error on failure."""
    if nvml is None:
        import pynvml as nvml
    nvml.nvmlInit()
    return nvml


def normalise_uuid(uuid: object) -> str:
    """'GPU-58B0...' (NVML), b'GPU-58b0...' and '58b0...' (torch) all become '58b0...'."""
    text = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
    return text.strip().lower().removeprefix("gpu-")


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def torch_device_identity(index: int) -> tuple[str | None, tuple[int, int, int] | None]:
    """UUID and PCI (domain, bus, device) of torch CUDA device ``index``, each None if torch lacks it."""
    import torch

    props = torch.cuda.get_device_properties(index)
    uuid = str(props.uuid) if getattr(props, "uuid", None) is not None else None
    pci_fields = ("pci_domain_id", "pci_bus_id", "pci_device_id")
    pci = (
        tuple(int(getattr(props, f)) for f in pci_fields)
        if all(hasattr(props, f) for f in pci_fields)
        else None
    )
    return uuid, pci  # type: ignore[return-value]


def find_nvml_handle(nvml: Any, uuid: str | None = None, pci: tuple[int, int, int] | None = None) -> Any:
    """The NVML handle of the physical GPU with this UUID, else with this PCI (domain, bus, device).

    Raises:
        LookupError: no NVML device matches (e.g. a MIG slice, whose UUID is not a GPU's).
    """
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    if uuid:
        wanted = normalise_uuid(uuid)
        for handle in handles:
            if normalise_uuid(nvml.nvmlDeviceGetUUID(handle)) == wanted:
                return handle
    if pci is not None:
        for handle in handles:
            info = nvml.nvmlDeviceGetPciInfo(handle)
            if (int(info.domain), int(info.bus), int(info.device)) == tuple(pci):
                return handle
    raise LookupError(f"no NVML device has uuid={uuid} or pci={pci} among {len(handles)} devices")


def nvml_handle_for_torch_device(index: int, nvml: Any) -> Any:
    """The NVML handle of the GPU that torch calls ``cuda:<index>`` (CUDA_VISIBLE_DEVICES respected)."""
    uuid, pci = torch_device_identity(index)
    return find_nvml_handle(nvml, uuid, pci)


def nvml_identity(nvml: Any, handle: Any) -> dict[str, str]:
    """UUID and driver version of a device, as MLflow tags."""
    return {
        "ab.gpu_uuid": _text(nvml.nvmlDeviceGetUUID(handle)),
        "ab.driver_version": _text(nvml.nvmlSystemGetDriverVersion()),
    }


def _read(nvml: Any, fn: Callable[[], float]) -> float:
    """One NVML reading, NaN where the device does not support it."""
    try:
        return float(fn())
    except getattr(nvml, "NVMLError", Exception):
        return math.nan


def read_sample(nvml: Any, handle: Any, clock: Callable[[], float] = time.monotonic) -> NvmlSample:
    """Read utilisation, memory used, power, temperature and SM clock of one GPU now."""
    t_s = clock()
    return NvmlSample(
        t_s=t_s,
        gpu_util_pct=_read(nvml, lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
        gpu_mem_used_mb=_read(nvml, lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used / MIB),
        gpu_power_w=_read(nvml, lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0),
        gpu_temp_c=_read(nvml, lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
        gpu_sm_clock_mhz=_read(nvml, lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
    )


def read_energy_mj(nvml: Any, handle: Any) -> float | None:
    """Energy used by the GPU since the driver loaded, in mJ; None where unsupported (pre-Volta)."""
    value = _read(nvml, lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
    return None if math.isnan(value) else value


class NvmlSampler:
    """Samples one GPU every ``interval_s`` in a daemon thread, from ``start()`` to ``stop()``.

    One sample is taken at start and one at stop, so even a window shorter than the interval has
    two samples and the last partial interval is kept.
    """

    def __init__(
        self, nvml: Any, handle: Any, interval_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.nvml = nvml
        self.handle = handle
        self.interval_s = interval_s
        self.clock = clock
        self.samples: list[NvmlSample] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        self.samples = [read_sample(self.nvml, self.handle, self.clock)]
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # A fixed schedule rather than sleep(interval) after each read, so reads do not drift.
        next_t = self.clock() + self.interval_s
        try:
            while not self._stop.wait(max(0.0, next_t - self.clock())):
                self.samples.append(read_sample(self.nvml, self.handle, self.clock))
                next_t += self.interval_s
        except Exception as exc:  # a broken reading must not kill the arm
            self.error = exc

    def stop(self) -> list[NvmlSample]:
        """Stop the thread, take the final sample and return all samples; safe to call twice."""
        if self._thread is None:
            return self.samples
        self._stop.set()
        self._thread.join(timeout=max(1.0, 10 * self.interval_s))
        self._thread = None
        self.samples.append(read_sample(self.nvml, self.handle, self.clock))
        return self.samples


def summarise_samples(samples: Sequence[NvmlSample]) -> dict[str, float]:
    """Mean or max of each field (see SUMMARY_STATS); fields with no finite reading are left out."""
    summary: dict[str, float] = {}
    for field, stat in SUMMARY_STATS.items():
        values = np.array([getattr(s, field) for s in samples], dtype=float)
        values = values[np.isfinite(values)]
        if values.size:
            summary[f"{field}_{stat}"] = float(values.mean() if stat == "mean" else values.max())
    return summary


def window_energy_j(
    start_mj: float | None, end_mj: float | None, samples: Sequence[NvmlSample]
) -> tuple[float, str]:
    """Energy (J) of the GPU over a sampling window, and where it came from.

    NVML's total-energy counter (mJ) where it is supported and advanced; else the integral of the
    sampled power (the counter only updates every few tens of ms, so a short window may not move it).
    """
    if start_mj is not None and end_mj is not None and end_mj > start_mj:
        return (end_mj - start_mj) / 1000.0, "nvml_total_energy"
    return power_integral_j([s.t_s for s in samples], [s.gpu_power_w for s in samples]), "power_integral"


def energy_j_per_img(energy_j: float, n_images: int) -> float:
    if n_images <= 0:
        raise ValueError(f"n_images must be positive, got {n_images}")
    return energy_j / n_images


def power_integral_j(times_s: Sequence[float], power_w: Sequence[float]) -> float:
    """Energy in J by the trapezoid rule over power samples, for GPUs without an energy counter."""
    t = np.asarray(times_s, dtype=float)
    p = np.asarray(power_w, dtype=float)
    keep = np.isfinite(t) & np.isfinite(p)
    if keep.sum() < 2:
        return math.nan
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
    return float(trapezoid(p[keep], t[keep]))


__all__ = [
    "SAMPLE_FIELDS",
    "SUMMARY_STATS",
    "NvmlSample",
    "NvmlSampler",
    "energy_j_per_img",
    "find_nvml_handle",
    "load_nvml",
    "normalise_uuid",
    "nvml_handle_for_torch_device",
    "nvml_identity",
    "power_integral_j",
    "read_energy_mj",
    "read_sample",
    "summarise_samples",
    "torch_device_identity",
    "window_energy_j",
]
