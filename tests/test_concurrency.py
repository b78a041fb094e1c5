"""Eight arms logging at once -- eight processes, released together -- to one SQLite store lose and fail nothing.

Each worker does what an arm does: create a child run, log params and tags in a batch, per-step metrics in many
small batches, a predictions parquet, and end FINISHED. SQLite serialises writers; MLflow's SQLAlchemy store
sets `PRAGMA busy_timeout = 20000` on every session, so a writer waits for the lock instead of failing with
"database is locked" (the parent creates the database first, as `python -m lab run` does, so no two processes
race to create the tables). tests/test_server.py runs the same eight workers against an `mlflow server`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ARMS = 8
STEPS = 12
WORKER = '''
import sys, time
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

experiment_id, parent, index, barrier = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
client = MlflowClient()
client.get_experiment(experiment_id)  # connect (and import everything) before the start signal
(barrier / f"ready{index}").touch()
while not (barrier / "go").exists():
    time.sleep(0.01)
run_id = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent, "ab.role": "child",
                                                "ab.arm_index": str(index)}).info.run_id
client.log_batch(run_id, params=[Param(f"p{j}", str(j)) for j in range(40)],
                 tags=[RunTag(f"ab.t{j}", str(index)) for j in range(10)])
for step in range(STEPS):
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"m{j}", index * 1000 + step, now, step) for j in range(5)])
path = barrier / f"predictions{index}.parquet"
pd.DataFrame({"sample_id": np.arange(500), "pred": np.full(500, index)}).to_parquet(path)
client.log_artifact(run_id, str(path), "predictions")
client.set_terminated(run_id, "FINISHED")
'''.replace("STEPS", str(STEPS))


def run_eight_arms(tmp: Path, env: dict[str, str], experiment: str) -> None:
    """Start ARMS workers under one parent, release them together, and check every run, metric and artifact."""
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment_id = client.create_experiment(experiment)
    parent = client.create_run(experiment_id, tags={"ab.role": "parent"}).info.run_id
    barrier = tmp / experiment
    barrier.mkdir(parents=True)
    script = barrier / "worker.py"
    script.write_text(WORKER)
    procs = [subprocess.Popen([sys.executable, str(script), experiment_id, parent, str(i), str(barrier)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(ARMS)]
    deadline = time.monotonic() + 300
    while len(list(barrier.glob("ready*"))) < ARMS and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.1)
    (barrier / "go").touch()
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    for i, (code, err) in enumerate(results):
        assert code == 0 and "locked" not in err, f"worker {i} exited {code}:\n{err[-2000:]}"

    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(int(r.data.tags["ab.arm_index"]) for r in children) == list(range(ARMS))
    for run in children:
        i = int(run.data.tags["ab.arm_index"])
        assert run.info.status == "FINISHED"
        assert len(run.data.params) == 40 and run.data.tags["ab.t9"] == str(i)
        history = client.get_metric_history(run.info.run_id, "m4")
        assert sorted(m.step for m in history) == list(range(STEPS))
        assert run.data.metrics["m0"] == i * 1000 + STEPS - 1
        local = client.download_artifacts(run.info.run_id, "predictions", str(tmp / f"download-{experiment}-{i}"))
        assert (pd.read_parquet(Path(local) / f"predictions{i}.parquet")["pred"] == i).all()


@pytest.mark.slow
def test_eight_arms_log_at_once_to_one_sqlite_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import subprocess_env

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)  # artifacts of a SQLite store land in ./mlruns
    run_eight_arms(tmp_path, subprocess_env(uri), "eight-arms")
