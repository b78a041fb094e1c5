"""Tracking-server outages against a real `mlflow server` (issue 11): killed while the arms run and back within
outage_window_s (the job waits and finishes), and killed for good (the job stops within the window plus a minute
with one line naming its spool folder; with the server back, `python -m lab resume <dir>` finishes every run).

    .venv/bin/python -m pytest tests/test_outage.py -q

The server is SIGKILLed while both arms wait at the start of their test loop (AB_TEST_PAUSE_IN=test) and restarted
on the same port with the same SQLite store and artifact folder. The job: two tiny random-weight models, fake
data, no training.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import FAST_ARGS
from mlflow import MlflowClient
from mlflow_servers import Server, start_server

from lab import cli, history, lifecycle, outage, spool
from lab.config import load_config

ARGS = [*FAST_ARGS, "--fake_samples", "64"]  # later options win
WAIT_S = 300


def serve(root: Path, port: int | None = None) -> Server:
    return start_server(root / "server", f"sqlite:///{root}/server/mlflow.db", port=port)


def kill(server: Server) -> None:
    os.killpg(server.proc.pid, signal.SIGKILL)  # the server and its worker: no goodbye to the clients
    server.proc.wait()


def env_for(server: Server, tmp_path: Path) -> dict[str, str]:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {k: v for k, v in server.env().items() if not k.startswith("MLFLOW_EXPERIMENT")}
    return env | {"TMPDIR": str(tmp_path / "tmp")}


def start_job(server: Server, tmp_path: Path, window_s: float, pause: bool = True,
              **env: str) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / f"paused-{time.monotonic_ns()}"
    marker.mkdir()
    (marker / "hold").touch()
    env = env_for(server, tmp_path) | env | {lifecycle.MARKER_ENV: str(marker)}
    if pause:
        env[lifecycle.PAUSE_ENV] = "test"
    cmd = [sys.executable, "-m", "lab", "run", *ARGS, "--outage_window_s", str(window_s),
           "--data_dir", str(tmp_path / "cache")]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    return proc, marker


def wait_paused(proc: subprocess.Popen, marker: Path, count: int = 2) -> None:
    deadline = time.monotonic() + WAIT_S
    while len([p for p in marker.iterdir() if p.name.isdigit()]) < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the arms never reached the pause point"
        time.sleep(0.2)


def wait_kept(proc: subprocess.Popen, folder: Path, count: int = 2) -> None:
    """Until `count` arms have kept metrics in their spool folders (they found the server gone)."""
    deadline = time.monotonic() + WAIT_S
    while len([b for job in folder.glob("*") for b in spool.arm_spools(job) if b.manifest["metrics"]]) < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the arms never found the server gone"
        time.sleep(0.5)


def finish(proc: subprocess.Popen) -> tuple[int, str, list[str]]:
    _, err = proc.communicate(timeout=WAIT_S)
    return proc.returncode, err, [line for line in err.splitlines() if "ablab: error:" in line]


def lab(server: Server, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lab", *args], env=env_for(server, tmp_path) | env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=WAIT_S, check=False)


def by_role(uri: str) -> tuple[list, list]:
    client = MlflowClient(uri)
    found = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return ([r for r in found if r.data.tags.get("ab.role") == "parent"],
            [r for r in found if r.data.tags.get("ab.role") == "child"])


def all_runs(uri: str) -> list:
    parents, children = by_role(uri)
    return parents + children


def assert_finished(uri: str) -> tuple[list, list]:
    """Every run FINISHED; children complete with verified predictions; each parent has its verdict and report."""
    client = MlflowClient(uri)
    parents, children = by_role(uri)
    assert {r.info.status for r in parents + children} == {"FINISHED"}
    for child in children:
        assert lifecycle.is_complete(child) and "ab.error" not in child.data.tags
        lifecycle.verify_predictions(client, child.info.run_id)
        assert "latency_ms_p50" in child.data.metrics  # telemetry, kept while the server was away
    for parent in parents:
        assert parent.data.tags.get("ab.verdict") and "ab.error" not in parent.data.tags
        assert "comparison/report.html" in [f.path for f in client.list_artifacts(parent.info.run_id, "comparison")]
    return parents, children


@pytest.mark.slow
def test_a_server_back_within_the_window_costs_only_the_wait(tmp_path: Path) -> None:
    """Killed while the arms test, back some seconds later: the arms keep their metrics and telemetry locally,
    upload them once it answers, and the job finishes as if nothing happened (exit 0, every run FINISHED)."""
    server = serve(tmp_path)
    port = urlparse(server.uri).port
    try:
        # One HTTP retry instead of ablab's four: the arms notice the outage in about a second, not 15.
        proc, marker = start_job(server, tmp_path, window_s=240, MLFLOW_HTTP_REQUEST_MAX_RETRIES="1")
        wait_paused(proc, marker)
        kill(server)
        (marker / "hold").unlink()
        wait_kept(proc, tmp_path / "cache" / "spool")  # both arms tested and kept their metrics locally
        server = serve(tmp_path, port)
        code, err, errors = finish(proc)
        assert (code, errors) == (0, []), err
        assert "tracking server unreachable since" in err and "tracking server back after" in err, err
        parents, children = assert_finished(server.uri)
        assert (len(parents), len(children)) == (1, 2)
        assert not (tmp_path / "cache" / "spool" / parents[0].info.run_id).exists()  # nothing left to resume
    finally:
        server.stop()


@pytest.mark.slow
def test_a_server_lost_for_good_stops_the_job_and_resume_finishes_it(tmp_path: Path, monkeypatch, capsys) -> None:
    """Killed for good: exit 1 within outage_window_s + 60 s with one line naming the spool folder. `resume` of a
    wrong folder, or before the server is back, is one line (exit 2). With the server back, `resume <dir>`
    completes the children from the spool and the parent in place (FINISHED, with its report); a second `resume`
    changes nothing; a rerun would reuse both arms. `resume` runs as a command once, the other calls in-process."""
    window_s = 8  # short: the path is the same at any length, and the test waits it out
    server = serve(tmp_path)
    port = urlparse(server.uri).port
    try:
        proc, marker = start_job(server, tmp_path, window_s)
        wait_paused(proc, marker)
        kill(server)
        killed = time.monotonic()
        (marker / "hold").unlink()
        code, err, errors = finish(proc)
        took = time.monotonic() - killed
        with capsys.disabled():
            print(f"server lost for good: exit {code} after {took:.1f} s (window {window_s} s)")
        assert code == 1 and len(errors) == 1, err
        assert took < window_s + 60, took
        line = errors[0]
        assert "tracking server unreachable since" in line and "python -m lab resume " in line, line
        folder = Path(line.rsplit("python -m lab resume ", 1)[1].strip())
        assert (folder / spool.PARENT).is_file()
        kept = spool.arm_spools(folder)
        assert len(kept) == 2 and all((b.files / "predictions" / "predictions.parquet").is_file() for b in kept)

        for key, value in {**lifecycle.HTTP_ENV, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}.items():
            monkeypatch.setenv(key, value)  # the in-process `resume` sets them; restored after the test
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        capsys.readouterr()
        assert cli.main(["resume", str(folder)]) == cli.EXIT_BAD_INPUT  # still away
        assert capsys.readouterr().err.count("ablab: error: tracking server") == 1
        assert cli.main(["resume", str(tmp_path / "nowhere")]) == cli.EXIT_BAD_INPUT
        assert capsys.readouterr().err.strip().splitlines() == [
            f"ablab: error: resume: {tmp_path / 'nowhere'} is not an ablab spool folder (no readable parent.json); "
            "give the folder that the failed job's last line names"]

        server = serve(tmp_path, port)
        assert {r.info.status for r in all_runs(server.uri)} == {"RUNNING"}  # what the lost job left
        done = lab(server, tmp_path, "resume", str(folder))
        assert done.returncode == 0, done.stderr
        parents, children = assert_finished(server.uri)
        assert (len(parents), len(children)) == (1, 2)
        assert parents[0].data.tags["ab.resumed_from"] == str(folder)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "4")
        assert cli.main(["resume", str(folder)]) == 0
        assert "finished already" in capsys.readouterr().err
        assert {r.info.status for r in all_runs(server.uri)} == {"FINISHED"}

        reused = history.reusable_arms(load_config(folder / "config.yaml"))
        assert {i: r.info.run_id for i, r in reused.items()} == {
            int(c.data.tags["ab.arm_index"]): c.info.run_id for c in children}
    finally:
        server.stop()


def test_the_holding_client_keeps_what_the_arm_logs_while_the_server_is_away_and_uploads_it_once(
    tracking: str, tmp_path: Path
) -> None:
    """On a SQLite store: while the server is marked away, log_batch and log_artifact land in the spool folder, not
    in the run; the upload sends them in one batch plus the files, and a second upload (resume) sends nothing."""
    from mlflow.entities import Metric, RunTag

    client = MlflowClient()
    run_id = client.create_run("0").info.run_id
    box = spool.ArmSpool.create(tmp_path / "arm0", run_id)
    holding = spool.HoldingClient(box, window_s=5)
    table = tmp_path / "batches.parquet"
    table.write_bytes(b"not really parquet")
    outage.mark_unreachable(time.time(), note=False)
    try:
        holding.log_batch(run_id, metrics=[Metric("latency_ms_p50", 1.5, 0, 0)], tags=[RunTag("ab.x", "1")])
        holding.log_artifact(run_id, str(table), "telemetry")
    finally:
        outage.mark_reachable()
    assert client.get_run(run_id).data.metrics == {} and (box.files / "telemetry" / table.name).is_file()
    box.results_written()
    box.upload(holding)
    run = client.get_run(run_id)
    assert (run.data.metrics, run.data.tags["ab.x"]) == ({"latency_ms_p50": 1.5}, "1")
    assert [f.path for f in client.list_artifacts(run_id, "telemetry")] == ["telemetry/batches.parquet"]
    again = spool.ArmSpool.read(box.folder)
    assert again.manifest["state"] == spool.UPLOADED and again.manifest["metrics"] == []
    again.upload(client)
    assert len(client.get_metric_history(run_id, "latency_ms_p50")) == 1


def test_resume_completes_the_arms_it_can_and_fails_the_parent_naming_the_others(tracking: str, tmp_path: Path,
                                                                                monkeypatch, capsys) -> None:
    """On a SQLite store: arm a lost the server before its predictions existed (state "running"), arm b after
    (its results kept). `resume` completes b from the spool, ends a and the parent FAILED naming a (exit 1, one
    line), and leaves nothing RUNNING."""
    import json

    import numpy as np
    from history_fakes import correct_mask, predictions

    client = MlflowClient()
    parent = client.create_run("0", tags={"ab.role": "parent"}).info.run_id
    folder = tmp_path / "spool" / parent
    children = []
    for i, name in enumerate("ab"):
        tags = {"mlflow.parentRunId": parent, "ab.role": "child", "ab.arm_index": str(i), "ab.n_test": "30"}
        run_id = client.create_run("0", tags=tags).info.run_id
        box = spool.ArmSpool.create(folder / f"arm{i}", run_id, i, name)
        children.append(run_id)
    (box.files / "predictions").mkdir()
    predictions(np.arange(30) % 3, correct_mask(30, 0.8)).to_parquet(box.files / "predictions" / "predictions.parquet")
    box.results_written()
    (folder / spool.PARENT).write_text(json.dumps({"tracking_uri": tracking, "experiment_id": "0",
                                                   "parent_run_id": parent, "names": ["a", "b"], "run_name": "a vs b",
                                                   "config": "", "window_s": 5}))
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # `resume` sets it; restored after
    assert cli.main(["resume", str(folder)]) == cli.EXIT_FAILED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ablab: error: resume: arm a: the tracking server was lost before its "
                                               "predictions existed"), err
    lost, kept = (client.get_run(r) for r in children)
    assert lost.info.status == "FAILED" and "lost before its predictions" in lost.data.tags["ab.error"]
    assert lifecycle.is_complete(kept) and lifecycle.has_predictions(client, kept.info.run_id)
    assert client.get_run(parent).info.status == "FAILED"
    assert not (folder / "arm1").exists()  # uploaded and completed: nothing left to keep
