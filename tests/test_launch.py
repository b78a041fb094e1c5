"""Tests of lab/launch.py: where arms are placed, and whole A/B jobs under each placement on the CPU.

    .venv/bin/python -m pytest tests/test_launch.py -q

`plan()` is checked with made-up GPU lists. The end-to-end tests run `python -m lab run` as a user would,
once per placement (lockstep, parallel, sequential), with two small random-weight timm models on fake data,
each against its own SQLite store under a temporary folder. The three jobs (three processes each, mostly
importing) start together and take about 1-2 minutes on two cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import FAST_ARGS, subprocess_env

from lab import launch, zygote
from lab.config import build_config
from lab.launch import Plan, arm_env, plan, run_arms, subset_plan, visible_gpus

CORES = os.cpu_count() or 1


def cfg(**overrides: str):
    return build_config({"allow_random_head": True, "epochs": 0} | overrides)


# ---- plan: which placement, which devices ----------------------------------------------------------


@pytest.mark.parametrize(
    ("placement", "gpus", "n_arms", "expected"),
    [
        ("auto", ("0", "1"), 2, Plan("parallel", "cuda", ("0", "1"), 0)),
        ("auto", ("0", "1", "2"), 2, Plan("parallel", "cuda", ("0", "1"), 0)),
        ("auto", ("0", "1"), 3, Plan("lockstep", "cuda", ("0",), 0)),
        ("auto", ("3",), 2, Plan("lockstep", "cuda", ("3",), 0)),
        ("auto", (), 2, Plan("lockstep", "cpu", (), CORES)),
        ("lockstep", ("0", "1"), 2, Plan("lockstep", "cuda", ("0",), 0)),
        ("sequential", ("0", "1"), 2, Plan("sequential", "cuda", ("0",), 0)),
        ("sequential", (), 2, Plan("sequential", "cpu", (), CORES)),
        ("parallel", (), 2, Plan("parallel", "cpu", (), max(1, CORES // 2))),
        ("parallel", ("1", "0"), 2, Plan("parallel", "cuda", ("1", "0"), 0)),
    ],
)
def test_plan_choices(placement: str, gpus: tuple[str, ...], n_arms: int, expected: Plan) -> None:
    assert plan(cfg(placement=placement), n_arms, gpus) == expected


def test_parallel_with_too_few_gpus_raises() -> None:
    with pytest.raises(ValueError, match="parallel needs one GPU per arm \\(3\\), found 2"):
        plan(cfg(placement="parallel"), 3, ("0", "1"))


def test_visible_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert visible_gpus(cfg(devices="cpu")) == ()
    assert visible_gpus(cfg(devices="auto")) == ("0", "1")
    assert visible_gpus(cfg(devices="1")) == ("1",)
    with pytest.raises(ValueError, match="GPU 5 not present \\(2 visible\\)"):
        visible_gpus(cfg(devices="0,5"))


def test_arm_env_narrows_gpus_and_drops_the_parents_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_RUN_ID", "parent")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    parallel = Plan("parallel", "cuda", ("2", "5"), 0)
    envs = [arm_env(parallel, i) for i in range(2)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["2", "5"]
    assert all("MLFLOW_RUN_ID" not in e and e["AB_PLACEMENT"] == "parallel" for e in envs)
    assert all(e["MLFLOW_TRACKING_URI"] == "sqlite:///x.db" for e in envs)
    shared = Plan("lockstep", "cuda", ("3",), 0)
    assert {arm_env(shared, i)["CUDA_VISIBLE_DEVICES"] for i in range(2)} == {"3"}
    assert "CUDA_VISIBLE_DEVICES" not in arm_env(Plan("lockstep", "cpu", (), 2), 0)


def test_arms_and_their_fork_server_spin_openmp_briefly_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    """GNU OpenMP's default spinning made the default job take minutes beside one busy process (lab/lifecycle.py):
    arms get a short spin count, the fork server the same (else no arm could be forked from it), and a wait policy
    or spin count of the user's own is kept."""
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    plan = Plan("lockstep", "cpu", (), 2)
    server_env = zygote.process_env(dict(os.environ))
    assert arm_env(plan, 0)["GOMP_SPINCOUNT"] == server_env["GOMP_SPINCOUNT"] == "1000"
    assert zygote.forkable(server_env, arm_env(plan, 0, os.environ))
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert "GOMP_SPINCOUNT" not in arm_env(plan, 0) and arm_env(plan, 0)["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.setenv("GOMP_SPINCOUNT", "50000")
    assert arm_env(plan, 0)["GOMP_SPINCOUNT"] == "50000"


def test_a_subset_of_arms_runs_one_after_the_other_on_the_first_device() -> None:
    assert subset_plan(Plan("parallel", "cuda", ("2", "5"), 0)) == Plan("sequential", "cuda", ("2",), 0)
    assert subset_plan(Plan("lockstep", "cpu", (), 1)) == Plan("sequential", "cpu", (), CORES)


# A stand-in for `python -m lab.arm`: the child run an arm creates, or an arm that fails with its error file.
FAKE_ARM = """
import os, sys
from mlflow import MlflowClient
index, parent, experiment, error_file = sys.argv[1:5]
placement = os.environ["AB_PLACEMENT"]  # from launch.arm_env, as the real arm reads it
if index == "2":
    open(error_file, "w").write("arm c (resnet34): ValueError: broken")
    sys.exit(1)
tags = {"mlflow.parentRunId": parent, "ab.role": "child", "ab.arm_index": index, "ab.placement": placement}
run = MlflowClient().create_run(experiment, tags=tags)
MlflowClient().set_terminated(run.info.run_id, "FINISHED")
"""


@pytest.mark.slow  # two Python processes (stand-in arms that import MLflow)
def test_run_arms_starts_only_the_arms_asked_for(tracking: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Arms 1 and 2 of three (0 reused): started one after the other; 2 fails and says why in its error file."""
    from mlflow import MlflowClient

    def fake_command(cfg_path, index, parent_run_id, experiment_id, p, error_file, lockstep, world, done_file=None):
        assert (p.placement, lockstep, world) == ("sequential", None, 1)
        return [sys.executable, "-c", FAKE_ARM, str(index), parent_run_id, experiment_id, str(error_file)]

    monkeypatch.setattr(launch, "arm_command", fake_command)
    client = MlflowClient()
    experiment = client.create_experiment("launch")
    parent = client.create_run(experiment).info.run_id
    three = cfg(arms="resnet18,resnet10t,resnet34")
    outcomes = run_arms(three, Path("unused.yaml"), parent, experiment, plan(three, 3, ()), indices=[1, 2])
    assert [(o.index, o.name, o.returncode, o.error) for o in outcomes] == [
        (1, "resnet10t", 0, ""), (2, "resnet34", 1, "arm c (resnet34): ValueError: broken")]
    [child] = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'")
    assert outcomes[0].run_id == child.info.run_id and outcomes[1].run_id is None
    assert child.data.tags["ab.placement"] == "sequential"
    assert run_arms(three, Path("unused.yaml"), parent, experiment, plan(three, 3, ()), indices=[]) == []


# A stand-in arm whose interpreter exit is slow: it completes its run, says so in its done file, then lingers.
LINGERING_ARM = """
import os, sys, time
from mlflow import MlflowClient
index, parent, experiment, done_file = sys.argv[1:5]
tags = {"mlflow.parentRunId": parent, "ab.role": "child", "ab.arm_index": index}
run = MlflowClient().create_run(experiment, tags=tags)
MlflowClient().set_terminated(run.info.run_id, "FINISHED")
open(f"pid{index}", "w").write(str(os.getpid()))
open(done_file, "w").write(run.info.run_id)
time.sleep(4)
"""


def _reaped(pid: int, timeout_s: float) -> bool:
    """The process is gone and waited for: no /proc entry (a zombie keeps one, state Z)."""
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not Path(f"/proc/{pid}").exists()


@pytest.mark.slow  # two Python processes (stand-in arms that import MLflow)
def test_an_arm_whose_run_is_complete_frees_the_launcher_and_is_reaped_behind_it(
        tracking: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    def lingering_command(cfg_path, index, parent_run_id, experiment_id, p, error_file, lockstep, world,
                          done_file=None):
        return [sys.executable, "-c", LINGERING_ARM, str(index), parent_run_id, experiment_id, str(done_file)]

    monkeypatch.setattr(launch, "arm_command", lingering_command)
    client = MlflowClient()
    experiment = client.create_experiment("launch")
    parent = client.create_run(experiment).info.run_id
    two = cfg(placement="parallel", devices="cpu")
    outcomes = run_arms(two, Path("unused.yaml"), parent, experiment, plan(two, 2, ()))
    pids = [int(Path(f"pid{i}").read_text()) for i in (0, 1)]
    # Back before the arms' 4 s exit is over: both are still there, their runs complete.
    assert all(Path(f"/proc/{pid}").exists() for pid in pids)
    assert [(o.returncode, o.error) for o in outcomes] == [(0, ""), (0, "")]
    assert all(client.get_run(o.run_id).info.status == "FINISHED" for o in outcomes)
    assert all(_reaped(pid, timeout_s=60) for pid in pids)  # then waited for in the background: no zombie


def test_an_unused_fork_server_dies_with_the_block_and_says_nothing(capfd: pytest.CaptureFixture) -> None:
    two = cfg(placement="parallel", devices="cpu")
    with pytest.raises(ValueError, match="bad input"), launch.standby(two, 2) as server:
        assert server.proc.poll() is None and server.proc.args[-3:-1] == ["--standby", "--report-fd"]
        raise ValueError("bad input")  # what preflight raises for a bad model name: no run, no arm needed
    assert server.proc.returncode == -signal.SIGKILL  # killed while importing, and reaped
    assert capfd.readouterr() == ("", "")  # nothing from it on the launcher's terminal
    early = zygote.prestart()  # what `python -m lab run` does first thing, before it has read the config
    with launch.standby(cfg(placement="ray"), 2) as server:
        assert server is None  # the cluster starts Ray's arms: the server started early is killed
    assert early.proc.returncode == -signal.SIGKILL and zygote.take_prestarted() is None


# ---- whole jobs, one per placement -------------------------------------------------------------------


PLACEMENTS = ("lockstep", "parallel", "sequential")


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.Popen, Path]]:
    """The three jobs, started at once (most of each is importing in one process at a time)."""
    started = {}
    for placement in PLACEMENTS:
        folder = tmp_path_factory.mktemp(placement)
        env = subprocess_env(f"sqlite:///{folder}/mlflow.db") | {"AB_LOCKSTEP_ORDER_LOG": str(folder / "order.log")}
        command = [sys.executable, "-m", "lab", "run", *FAST_ARGS, "--placement", placement, "--devices", "cpu"]
        proc = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        started[placement] = (proc, folder)
    yield started
    for proc, _ in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def run_job(jobs: dict[str, tuple[subprocess.Popen, Path]], placement: str) -> tuple[str, Path]:
    """Wait for one job to succeed; returns its tracking URI and folder."""
    proc, folder = jobs[placement]
    _, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr[-3000:]
    return f"sqlite:///{folder}/mlflow.db", folder


def finished_job(uri: str, placement: str) -> tuple[list, dict[str, pd.DataFrame]]:
    """Check the parent and both children finished; return the children (by arm index) and their batch tables."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get("ab.role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["ab.placement"] == placement
    children = sorted((r for r in runs if r.data.tags.get("ab.role") == "child"),
                      key=lambda r: int(r.data.tags["ab.arm_index"]))
    assert [c.info.status for c in children] == ["FINISHED", "FINISHED"]
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    assert all(c.data.tags["ab.placement"] == placement for c in children)
    # Each arm was forked from the server the launcher started (its imports done once, during preflight).
    assert [c.data.tags["ab.arm_process"] for c in children] == ["forked", "forked"]
    tables = {}
    for child in children:
        path = client.download_artifacts(child.info.run_id, "telemetry/batches.parquet")
        tables[child.data.tags["ab.arm"]] = pd.read_parquet(path)
        assert len(tables[child.data.tags["ab.arm"]]) == 2  # 29 test images in batches of 16
    return children, tables


@pytest.mark.slow
def test_lockstep_job_alternates_the_arms_batch_by_batch(jobs: dict) -> None:
    uri, folder = run_job(jobs, "lockstep")
    children, _ = finished_job(uri, "lockstep")
    order = [line.split() for line in (folder / "order.log").read_text().splitlines()]
    assert [(rank, stage) for rank, stage, _ in order] == [("0", "test"), ("1", "test")] * 2
    assert [int(i) for _, _, i in order] == [0, 0, 1, 1]
    assert all(c.data.tags["ab.cpu_threads"] == str(CORES) for c in children)  # each arm has every core


@pytest.mark.slow
def test_parallel_job_on_the_cpu_splits_the_cores(jobs: dict) -> None:
    uri, folder = run_job(jobs, "parallel")
    children, _ = finished_job(uri, "parallel")
    assert all(c.data.tags["ab.cpu_threads"] == str(max(1, CORES // 2)) for c in children)
    assert not (folder / "order.log").exists()  # no turns taken


@pytest.mark.slow
def test_sequential_job_runs_one_arm_after_the_other(jobs: dict) -> None:
    uri, _ = run_job(jobs, "sequential")
    children, _ = finished_job(uri, "sequential")
    first, second = children
    assert first.info.end_time <= second.info.start_time
    assert all(c.data.tags["ab.cpu_threads"] == str(CORES) for c in children)

