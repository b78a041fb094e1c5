"""lab/cluster.py, `placement=ray`: arms as Ray tasks on a two-node cluster on loopback, logging to a real
SQLite-backed `mlflow server`; the same predictions as `sequential`; a lost worker and Ctrl-C end every run.

The cluster and the server start once for the module (about 25 s on a loaded 2-core machine); each job uses
fake data, no training and tiny models.
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
from conftest import FAST_ARGS, runs_by_status, subprocess_env
from mlflow_servers import Server, start_server

from lab import cluster
from lab.cli import main
from lab.config import ConfigError, load_config

ray = pytest.importorskip("ray", reason="placement=ray needs the ray extra: pip install -e '.[ray]'")

ARMS3 = "resnet10t,mobilenetv3_small_100,mobilenetv3_small_050"


# ---- fast: rules that need no cluster ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"placement": "ray", "devices": "0,1"}, "under placement=ray the cluster picks each arm's GPUs"),
        ({"placement": "ray", "ray_address": "http://head:8265"}, "ray_address: 'http://head:8265' is not allowed"),
    ],
)
def test_bad_ray_settings_are_refused_at_load(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize(
    ("uri", "nodes", "remote", "refused"),
    [
        ("sqlite:///mlflow.db", 1, False, False),  # one node on this machine: the local store is fine
        ("sqlite:///mlflow.db", 2, False, True),
        ("file:///tmp/mlruns", 1, True, True),  # ray:// client: the workers are elsewhere
        ("/tmp/mlruns", 3, False, True),
        ("http://mlflow:5000", 8, True, False),
    ],
)
def test_a_store_on_this_disk_is_refused_for_a_multi_node_cluster(uri: str, nodes: int, remote: bool,
                                                                   refused: bool) -> None:
    conn = cluster.Connection(started_here=False, nodes=nodes, remote=remote, gpus=0)
    if not refused:
        cluster.check_tracking(uri, conn)
        return
    with pytest.raises(ValueError, match="start `mlflow server --serve-artifacts` and set MLFLOW_TRACKING_URI"):
        cluster.check_tracking(uri, conn)


@pytest.mark.parametrize(
    ("remote", "job_env", "extra", "expected"),
    [
        (False, {}, None, {}),  # a cluster on this machine runs the code on disk
        (True, {}, None, {"working_dir": str(cluster.ROOT), "excludes": cluster.EXCLUDES}),
        (True, {"working_dir": "gcs://job.zip"}, None, {}),  # a Ray job's working_dir already reaches the tasks
        (False, {}, '{"pip": ["timm==1.0.15"]}', {"pip": ["timm==1.0.15"]}),
    ],
)
def test_the_code_travels_only_to_workers_on_other_machines(remote: bool, job_env: dict, extra: str | None,
                                                            expected: dict) -> None:
    assert cluster.runtime_env(remote, job_env, extra) == expected


@pytest.mark.parametrize("extra", ["{pip: timm}", '["timm"]'])
def test_a_bad_runtime_env_variable_is_one_line(extra: str) -> None:
    with pytest.raises(ValueError, match=r"AB_RAY_RUNTIME_ENV: .*pip"):
        cluster.runtime_env(True, {}, extra)


def test_the_arm_gets_the_tracking_server_and_its_credentials_but_not_the_parent_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "secret")
    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32)  # `mlflow run`'s parent: an arm must never log into it
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # the worker's own (Ray sets it per task)
    env = cluster.driver_env()
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env["MLFLOW_TRACKING_TOKEN"] == "secret"
    assert "MLFLOW_RUN_ID" not in env and "CUDA_VISIBLE_DEVICES" not in env
    assert env["AB_PLACEMENT"] == "ray" and "MLFLOW_HTTP_REQUEST_MAX_RETRIES" in env


def test_a_lost_worker_or_node_is_named_in_one_line() -> None:
    from ray import exceptions as rex

    assert cluster.lost_line("b", rex.WorkerCrashedError()) == "arm b lost: worker died"
    assert cluster.lost_line("c", rex.NodeDiedError("node 1 died")) == "arm c lost: node died"
    assert cluster.lost_line("a", rex.TaskCancelledError()) == "arm a lost: task cancelled"


def test_arms_on_different_gpu_models_are_named_and_ray_latencies_are_never_paired() -> None:
    from lab.compare import Arm, latency_verdict

    def arm(name: str, device: str) -> Arm:
        tags = {"mlflow.parentRunId": "p", "ab.device": device, "ab.gpu_uuid": "none"}
        return Arm(name, f"{name}-run", name, tags, {}, pd.DataFrame())

    assert latency_verdict([arm("a", "cuda:NVIDIA A100"), arm("b", "cuda:NVIDIA H100")], "ray") == (
        False, "arms ran on different devices (cuda:NVIDIA A100 vs cuda:NVIDIA H100): latencies are not comparable")
    comparable, note = latency_verdict([arm("a", "cpu:x"), arm("b", "cpu:x")], "ray")
    assert not comparable and note.startswith("arms ran as Ray tasks")


# ---- slow: a two-node cluster on loopback and a real tracking server ---------------------------------------------

@pytest.fixture(scope="module")
def two_nodes():
    """A head and a second node, one CPU each: two arms at once run on different nodes."""
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    yield nodes.address
    nodes.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ray-server")
    server = start_server(root, f"sqlite:///{root}/mlflow.db")
    yield server
    server.stop()


def _job(server: Server, experiment: str, *args: str, cwd: Path) -> subprocess.Popen:
    env = subprocess_env(server.uri) | {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    cmd = [sys.executable, "-m", "lab", "run", *FAST_ARGS, "--experiment", experiment, "--rerun", "true", *args]
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _runs(server: Server, experiment: str) -> tuple[object, dict[str, object]]:
    """(parent, arm name -> child run) of the one job in `experiment`."""
    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name(experiment)
    found = client.search_runs([exp.experiment_id]) if exp else []
    parents = [r for r in found if r.data.tags.get("ab.role") == "parent"]
    return (parents[0] if parents else None), {r.data.tags["ab.arm"]: r for r in found
                                                if r.data.tags.get("ab.role") == "child"}


def _predictions(server: Server, run_id: str, dst: Path) -> pd.DataFrame:
    from mlflow import MlflowClient

    path = MlflowClient(server.uri).download_artifacts(run_id, "predictions/predictions.parquet", str(dst))
    return pd.read_parquet(path).sort_values("sample_id").reset_index(drop=True)


@pytest.mark.slow  # a Ray cluster, a tracking server and two jobs
def test_abn_on_two_nodes_finishes_with_the_predictions_of_sequential(two_nodes: str, server: Server,
                                                                       tmp_path: Path) -> None:
    ray_job = _job(server, "ray-abn", "--arms", ARMS3, "--placement", "ray", "--ray_address", two_nodes, cwd=tmp_path)
    _, err = ray_job.communicate(timeout=600)
    assert ray_job.returncode == 0, err[-3000:]
    parent, children = _runs(server, "ray-abn")
    assert parent.info.status == "FINISHED" and parent.data.tags["ab.placement"] == "ray"
    assert sorted(children) == sorted(ARMS3.split(",")) and {c.info.status for c in children.values()} == {"FINISHED"}
    assert len({c.data.tags["ab.dataset_fingerprint"] for c in children.values()}) == 1
    assert len({c.data.tags["ab.ray_node_id"] for c in children.values()}) == 2  # both nodes took arms
    assert parent.data.tags["ab.latency_comparable"] == "false"

    seq_job = _job(server, "seq-abn", "--arms", ARMS3, "--placement", "sequential", cwd=tmp_path)
    _, err = seq_job.communicate(timeout=600)
    assert seq_job.returncode == 0, err[-3000:]
    seq_parent, seq_children = _runs(server, "seq-abn")
    assert seq_parent.data.tags["ab.verdict"] == parent.data.tags["ab.verdict"]
    for name in children:
        ours = _predictions(server, children[name].info.run_id, tmp_path / f"ray-{name}")
        theirs = _predictions(server, seq_children[name].info.run_id, tmp_path / f"seq-{name}")
        pd.testing.assert_frame_equal(ours, theirs)


def _wait_running(server: Server, experiment: str, arms: tuple[str, ...], proc: subprocess.Popen,
                  timeout_s: float = 300) -> dict:
    """The children named in `arms` once every one is RUNNING (their arm processes exist)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        _, children = _runs(server, experiment)
        if all(children.get(a) is not None and children[a].info.status == "RUNNING" for a in arms):
            return children
        time.sleep(0.1)
    raise AssertionError(f"arms {arms} never RUNNING in {experiment}")


