"""ablab against a real shared tracking server: `mlflow server` with proxied artifacts over HTTP.

Two servers, one per backend, each shared by the tests of this module:
- SQLite with MLflow's basic-auth app: users `alice` and `bob` (default permission NO_PERMISSIONS, so each reads
  only their own experiments). Alice runs an A/B job, a second job in another experiment that reuses one arm and
  evaluates a new one, `compare` across the two experiments, and `leaderboard`; Bob, who may not read Alice's
  experiments, gets one error line from `compare`. Eight arms log at once to this server.
- PostgreSQL (scripts/start_postgres.sh; skipped with the reason when it cannot be installed): an A/B job, a
  second job in another experiment that reuses both arms, `compare` and `leaderboard`.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import FAST_ARGS
from history_fakes import log_child, predictions
from mlflow_servers import Server, start_postgres, start_server, stop_postgres
from test_concurrency import run_eight_arms

from lab.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server | str]]:
    """Both servers, started at the same time (each start is mostly one busy core); a str says why one is absent."""
    pg_root = Path(tempfile.mkdtemp(prefix="ablab-pg.", dir="/tmp"))  # user postgres must reach it

    def team() -> Server:
        root = tmp_path_factory.mktemp("sqlite-server")
        server = start_server(root, f"sqlite:///{root}/mlflow.db", auth=True)
        server.add_user("alice", "alice-password-1234")
        server.add_user("bob", "bob-password-1234")
        return server

    def postgres() -> Server | str:
        uri, why = start_postgres(pg_root)
        return start_server(tmp_path_factory.mktemp("postgres-server"), uri) if uri else why

    with ThreadPoolExecutor(2) as pool:
        futures = {"team": pool.submit(team), "postgres": pool.submit(postgres)}
    started = {name: f.result() for name, f in futures.items() if f.exception() is None}
    try:
        for future in futures.values():
            if future.exception() is not None:
                raise future.exception()
        yield started
    finally:
        for server in started.values():
            if isinstance(server, Server):
                server.stop()
        stop_postgres(pg_root)
        shutil.rmtree(pg_root, ignore_errors=True)


@pytest.fixture
def team_server(servers: dict[str, Server | str]) -> Server:
    return servers["team"]


@pytest.fixture
def postgres_server(servers: dict[str, Server | str]) -> Server:
    if isinstance(servers["postgres"], str):
        pytest.skip(servers["postgres"])
    return servers["postgres"]


def lab(server: Server, tmp: Path, *args: str, user: str | None = None) -> subprocess.CompletedProcess:
    """`python -m lab ...` in its own process against the server."""
    done = subprocess.run([sys.executable, "-m", "lab", *args], env=server.env(user), cwd=tmp, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@contextlib.contextmanager
def as_user(server: Server, monkeypatch: pytest.MonkeyPatch, user: str | None = None) -> Iterator[mlflow.MlflowClient]:
    """This process talks to the server as `user` (in-process `lab.cli.main` and the returned client)."""
    for key, value in server.env(user).items():
        if key.startswith("MLFLOW_"):
            monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(server.uri)
    try:
        yield mlflow.MlflowClient(server.uri)
    finally:
        if mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(previous)


def parents(client, experiment: str, kind: str | None = None) -> list:
    exp = client.get_experiment_by_name(experiment)
    query = "tags.`ab.role` = 'parent'" + (f" and tags.`ab.kind` = '{kind}'" if kind else "")
    return client.search_runs([exp.experiment_id], query, order_by=["attributes.start_time DESC"])


def children(client, parent) -> dict[str, object]:
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {r.data.tags["ab.arm"]: r for r in runs}


def check_ab_job(client, server: Server, experiment: str) -> tuple[object, dict[str, object]]:
    """The parent of the newest job in `experiment` finished with a report; its arms finished with predictions."""
    parent = parents(client, experiment)[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["ab.verdict"]
    arms = children(client, parent)
    assert set(arms) == {"a", "b"} and all(r.info.status == "FINISHED" for r in arms.values())
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id, "comparison")}
    assert {"comparison/report.html", "comparison/summary.json"} <= artifacts
    stored = list(server.artifacts.rglob("predictions.parquet"))  # proxied: written by the server, not the client
    assert any(arms["a"].info.run_id in str(p) for p in stored)
    return parent, arms


# --------------------------------------------------------------------------------------- SQLite + basic auth


def test_ab_job_then_reuse_compare_and_leaderboard_across_experiments(team_server: Server, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    lab(team_server, tmp_path, "run", *FAST_ARGS, "--experiment", "team-a", user="alice")
    with as_user(team_server, monkeypatch, "alice") as client:
        first_parent, first = check_ab_job(client, team_server, "team-a")
        # Another experiment: arm a (resnet10t) is reused from team-a, arm b is a model nobody evaluated yet
        # (its arm process still starts; this process is the parent, which saves an interpreter start).
        assert main(["run", *FAST_ARGS, "--b", "mobilenetv3_small_050", "--experiment", "team-b"]) == 0
        assert f"reuses the predictions of run {first['a'].info.run_id}" in capsys.readouterr().err
        parent_b = parents(client, "team-b")[0]
        assert parent_b.info.status == "FINISHED"
        assert parent_b.data.tags["ab.reused.a"] == first["a"].info.run_id
        new_b = children(client, parent_b)
        assert set(new_b) == {"b"} and new_b["b"].data.tags["ab.model"] == "mobilenetv3_small_050"

        # compare two evaluations from two experiments, into a third
        assert main(["compare", "--a", first["b"].info.run_id, "--b", new_b["b"].info.run_id,
                     "--experiment", "team-c", "--n_resamples", "500"]) == 0
        [compared] = parents(client, "team-c", kind="compare")
        assert compared.info.status == "FINISHED"
        assert compared.data.tags["ab.source.a"] == f"{first_parent.info.experiment_id}/{first['b'].info.run_id}"
        assert compared.data.tags["ab.source.b"] == f"{parent_b.info.experiment_id}/{new_b['b'].info.run_id}"

        fingerprint = first["a"].data.tags["ab.dataset_fingerprint"]
        assert main(["leaderboard", "--fingerprint", fingerprint, "--experiment", "boards"]) == 0
        board = client.search_runs([client.get_experiment_by_name("boards").experiment_id])[0]
        table = mlflow.artifacts.load_dict(f"runs:/{board.info.run_id}/leaderboard.json")
        rows = [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
        assert sorted(r["model"] for r in rows) == ["mobilenetv3_small_050", "mobilenetv3_small_100", "resnet10t"]
        assert {r["experiment"] for r in rows} == {"team-a", "team-b"}


def test_a_user_without_read_permission_gets_one_error_line(team_server: Server, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    with as_user(team_server, monkeypatch, "alice") as client:
        alice_exp = client.create_experiment("alice-private")
        labels = np.arange(30) % 3
        alice_run = log_child(client, alice_exp, predictions(labels, labels > 0))
    with as_user(team_server, monkeypatch, "bob") as client:
        bob_run = log_child(client, client.create_experiment("bob-team"), predictions(labels, labels > 1))
        assert [e.name for e in client.search_experiments()] == ["bob-team"]  # Alice's are invisible to Bob
        capsys.readouterr()
        assert main(["compare", "--a", bob_run, "--b", alice_run]) == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err
        assert err.splitlines()[-1] == (f"ablab: error: run {alice_run}: permission denied for user 'bob'; ask its "
                                        "experiment's owner for READ permission")
        assert parents(client, "bob-team", kind="compare") == []


def test_eight_arms_log_at_once_to_the_server(team_server: Server, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with as_user(team_server, monkeypatch, "alice"):
        run_eight_arms(tmp_path, team_server.env("alice"), "eight-arms-over-http")


# --------------------------------------------------------------------------------------------------- PostgreSQL


def test_postgres_backend_ab_job_reuse_compare_and_leaderboard(postgres_server: Server, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with as_user(postgres_server, monkeypatch) as client:
        # In this process (the arms are processes all the same): the subprocess form runs against SQLite above.
        assert main(["run", *FAST_ARGS, "--experiment", "team-a"]) == 0
        first_parent, first = check_ab_job(client, postgres_server, "team-a")
        # The same job in another experiment: both arms reused, no arm process started.
        assert main(["run", *FAST_ARGS, "--experiment", "team-b"]) == 0
        parent_b = parents(client, "team-b")[0]
        assert parent_b.info.status == "FINISHED" and children(client, parent_b) == {}
        assert [parent_b.data.tags[f"ab.reused.{arm}"] for arm in "ab"] == [first[arm].info.run_id for arm in "ab"]

        assert main(["compare", "--a", first["a"].info.run_id, "--b", first["b"].info.run_id,
                     "--experiment", "team-c", "--n_resamples", "500"]) == 0
        [compared] = parents(client, "team-c", kind="compare")
        assert compared.data.tags["ab.verdict"] == first_parent.data.tags["ab.verdict"]

        fingerprint = first["a"].data.tags["ab.dataset_fingerprint"]
        assert main(["leaderboard", "--fingerprint", fingerprint, "--experiment", "boards"]) == 0
        board = client.search_runs([client.get_experiment_by_name("boards").experiment_id])[0]
        table = mlflow.artifacts.load_dict(f"runs:/{board.info.run_id}/leaderboard.json")
        assert len(table["data"]) == 2 and board.data.tags["ab.leaderboard_size"] == "2"
