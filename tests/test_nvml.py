"""Tests of callbacks/nvml.py: mapping a torch device to its NVML handle, sampling, energy.

    .venv/bin/python -m pytest tests/test_nvml.py -q

No GPU is needed: NVML is a fake module with four GPUs. The real NVML is exercised by the ``gpu`` test in
tests/test_gpu_telemetry.py.
"""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest
import torch

from callbacks import nvml as nv


class FakeNvml:
    """The part of pynvml that the helpers use, with four physical GPUs."""

    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1

    class NVMLError(Exception):
        pass

    def __init__(self, n_gpus: int = 4, energy: bool = True, power: bool = True) -> None:
        self.uuids = [f"GPU-{i}{i}{i}{i}aaaa-bbbb-cccc-dddd-eeeeeeeeeee{i}" for i in range(n_gpus)]
        self.energy, self.power = energy, power
        self.energy_mj = 1_000_000.0
        self.reads = 0

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.uuids)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> SimpleNamespace:
        return SimpleNamespace(index=index)

    def nvmlDeviceGetUUID(self, handle: SimpleNamespace) -> str:
        return self.uuids[handle.index]

    def nvmlDeviceGetPciInfo(self, handle: SimpleNamespace) -> SimpleNamespace:
        return SimpleNamespace(
            domain=0, bus=0x10 + handle.index, device=0, busId=f"00000000:{16 + handle.index:02X}:00.0"
        )

    def nvmlSystemGetDriverVersion(self) -> str:
        return "580.00.00"

    def nvmlDeviceGetUtilizationRates(self, handle: SimpleNamespace) -> SimpleNamespace:
        self.reads += 1
        return SimpleNamespace(gpu=10 * handle.index, memory=5)

    def nvmlDeviceGetMemoryInfo(self, handle: SimpleNamespace) -> SimpleNamespace:
        return SimpleNamespace(used=512 * 2**20, total=80 * 2**30, free=0)

    def nvmlDeviceGetPowerUsage(self, handle: SimpleNamespace) -> int:
        if not self.power:
            raise self.NVMLError("Not Supported")
        return 250_000  # mW

    def nvmlDeviceGetTemperature(self, handle: SimpleNamespace, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return 55

    def nvmlDeviceGetClockInfo(self, handle: SimpleNamespace, clock: int) -> int:
        assert clock == self.NVML_CLOCK_SM
        return 1980

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: SimpleNamespace) -> float:
        if not self.energy:
            raise self.NVMLError("Not Supported")
        return self.energy_mj


def test_mapping_follows_uuid_not_torch_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA_VISIBLE_DEVICES=2: torch's cuda:0 is physical GPU 2, which NVML calls index 2."""
    fake = FakeNvml()
    physical = 2
    props = SimpleNamespace(
        uuid=fake.uuids[physical].removeprefix("GPU-"),  # torch prints the UUID without the prefix
        pci_domain_id=0,
        pci_bus_id=0x10 + physical,
        pci_device_id=0,
    )
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    assert nv.nvml_handle_for_torch_device(0, fake).index == physical
    # By PCI address where the UUID is not available, and a clear error where nothing matches.
    assert nv.find_nvml_handle(fake, uuid=None, pci=(0, 0x13, 0)).index == 3
    assert nv.find_nvml_handle(fake, uuid=fake.uuids[1].upper().encode()).index == 1
    with pytest.raises(LookupError, match="no NVML device"):
        nv.find_nvml_handle(fake, uuid="MIG-0000", pci=(1, 0, 0))


def test_sampler_takes_one_sample_per_interval_plus_start_and_stop() -> None:
    fake = FakeNvml()
    sampler = nv.NvmlSampler(fake, fake.nvmlDeviceGetHandleByIndex(1), interval_s=0.02)
    sampler.start()
    time.sleep(0.2)
    samples = sampler.stop()
    # start + 10 scheduled (the 10th due just as stop comes) + final
    assert 10 <= len(samples) <= 13, len(samples)
    times = [s.t_s for s in samples]
    assert times == sorted(times) and times[-1] - times[0] >= 0.2
    assert samples[0] == nv.NvmlSample(times[0], 10.0, 512.0, 250.0, 55.0, 1980.0)
    assert not sampler.running and sampler.stop() is samples  # stopping twice is harmless


def test_sampler_shorter_than_interval_still_reports() -> None:
    fake = FakeNvml()
    sampler = nv.NvmlSampler(fake, fake.nvmlDeviceGetHandleByIndex(0), interval_s=0.1)
    sampler.start()
    samples = sampler.stop()
    assert len(samples) == 2
    assert nv.summarise_samples(samples)["gpu_power_w_mean"] == 250.0


def test_unsupported_fields_are_nan_and_left_out_of_the_summary() -> None:
    fake = FakeNvml(power=False, energy=False)
    handle = fake.nvmlDeviceGetHandleByIndex(0)
    sample = nv.read_sample(fake, handle)
    assert math.isnan(sample.gpu_power_w) and sample.gpu_temp_c == 55.0
    assert nv.read_energy_mj(fake, handle) is None
    assert "gpu_power_w_mean" not in nv.summarise_samples([sample, sample])


def test_energy_per_image() -> None:
    samples = [nv.NvmlSample(t, 0.0, 0.0, w, 0.0, 0.0) for t, w in [(0.0, 100.0), (1.0, 100.0), (2.0, 200.0)]]
    # NVML's counter in mJ: 50 J over 10 images
    energy, source = nv.window_energy_j(1_000_000.0, 1_050_000.0, samples)
    assert (energy, source) == (pytest.approx(50.0), "nvml_total_energy")
    assert nv.energy_j_per_img(energy, 10) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="positive"):
        nv.energy_j_per_img(energy, 0)
    # No counter, or one that did not move in a short window: trapezoid, 100 W for 1 s + 100 -> 200 W for 1 s
    for start, end in [(None, None), (5.0, 5.0)]:
        assert nv.window_energy_j(start, end, samples) == (pytest.approx(250.0), "power_integral")
    assert nv.power_integral_j([0.0, 1.0, 2.0], [100.0, math.nan, 100.0]) == pytest.approx(200.0)
    assert math.isnan(nv.power_integral_j([0.0], [100.0]))
