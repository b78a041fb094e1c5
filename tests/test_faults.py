"""The fault matrix of the run lifecycle (issue 11): a signal to the launcher, an arm killed in `fit` or `test`.
Each case checks the exit code, the single `ablab: error:` line, every run's final status (none RUNNING), the
finished arms' artifacts, and what a rerun reuses.

    .venv/bin/python -m pytest tests/test_faults.py -q

The job is `python -m lab run` with two tiny random-weight models on fake data and one epoch. Arms pause at a
known point (AB_TEST_PAUSE_IN=fit|test, lab/lifecycle.py) and write their pid to a marker folder, so that the
fault lands where it should; they go on once the test removes the folder's `hold` file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST_ARGS, subprocess_env
from mlflow import MlflowClient

from lab import history, lifecycle
from lab.cli import DEFAULT_CONFIG
from lab.config import config_path, load_config

ARGS = [*FAST_ARGS, "--epochs", "1", "--fake_samples", "64"]  # later options win
WAIT_S = 240


def start_job(tmp_path: Path, uri: str, pause: str | None, *extra: str) -> tuple[subprocess.Popen, Path]:
    """`python -m lab run` in its own session (a terminal's Ctrl-C goes to the whole group); arms pause at
    `pause` until the marker folder's `hold` file is removed."""
    marker = tmp_path / f"paused-{time.monotonic_ns()}"
    marker.mkdir()
    (marker / "hold").touch()
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = subprocess_env(uri) | {"TMPDIR": str(tmp_path / "tmp"), lifecycle.MARKER_ENV: str(marker)}
    if pause:
        env[lifecycle.PAUSE_ENV] = pause
    proc = subprocess.Popen([sys.executable, "-m", "lab", "run", *ARGS, *extra], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return proc, marker


def paused_pids(proc: subprocess.Popen, marker: Path, count: int) -> list[int]:
    """The pids of the first `count` arms to reach the pause point."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        pids = [int(p.name) for p in marker.iterdir() if p.name.isdigit()]
        if len(pids) >= count:
            return sorted(pids)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError("the arms never reached the pause point")


def finish(proc: subprocess.Popen) -> tuple[int, list[str]]:
    _, err = proc.communicate(timeout=WAIT_S)
    return proc.returncode, [line for line in err.splitlines() if "ablab: error:" in line]


def all_runs(uri: str) -> list:
    client = MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def by_role(uri: str) -> tuple[list, list]:
    found = all_runs(uri)
    return ([r for r in found if r.data.tags.get("ab.role") == "parent"],
            [r for r in found if r.data.tags.get("ab.role") == "child"])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize(("how", "code"), [("SIGINT to the group", 130), ("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_signal_to_the_launcher_ends_every_run_killed_quietly(tracking: str, tmp_path: Path, how: str,
                                                                 code: int) -> None:
    """Ctrl-C (SIGINT to the whole process group), `timeout`/Docker/SLURM (SIGTERM) and a closed terminal (SIGHUP):
    exit 128+N with one line, parent and children KILLED with `ab.error` "interrupted", arms reaped, no
    temporary folder left."""
    proc, marker = start_job(tmp_path, tracking, "fit")
    arms = paused_pids(proc, marker, 2)
    started = time.monotonic()
    if how.startswith("SIGINT"):
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(getattr(signal, how))
    returncode, errors = finish(proc)
    took = time.monotonic() - started
    print(f"{how}: exit {returncode} after {took:.1f} s")
    assert (returncode, errors) == (code, ["ablab: error: interrupted"])
    assert took < 30, took
    parents, children = by_role(tracking)
    assert len(parents) == 1 and len(children) == 2
    for run in parents + children:
        assert (run.info.status, run.data.tags.get("ab.error")) == ("KILLED", "interrupted")
    assert not any(alive(pid) for pid in arms)
    assert not list((tmp_path / "tmp").glob("ablab-arms-*"))


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "placement", "rerun"), [("fit", "lockstep", False), ("test", "sequential", True)])
def test_an_arm_killed_fails_its_run_and_a_rerun_evaluates_it_again(tracking: str, tmp_path: Path, stage: str,
                                                                   placement: str, rerun: bool) -> None:
    """SIGKILL of one arm in `fit` or in `test` (where Lightning's logger used to leave it FINISHED without
    predictions): that child FAILED "arm killed by signal 9", the other arm FINISHED and complete, the parent
    FAILED; a rerun (after the kill in `test`, the case that used to poison reuse) would reuse only the complete
    arm and evaluate the killed one again (asked in-process: a second job would double the test's time)."""
    proc, marker = start_job(tmp_path, tracking, stage, "--placement", placement)
    victim = paused_pids(proc, marker, 1)[0]
    os.kill(victim, signal.SIGKILL)
    (marker / "hold").unlink()  # the other arm goes on
    returncode, errors = finish(proc)
    assert returncode == 1 and len(errors) == 1 and "killed by signal 9" in errors[0], errors
    parents, children = by_role(tracking)
    assert [r.info.status for r in parents] == ["FAILED"]
    killed = next(r for r in children if r.data.tags.get(lifecycle.PID_TAG) == str(victim))
    other = next(r for r in children if r is not killed)
    assert (killed.info.status, killed.data.tags.get("ab.error")) == ("FAILED", "arm killed by signal 9")
    assert other.info.status == "FINISHED" and lifecycle.is_complete(other)
    client = MlflowClient(tracking)
    lifecycle.verify_predictions(client, other.info.run_id)
    assert not lifecycle.has_predictions(client, killed.info.run_id)
    if not rerun:
        return
    overrides = dict(zip(ARGS[::2], ARGS[1::2], strict=True)) | {"--placement": placement}
    cfg = load_config(config_path(DEFAULT_CONFIG), {k.removeprefix("--"): v for k, v in overrides.items()})
    reused = history.reusable_arms(cfg)
    assert {i: r.info.run_id for i, r in reused.items()} == {int(other.data.tags["ab.arm_index"]): other.info.run_id}
    assert "RUNNING" not in {r.info.status for r in all_runs(tracking)}