def _gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    return not Path(f"/proc/{pid}").exists()


@pytest.mark.slow  # a Ray cluster, a tracking server and a job
def test_a_killed_worker_fails_its_arm_and_the_parent_and_keeps_the_other(two_nodes: str, server: Server,
                                                                         tmp_path: Path) -> None:
    # A short fine-tune (420 training images) keeps arm b alive for some seconds after its run exists.
    job = _job(server, "ray-kill", "--placement", "ray", "--ray_address", two_nodes, "--epochs", "1",
               "--fake_samples", "600", cwd=tmp_path)
    children = _wait_running(server, "ray-kill", ("b",), job)
    arm_pid = int(children["b"].data.tags["ab.pid"])
    worker_pid = int(Path(f"/proc/{arm_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the Ray worker
    os.kill(worker_pid, signal.SIGKILL)
    _, err = job.communicate(timeout=300)
    assert job.returncode == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("ablab: error:")]
    assert len(errors) == 1 and "arm b lost: worker died" in errors[0], err[-3000:]
    parent, children = _runs(server, "ray-kill")
    assert parent.info.status == "FAILED" and "arm b lost: worker died" in parent.data.tags["ab.error"]
    assert children["b"].info.status == "FAILED" and children["b"].data.tags["ab.error"].startswith(
        "arm b lost: worker died (node ")
    assert children["a"].info.status == "FINISHED"  # the other arm is kept
    assert _gone(arm_pid, timeout_s=20)


@pytest.mark.slow  # a Ray cluster, a tracking server and a job
def test_ctrl_c_cancels_the_arm_tasks_and_leaves_no_run_running(two_nodes: str, server: Server,
                                                                tmp_path: Path) -> None:
    # A long fine-tune (1,400 training images of 96 px; the job is interrupted): both arms are training at Ctrl-C.
    job = _job(server, "ray-int", "--placement", "ray", "--ray_address", two_nodes, "--epochs", "1",
               "--fake_samples", "2000", "--image_size", "96", cwd=tmp_path)
    children = _wait_running(server, "ray-int", ("a", "b"), job)
    job.send_signal(signal.SIGINT)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 130, err[-3000:]
    parent, children = _runs(server, "ray-int")
    assert parent.info.status == "KILLED"
    # An arm whose run ended complete before the signal stays FINISHED (on an idle machine the first arm can
    # finish before the second has started); every other arm ends KILLED "interrupted", and none stays RUNNING.
    killed = {a: c for a, c in children.items() if c.info.status == "KILLED"}
    assert killed, err[-3000:]
    assert {c.data.tags["ab.error"] for c in killed.values()} == {"interrupted"}
    for name, child in children.items():
        if name not in killed:
            assert child.info.status == "FINISHED" and child.data.tags.get("ab.complete") == "true", name
    for child in children.values():  # Ray ends a cancelled task's worker asynchronously: give it a few seconds
        assert _gone(int(child.data.tags["ab.pid"]), timeout_s=20)


@pytest.mark.slow  # a Ray cluster
def test_a_sqlite_store_with_a_two_node_cluster_is_refused_before_any_run(
        two_nodes: str, tracking: str, capsys: pytest.CaptureFixture) -> None:
    code = main(["run", *FAST_ARGS, "--placement", "ray", "--ray_address", two_nodes])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ablab: error:")]
    assert code == 2 and len(lines) == 1, err
    assert "the Ray cluster has 2 nodes" in lines[0] and "mlflow server --serve-artifacts" in lines[0]
    assert runs_by_status(tracking) == {}
    assert not ray.is_initialized()  # the job left the cluster it joined
