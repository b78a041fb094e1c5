"""Tests of lab/doctor.py: `python -m lab doctor [--fix]` on a SQLite store with runs a crashed job left RUNNING.

    .venv/bin/python -m pytest tests/test_doctor.py -q
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from mlflow import MlflowClient

from lab import cli, doctor, lifecycle


def running(client, pid: int, role: str = "child") -> str:
    tags = {"ab.role": role, lifecycle.HOST_TAG: socket.gethostname(), lifecycle.PID_TAG: str(pid)}
    return client.create_run("0", tags=tags).info.run_id


def test_doctor_lists_then_ends_only_the_runs_whose_process_is_gone(tracking: str, capsys) -> None:
    client = MlflowClient()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    parent, child = running(client, proc.pid, "parent"), running(client, proc.pid)
    alive = running(client, os.getpid())
    foreign = client.create_run("0").info.run_id  # not ablab's: never touched

    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"stale: {parent}" in out and f"stale: {child}" in out and alive not in out and foreign not in out
    assert client.get_run(child).info.status == "RUNNING"

    assert cli.main(["doctor", "--fix"]) == 0
    assert "ended FAILED" in capsys.readouterr().out
    for run_id in (parent, child):
        run = client.get_run(run_id)
        assert (run.info.status, run.data.tags["ab.error"]) == ("FAILED", doctor.STALE_ERROR)
    assert {client.get_run(r).info.status for r in (alive, foreign)} == {"RUNNING"}
    assert cli.main(["doctor"]) == 0
    assert "no stale runs" in capsys.readouterr().out


def test_doctor_of_an_unknown_experiment_is_one_line(tracking: str, capsys) -> None:
    assert cli.main(["doctor", "--experiment", "nope"]) == cli.EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip() == "ablab: error: experiment 'nope' does not exist"


def test_doctor_names_the_spool_folder_of_a_job_that_lost_its_server(tracking: str, tmp_path, capsys) -> None:
    from lab import spool

    client = MlflowClient()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    parent = running(client, proc.pid, "parent")
    folder = tmp_path / "spool" / parent
    folder.mkdir(parents=True)
    (folder / spool.PARENT).write_text("{}")
    client.set_tag(parent, spool.SPOOL_TAG, str(folder))
    assert cli.main(["doctor"]) == 0
    assert f"stale: {parent}" in (out := capsys.readouterr().out) and f"python -m lab resume {folder}" in out
