"""`python -m lab doctor [--fix]`: find ablab runs that a crashed job left RUNNING (their process is gone: known
by their host and pid tags, or a heartbeat older than lifecycle.STALE_AFTER_S) and, with --fix, end them FAILED
with `ab.error` "stale: process gone". A job that lost its tracking server left its results in a spool folder:
doctor names it, and `python -m lab resume <dir>` still finishes that job after --fix.

    python -m lab doctor             # list them
    python -m lab doctor --fix       # end them
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run

from lab import lifecycle, runs, spool

STALE_ERROR = "stale: process gone"


def describe(run: Run) -> str:
    tags = run.data.tags
    where = f"{tags.get(lifecycle.HOST_TAG, '?')} pid {tags.get(lifecycle.PID_TAG, '?')}"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.info.start_time / 1000))
    line = f"{run.info.run_id} ({tags.get('ab.role')} {tags.get('mlflow.runName', '')!r}, started {started}, {where})"
    folder = tags.get(spool.SPOOL_TAG)
    if folder and (Path(folder) / spool.PARENT).is_file():  # a lost server: its results wait there
        line += f"; results kept in {folder}: python -m lab resume {folder}"
    return line


def doctor(experiment: str = "", fix: bool = False) -> list[str]:
    """Print (and with `fix`, end FAILED) the stale runs; returns their run ids."""
    client = MlflowClient()
    with runs.reading_runs():
        if experiment:
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise ValueError(f"experiment {experiment!r} does not exist")
            experiment_ids = [found.experiment_id]
        else:
            experiment_ids = runs.readable_experiment_ids(client)
        stale = lifecycle.stale_runs(client, experiment_ids)
    for run in stale:
        if fix:
            lifecycle.end_run(client, run.info.run_id, STALE_ERROR, "FAILED")
        print(f"ablab: {'ended FAILED' if fix else 'stale'}: {describe(run)}")
    if not stale:
        print("ablab: no stale runs")
    elif not fix:
        print(f"ablab: {len(stale)} stale run(s); `python -m lab doctor --fix` ends them FAILED", file=sys.stderr)
    return [r.info.run_id for r in stale]
