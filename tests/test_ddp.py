"""Tests of one arm data-parallel over N processes (lab/ddp.py, the gather in lab/models/module.py, the rank
telemetry in callbacks/ranks.py, the DDP rules of lab/config.py and lab/launch.py).

    .venv/bin/python -m pytest tests/test_ddp.py -q               # the fast ones
    .venv/bin/python -m pytest tests/test_ddp.py -q -m slow       # real arms: two gloo processes on the CPU

The slow tests run `python -m lab.arm` against a SQLite store under tmp_path, as the launcher does: once in one
process and once with devices_per_arm=2, on a test set (45 images, batches of 8) that two ranks split unevenly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import subprocess_env

from callbacks import ranks
from lab import ddp, launch
from lab.config import ConfigError, build_config
from lab.models.module import gather_outputs

# 45 test images in batches of 8: six batches, the last of five; two ranks get 24 and 21 images.
ARM = {"data": "fake", "fake_samples": 150, "fake_classes": 4, "image_size": 16, "epochs": 0,
       "allow_random_head": True, "a": "resnet10t", "b": "mobilenetv3_small_100", "batch_size": 8,
       "warmup_batches": 0, "test_fraction": 0.3, "log_model": False}
N_TEST = 45


# ---- fast: the pure parts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "batch", "world"),
                         [(45, 8, 2), (48, 8, 2), (45, 8, 4), (7, 8, 2), (3, 1, 3), (10, 4, 3)])
def test_batch_shard_scores_every_image_once_in_its_one_process_batch(n: int, batch: int, world: int) -> None:
    shards = [ddp.batch_shard(n, batch, r, world) for r in range(world)]
    flat = [i for shard in shards for b in shard for i in b]
    assert sorted(flat) == list(range(n))  # every image once, no padding
    assert all(shard for shard in shards)  # no rank without images: it would skip the gather
    one_process = [list(range(s, min(s + batch, n))) for s in range(0, n, batch)]
    if len(one_process) >= world:  # whole batches: each image in the batch one process puts it in
        assert sorted(b for shard in shards for b in shard) == one_process


def test_batch_shard_refuses_more_ranks_than_images() -> None:
    with pytest.raises(ValueError, match="cannot split 2 test images over 3 ranks"):
        ddp.batch_shard(2, 8, 0, 3)


def test_aggregate_summaries_sums_throughput_takes_latency_from_rank0_and_the_largest_memory() -> None:
    rank0 = {"latency_ms_p50": 10.0, "throughput_img_per_s": 100.0, "cpu_rss_peak_mb": 500.0, "n_batches_measured": 3}
    rank1 = {"latency_ms_p50": 30.0, "throughput_img_per_s": 80.0, "cpu_rss_peak_mb": 700.0, "n_batches_measured": 2}
    out = ranks.aggregate_summaries([rank0, rank1])
    assert out["throughput_img_per_s"] == 180.0
    assert out["latency_ms_p50"] == 10.0
    assert out["cpu_rss_peak_mb"] == 700.0
    assert out["n_batches_measured"] == 5.0
    assert (out["throughput_img_per_s_rank0"], out["throughput_img_per_s_rank1"]) == (100.0, 80.0)
    assert ranks.rank_tags(2)["ab.latency_source"] == "rank0"
    with pytest.raises(ValueError):
        ranks.aggregate_summaries([])


def test_merge_batches_keeps_each_rows_rank() -> None:
    merged = ranks.merge_batches([pd.DataFrame({"batch_idx": [0, 1]}), pd.DataFrame({"batch_idx": [0]})])
    assert merged["rank"].tolist() == [0, 0, 1]


def test_threads_are_split_over_ranks() -> None:
    assert [ddp.threads_per_rank(t, 2) for t in (0, 1, 2, 7)] == [0, 1, 1, 3]


def test_lockstep_with_devices_per_arm_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="devices_per_arm: 2 cannot take lockstep turns"):
        build_config(ARM | {"devices_per_arm": 2, "placement": "lockstep"})


def test_plan_gives_each_arm_devices_per_arm_gpus() -> None:
    cfg = build_config(ARM | {"devices_per_arm": 2})
    four = launch.plan(cfg, 2, gpus=("0", "1", "2", "3"))
    assert (four.placement, four.gpus) == ("parallel", ("0,1", "2,3"))
    three = launch.plan(cfg, 2, gpus=("0", "1", "2"))  # not enough for both at once; never lockstep
    assert (three.placement, three.gpus) == ("sequential", ("0,1",))
    with pytest.raises(ValueError, match="devices_per_arm: 2 needs 2 GPUs, found 1"):
        launch.plan(cfg, 2, gpus=("0",))
    with pytest.raises(ValueError, match="parallel needs 2 GPUs per arm \\(4 for 2 arms\\), found 3"):
        launch.plan(build_config(ARM | {"devices_per_arm": 2, "placement": "parallel"}), 2, gpus=("0", "1", "2"))
    cpu = launch.plan(build_config(ARM | {"devices_per_arm": 2, "devices": "cpu"}), 2)
    assert (cpu.device, cpu.placement) == ("cpu", "sequential")


def test_gather_outputs_refuses_a_repeated_or_missing_sample() -> None:
    """One gloo process: what all ranks sent comes back, checked against the test set's size."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        batch = (torch.tensor([3, 1]), torch.tensor([0, 1]), torch.rand(2, 4))
        assert len(gather_outputs([batch], 1, 2)) == 1
        with pytest.raises(RuntimeError, match="2 predictions for 3 test images"):
            gather_outputs([batch], 1, 3)
        repeated = (torch.tensor([3, 3]), *batch[1:])
        with pytest.raises(RuntimeError, match=r"\(1 repeated\)"):
            gather_outputs([repeated], 1, 2)
    finally:
        dist.destroy_process_group()


