"""Tests of lab/lifecycle.py on a SQLite store: completion after verified predictions, reuse of complete runs only,
stale runs, arms ended by a signal, signals as Ctrl-C, and `mlflow run`'s own run on bad input.

    .venv/bin/python -m pytest tests/test_lifecycle.py -q
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from history_fakes import correct_mask, log_child, predictions
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from lab import cli, history, lifecycle, outage


def fake_run(status: str = "RUNNING", **tags: str) -> SimpleNamespace:
    return SimpleNamespace(info=SimpleNamespace(status=status, run_id="r1", start_time=0),
                           data=SimpleNamespace(tags=tags))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def frame(n: int = 20):
    labels = np.arange(n) % 3
    return predictions(labels, correct_mask(n, 0.7), np.arange(n), num_classes=3)


def test_owner_tags_name_this_process() -> None:
    tags = lifecycle.owner_tags()
    assert (tags[lifecycle.HOST_TAG], tags[lifecycle.PID_TAG]) == (socket.gethostname(), str(os.getpid()))
    assert abs(int(tags[lifecycle.HEARTBEAT_TAG]) - time.time()) < 5


def test_a_run_is_stale_when_its_process_is_gone_or_its_heartbeat_stopped() -> None:
    here, now = socket.gethostname(), time.time()
    assert lifecycle.is_stale(fake_run(**{"ab.host": here, "ab.pid": str(dead_pid())}))
    assert not lifecycle.is_stale(fake_run(**{"ab.host": here, "ab.pid": str(os.getpid())}))
    old, fresh = str(int(now - lifecycle.STALE_AFTER_S - 5)), str(int(now))
    assert lifecycle.is_stale(fake_run(**{"ab.host": "elsewhere", "ab.pid": "1", "ab.heartbeat": old}))
    assert not lifecycle.is_stale(fake_run(**{"ab.host": "elsewhere", "ab.pid": "1", "ab.heartbeat": fresh}))
    assert not lifecycle.is_stale(fake_run("FINISHED", **{"ab.host": here, "ab.pid": str(dead_pid())}))
    assert not lifecycle.is_stale(fake_run())  # an older ablab's run: nothing to tell by


EXITING = """
import atexit, sys, threading, time
from pathlib import Path
from lab import lifecycle
def late():
    time.sleep(0.5)
    Path("thread").write_text("joined")
threading.Thread(target=late).start()  # not a daemon: a normal exit waits for it
atexit.register(lambda: Path("atexit").write_text(Path("thread").read_text() + " then handler"))
print("flushed", end="")
sys.stderr.write("flushed too")
lifecycle.exit_now(3)
print("never")
"""


def test_exit_now_joins_threads_runs_exit_handlers_flushes_and_keeps_the_code(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-c", EXITING], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "flushed", "flushed too")
    assert (tmp_path / "atexit").read_text() == "joined then handler"


def test_the_collector_resumes_only_when_the_last_paused_section_in_any_thread_ends() -> None:
    entered, release = threading.Event(), threading.Event()

    def other() -> None:
        with lifecycle.gc_paused():
            entered.set()
            release.wait(10)

    assert gc.isenabled()
    thread = threading.Thread(target=other)
    thread.start()
    entered.wait(10)
    with lifecycle.gc_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()  # the other thread's search is still loading
    release.set()
    thread.join()
    assert gc.isenabled()
    gc.disable()
    try:  # a caller that had it off finds it off
        with lifecycle.gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_stale_note_counts_the_test_sets_runs_and_says_at_least_past_its_scan(tracking: str,
                                                                                   monkeypatch) -> None:
    client = MlflowClient()
    stale = {"ab.host": "elsewhere", "ab.heartbeat": "1000"}
    frame = predictions(np.array([0, 1, 2]), np.array([True, True, False]))
    fingerprint = "sha256:" + "cd" * 16  # not the fakes' own
    for _ in range(3):
        log_child(client, "0", frame, status="RUNNING", **stale, **{"ab.dataset_fingerprint": fingerprint})
    log_child(client, "0", frame, status="RUNNING", **stale)  # on another test set
    assert "3 run(s) on this test set left RUNNING" in lifecycle.stale_note(client, ["0"], fingerprint)
    assert "4 run(s) left RUNNING" in lifecycle.stale_note(client, ["0"])
    assert len(lifecycle.stale_runs(client, ["0"])) == 4
    monkeypatch.setattr(lifecycle, "STALE_NOTE_SCAN", 2)
    assert "at least 2 run(s) on this test set" in lifecycle.stale_note(client, ["0"], fingerprint)


def test_predictions_are_verified_before_the_run_is_complete(tracking: str) -> None:
    client = MlflowClient()
    good = log_child(client, "0", frame(20), status="RUNNING", **{"ab.n_test": "20"})
    lifecycle.verify_predictions(client, good)
    lifecycle.complete(client, good)
    run = client.get_run(good)
    assert lifecycle.is_complete(run) and lifecycle.reusable(client, run)
    short = log_child(client, "0", frame(20), status="RUNNING", **{"ab.n_test": "30"})
    with pytest.raises(RuntimeError, match="20 rows of 30"):
        lifecycle.verify_predictions(client, short)
    columns = log_child(client, "0", frame(20).drop(columns=["confidence"]), status="RUNNING", **{"ab.n_test": "20"})
    with pytest.raises(RuntimeError, match="confidence missing"):
        lifecycle.verify_predictions(client, columns)


def test_reuse_takes_only_complete_runs(tracking: str) -> None:
    """A FINISHED child without the completion tag (an older ablab's arm killed in `test`) is never reused."""
    client = MlflowClient()
    tags = {"ab.dataset_fingerprint": "sha256:x", "ab.preprocess": "p", "ab.precision": "32-true"}
    key = history.EvalKey("timm:resnet10t:pretrained=False:classes=3", "sha256:x", "p", "32-true", (("epochs", "0"),))
    log_child(client, "0", frame(), **tags, **{"ab.complete": "false"})
    assert history.find_reusable(client, key, ["0"]) is None
    complete = log_child(client, "0", frame(), **tags)
    assert history.find_reusable(client, key, ["0"]).info.run_id == complete


def test_the_arm_logger_never_ends_the_run(tracking: str) -> None:
    client = MlflowClient()
    run_id = client.create_run("0").info.run_id
    logger = lifecycle.arm_logger(tracking, run_id)
    logger.log_metrics({"loss": 1.0}, step=0)
    logger.finalize("success")
    assert client.get_run(run_id).info.status == "RUNNING"


@pytest.mark.parametrize(("code", "interrupted", "status", "error"), [
    (-9, False, "FAILED", "arm killed by signal 9"),
    (-15, True, "KILLED", "interrupted"),
    (1, False, "FAILED", "arm exited with code 1 without ending its run"),
])
def test_an_arm_that_left_its_run_running_is_settled(tracking: str, code: int, interrupted: bool, status: str,
                                                     error: str) -> None:
    client = MlflowClient()
    run_id = client.create_run("0").info.run_id
    lifecycle.settle_arm(client, run_id, code, interrupted)
    run = client.get_run(run_id)
    assert (run.info.status, run.data.tags["ab.error"]) == (status, error)
    finished = client.create_run("0").info.run_id
    client.set_terminated(finished, "FINISHED")
    lifecycle.settle_arm(client, finished, code, interrupted)
    assert client.get_run(finished).info.status == "FINISHED"


def test_sigterm_and_sighup_take_the_ctrl_c_path_once() -> None:
    previous = lifecycle.raise_on_signals()
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGHUP)  # a second signal during the cleanup is ignored
        time.sleep(0.1)
        assert (lifecycle.received_signal(), lifecycle.interrupted_exit_code()) == (signal.SIGTERM, 143)
    finally:
        lifecycle.restore_signals(previous)


