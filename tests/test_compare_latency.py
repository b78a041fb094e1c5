"""lab/compare/latency.py: latencies are comparable only for lockstep, or sequential on one device in one job (the
flag and the note always agree); batches pair by batch_idx with matching sizes; p50/p99 get bootstrap intervals.

Run with ``python -m pytest tests/test_compare_latency.py -q``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_compare import TAGS

from lab import stats
from lab.compare import Arm, latency_comparison, latency_verdict, paired_batches
from lab.config import build_config

CFG = build_config({"n_resamples": 1000})


def batches(latency: np.ndarray, sizes: int | np.ndarray = 32, warmup: int = 2, order=None) -> pd.DataFrame:
    n = len(latency)
    frame = pd.DataFrame({"batch_idx": np.arange(n), "dataloader_idx": 0, "batch_size": sizes, "latency_ms": latency,
                          "warmup": np.arange(n) < warmup})  # fmt: skip
    return frame if order is None else frame.iloc[order].reset_index(drop=True)


def arm(name: str, frame: pd.DataFrame | None, **tags: str) -> Arm:
    return Arm(name, f"{name}-run", name, TAGS | tags, {}, pd.DataFrame(), frame)


@pytest.mark.parametrize(("placement", "changes", "comparable", "says"), [
    ("lockstep", {}, True, "took turns on the same batches on one device (lockstep): latencies are comparable"),
    ("sequential", {}, True, "one after the other on the same device in this job: latencies are comparable"),
    ("parallel", {}, False, "at the same time on one device and competed for it: latencies are not comparable"),
    ("lockstep", {"mlflow.parentRunId": "other"}, False, "measured in different jobs: latencies are not comparable"),
    ("sequential", {"ab.device": "cuda:H100"}, False, "different devices (cpu:x vs cuda:H100): latencies are not"),
    ("parallel", {"ab.gpu_uuid": "GPU-2"}, False, "different devices (cpu:x, different units): latencies are not"),
    ("auto", {}, False, "placement auto: latencies are not comparable"),
])  # fmt: skip
def test_comparable_only_for_lockstep_or_sequential_on_one_device_in_one_job(
    placement: str, changes: dict, comparable: bool, says: str
) -> None:
    rng = np.random.default_rng(0)
    arms = [arm("a", batches(rng.normal(10, 1, 12)), **{"ab.gpu_uuid": "GPU-1"}),
            arm("b", batches(rng.normal(11, 1, 12)), **{"ab.gpu_uuid": "GPU-1"} | changes)]  # fmt: skip
    assert latency_verdict(arms, placement) == (comparable, latency_verdict(arms, placement)[1])
    out = latency_comparison(CFG, arms, placement, seed=0)
    assert out["comparable"] is comparable and says in out["note"]
    assert ("not comparable" in out["note"]) is not comparable  # the flag and the note agree
    assert (out["paired"] is not None) is comparable
    assert set(out["quantiles"]) == {"a", "b"}  # every arm's own p50/p99 is shown either way


def test_batches_pair_by_batch_idx_not_by_row() -> None:
    rng = np.random.default_rng(1)
    base = rng.uniform(5, 50, 14)  # batches differ a lot; B is 1 ms slower on each
    order = rng.permutation(14)
    arms = [arm("a", batches(base)), arm("b", batches(base + 1.0, order=order))]
    paired = latency_comparison(CFG, arms, "lockstep", seed=0)["paired"]
    assert paired["n_batches"] == 12 and paired["estimate_ms"] == pytest.approx(1.0)
    assert paired["low_ms"] == pytest.approx(1.0) and paired["high_ms"] == pytest.approx(1.0)
    assert paired["p50_diff_ms"] == pytest.approx([1.0, 1.0, 1.0]) and paired["p99_diff_ms"][0] == pytest.approx(1.0)


def test_different_batch_sizes_are_not_comparable_and_say_where() -> None:
    rng = np.random.default_rng(2)
    sizes = np.full(12, 32)
    sizes[7:] = 16  # B's batch size was halved after an out-of-memory error
    arms = [arm("a", batches(rng.normal(10, 1, 12))), arm("b", batches(rng.normal(10, 1, 12), sizes))]
    out = latency_comparison(CFG, arms, "lockstep", seed=0)
    assert out["comparable"] is False and out["paired"] is None
    assert out["note"] == "batch sizes differ on 5 batches (batch 7: 32 vs 16): latencies are not comparable"


def test_unmatched_and_warmup_batches_are_left_out_with_a_note() -> None:
    rng = np.random.default_rng(3)
    a, b = batches(rng.normal(10, 1, 12)), batches(rng.normal(10, 1, 10), warmup=3)
    joined, note = paired_batches(a, b)
    assert joined["batch_idx"].tolist() == list(range(3, 10))  # measured by both: a's 2..11 and b's 3..9
    assert note == "3 measured batches have no partner with the same batch_idx and are left out"
    out = latency_comparison(CFG, [arm("a", a), arm("b", b)], "lockstep", seed=0)
    assert out["comparable"] and out["note"].endswith("; " + note) and out["paired"]["n_batches"] == 7


def test_percentile_intervals_over_batches() -> None:
    rng = np.random.default_rng(4)
    latency = rng.gamma(5.0, 2.0, 40)
    out = latency_comparison(CFG, [arm("a", batches(latency)), arm("b", None)], "lockstep", seed=3)
    p50, p99 = stats.quantile_ci(latency[2:], None, (0.5, 0.99), n_resamples=1000, confidence=0.95, seed=3)
    assert out["quantiles"] == {"a": {"p50": [p50.estimate, p50.low, p50.high], "p99": [p99.estimate, p99.low,
                                                                                       p99.high]}}  # fmt: skip
    assert out["paired"] is None and out["comparable"]  # no telemetry for b: nothing to pair, nothing claimed