# ---- slow: real arms -----------------------------------------------------------------------------------------


def start_arm(tmp_path: Path, uri: str, name: str, extra_env: dict[str, str] | None = None,
              **overrides: Any) -> tuple[subprocess.Popen, str, str]:
    """`python -m lab.arm` for arm 0 under a new parent run, as the launcher starts it; (process, parent, exp)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment_id = client.create_experiment(name)
    parent = client.create_run(experiment_id, tags={"ab.role": "parent"}).info.run_id
    cfg_path = tmp_path / f"{name}.yaml"
    cfg_path.write_text(build_config(ARM | overrides).to_yaml())
    cmd = [sys.executable, "-m", "lab.arm", "--config", str(cfg_path), "--index", "0", "--parent-run-id", parent,
           "--experiment-id", experiment_id, "--threads", "1", "--error-file", str(tmp_path / f"{name}.err")]
    proc = subprocess.Popen(cmd, env=subprocess_env(uri) | (extra_env or {}), stderr=subprocess.PIPE, text=True)
    return proc, parent, experiment_id


def child_of(uri: str, experiment_id: str):
    from mlflow import MlflowClient

    (run,) = MlflowClient(uri).search_runs([experiment_id], "tags.ab.role = 'child'")
    return run


def predictions(uri: str, run_id: str) -> pd.DataFrame:
    from mlflow import MlflowClient

    path = MlflowClient(uri).download_artifacts(run_id, "predictions/predictions.parquet")
    return pd.read_parquet(path).sort_values("sample_id", ignore_index=True)


@dataclass
class Arms:
    """Three arms started at once (the slow tests share their start-up): one process, two ranks, and two ranks
    paused at the test for a rank to be killed."""

    uri: str
    folder: Path
    procs: dict[str, subprocess.Popen]
    experiments: dict[str, str]
    marker: Path


@pytest.fixture(scope="module")
def arms(tmp_path_factory: pytest.TempPathFactory):
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("ddp")
    uri = f"sqlite:///{folder}/mlflow.db"
    MlflowClient(uri).search_experiments()  # create the store's tables once, before three processes race to
    marker = folder / "paused"
    marker.mkdir()
    (marker / "hold").touch()
    paused = {"AB_TEST_PAUSE_IN": "test", "AB_TEST_PAUSE_MARKER": str(marker)}
    started = {"one": start_arm(folder, uri, "one"), "two": start_arm(folder, uri, "two", devices_per_arm=2),
               "crash": start_arm(folder, uri, "crash", paused, devices_per_arm=2)}
    yield Arms(uri, folder, {k: v[0] for k, v in started.items()}, {k: v[2] for k, v in started.items()}, marker)
    for proc, _, _ in started.values():  # a failed assertion must not leave an arm behind
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_two_gloo_ranks_give_the_predictions_of_one_process(arms: Arms) -> None:
    from mlflow import MlflowClient

    uri, one, two = arms.uri, arms.procs["one"], arms.procs["two"]
    errors = {name: proc.communicate(timeout=600)[1] for name, proc in (("one", one), ("two", two))}
    assert (one.returncode, two.returncode) == (0, 0), errors
    run_one, run_two = child_of(uri, arms.experiments["one"]), child_of(uri, arms.experiments["two"])
    assert (run_one.info.status, run_two.info.status) == ("FINISHED", "FINISHED")
    single, gathered = predictions(uri, run_one.info.run_id), predictions(uri, run_two.info.run_id)

    assert len(gathered) == N_TEST and gathered["sample_id"].is_unique  # every image once: no padding, none lost
    assert gathered["sample_id"].tolist() == single["sample_id"].tolist()
    assert gathered["pred"].tolist() == single["pred"].tolist()  # exactly, as are the labels
    assert gathered["label"].tolist() == single["label"].tolist()
    probs = [c for c in single.columns if c.startswith("prob_")]
    np.testing.assert_allclose(gathered[probs].to_numpy(), single[probs].to_numpy(), rtol=0, atol=1e-6)
    top5 = np.argsort(-single[probs].to_numpy(), axis=1, kind="stable")
    assert (np.argsort(-gathered[probs].to_numpy(), axis=1, kind="stable") == top5).all()
    assert run_two.data.metrics["test_accuracy"] == pytest.approx(run_one.data.metrics["test_accuracy"])

    tags, metrics = run_two.data.tags, run_two.data.metrics
    assert (tags["ab.devices_per_arm"], tags["ab.effective_batch_size"]) == ("2", "16")
    assert (tags["ab.telemetry_ranks"], tags["ab.latency_source"]) == ("2", "rank0")
    assert metrics["throughput_img_per_s"] == pytest.approx(
        metrics["throughput_img_per_s_rank0"] + metrics["throughput_img_per_s_rank1"])
    client = MlflowClient(uri)
    every_rank = pd.read_parquet(client.download_artifacts(run_two.info.run_id, "telemetry/batches_ranks.parquet"))
    assert every_rank.groupby("rank")["batch_size"].sum().to_dict() == {0: 24, 1: 21}  # the uneven split
    rank0 = pd.read_parquet(client.download_artifacts(run_two.info.run_id, "telemetry/batches.parquet"))
    assert rank0["batch_size"].tolist() == [8, 8, 8]  # what latency pairing reads: rank 0's batches only


@pytest.mark.slow
def test_a_killed_rank_fails_the_run_with_one_line_and_leaves_no_process(arms: Arms) -> None:
    proc, marker = arms.procs["crash"], arms.marker
    deadline = time.monotonic() + 300
    while len(pids := [int(p.name) for p in marker.iterdir() if p.name.isdigit()]) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the ranks never reached the test"
        time.sleep(0.2)
    (rank1,) = [pid for pid in pids if pid != proc.pid]
    os.kill(rank1, signal.SIGKILL)
    (marker / "hold").unlink()
    _, stderr = proc.communicate(timeout=120)

    assert proc.returncode == 1
    run = child_of(arms.uri, arms.experiments["crash"])
    assert run.info.status == "FAILED"
    assert run.data.tags["ab.error"] == "arm a (resnet10t): rank 1 killed by signal 9"
    assert [line for line in stderr.splitlines() if line.startswith("ablab: error:")] == [
        "ablab: error: arm a (resnet10t): rank 1 killed by signal 9"]
    assert (arms.folder / "crash.err").read_text() == "arm a (resnet10t): rank 1 killed by signal 9"
    for pid in pids:  # rank 0 exited; rank 1 is gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