def test_bad_input_under_mlflow_run_fails_its_run_with_the_line(tracking: str, monkeypatch, capsys) -> None:
    """`mlflow run` created the run (MLFLOW_RUN_ID): bad input still prints one line, exits 2, and that run ends
    FAILED with the line in `ab.error`."""
    client = MlflowClient()
    run_id = client.create_run("0").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    assert cli.main(["run", "--epochs", "-1"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ablab: error: ") and "epochs" in err[0]
    run = client.get_run(run_id)
    assert (run.info.status, "ablab: error: " + run.data.tags["ab.error"]) == ("FAILED", err[0])


def test_unreachable_names_connection_errors_only() -> None:
    assert outage.unreachable(ConnectionError("Max retries exceeded with url: /api (Connection refused)"))
    assert not outage.unreachable(ValueError("epochs: must be >= 0"))
    assert outage.unreachable_line(0).startswith("tracking server unreachable since ")


def closed_port_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once the socket is closed


def test_a_lost_server_is_waited_for_within_the_window_then_server_lost(monkeypatch, capsys) -> None:
    """Against a port where nothing listens: the call is retried until the window has passed, then ServerLost;
    meanwhile MLflow's own retries are off (fail fast) and restored once a call succeeds."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    client = outage.patient(MlflowClient(closed_port_uri()), window_s=2.0)
    started = time.monotonic()
    try:
        with pytest.raises(outage.ServerLost, match="longer than outage_window_s=2 s") as lost:
            client.get_run("0" * 32)
        assert 2.0 <= time.monotonic() - started < 15
        assert outage.unreachable(lost.value) and outage.outage_since() == lost.value.since
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
        assert capsys.readouterr().err.count("ablab: note: tracking server unreachable since") == 1
    finally:
        outage.mark_reachable()
    assert outage.outage_since() is None and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"


def test_a_patient_call_goes_on_when_the_server_answers_and_passes_other_errors_at_once(tracking: str) -> None:
    tries = []

    def flaky() -> str:
        tries.append(time.monotonic())
        if len(tries) < 3:
            raise ConnectionError("Max retries exceeded with url: /api (Connection refused)")
        return "ok"

    client = outage.patient(MlflowClient(), window_s=30)
    assert client.call(flaky) == "ok" and len(tries) == 3
    assert outage.outage_since() is None
    started = time.monotonic()
    with pytest.raises(MlflowException):
        client.get_run("0" * 32)  # the server answered: no waiting
    assert time.monotonic() - started < 5


def test_an_arm_that_gave_up_on_the_server_is_left_for_resume(tracking: str) -> None:
    client = MlflowClient()
    run_id = client.create_run("0").info.run_id
    lifecycle.settle_arm(client, run_id, lifecycle.EXIT_SERVER_LOST, interrupted=False)
    assert client.get_run(run_id).info.status == "RUNNING"
