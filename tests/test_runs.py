"""lab/runs.py: the parent run's lifecycle, the child searches and one-line errors, against a SQLite store.

    .venv/bin/python -m pytest tests/test_runs.py -q
"""

from __future__ import annotations

import os

import mlflow
import numpy as np
import pytest
from history_fakes import log_child, predictions

from lab import runs

LABELS = np.arange(30) % 3


def only_run(experiment: str):
    [run] = mlflow.search_runs([mlflow.get_experiment_by_name(experiment).experiment_id], output_format="list")
    return run


def test_a_parent_that_completes_ends_finished(tracking: str) -> None:
    with runs.parent_run("lifecycle", "a vs b") as run:
        mlflow.set_tag("ab.role", "parent")
    ended = only_run("lifecycle")
    assert ended.info.run_id == run.info.run_id and ended.info.run_name == "a vs b"
    assert ended.info.status == "FINISHED" and "ab.error" not in ended.data.tags
    assert mlflow.active_run() is None


@pytest.mark.parametrize(("error", "line"), [
    (ValueError("labels differ on 2 samples\nmore"), "labels differ on 2 samples"),  # ours: as it is, one line
    (RuntimeError("CUDA error"), "RuntimeError: CUDA error"),
    (KeyError("x"), "KeyError: 'x'"),
])
def test_an_exception_ends_the_parent_failed_with_one_line(tracking: str, error: Exception, line: str) -> None:
    with pytest.raises(runs.RunFailed) as raised, runs.parent_run("lifecycle", "a vs b"):
        raise error
    assert str(raised.value) == line and raised.value.__cause__ is error and not raised.value.interrupted
    ended = only_run("lifecycle")
    assert (ended.info.status, ended.data.tags["ab.error"]) == ("FAILED", line)
    assert mlflow.active_run() is None


def test_run_failed_raised_inside_keeps_its_message(tracking: str) -> None:
    with pytest.raises(runs.RunFailed, match=r"^arm b: boom$"), runs.parent_run("lifecycle", "a vs b"):
        raise runs.RunFailed("arm b: boom")
    assert only_run("lifecycle").data.tags["ab.error"] == "arm b: boom"


def test_ctrl_c_ends_the_parent_killed(tracking: str) -> None:
    with pytest.raises(runs.RunFailed) as raised, runs.parent_run("lifecycle", "a vs b"):
        raise KeyboardInterrupt
    assert raised.value.interrupted and isinstance(raised.value.__cause__, KeyboardInterrupt)
    ended = only_run("lifecycle")
    assert (ended.info.status, ended.data.tags["ab.error"]) == ("KILLED", "interrupted")


def test_the_run_mlflow_run_created_is_the_parent(tracking: str, monkeypatch: pytest.MonkeyPatch) -> None:
    client = mlflow.MlflowClient()
    project = client.create_experiment("project")
    created = client.create_run(project).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", created)  # as `mlflow run` starts us: its run, in its experiment
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", project)
    mlflow.set_experiment(experiment_id=project)
    with runs.parent_run("ignored", "resnet18 vs mobilenetv3_small_100") as run:
        pass
    assert run.info.run_id == created and client.get_run(created).info.status == "FINISHED"
    assert mlflow.get_experiment_by_name("ignored") is None
    assert client.get_run(created).info.run_name == "resnet18 vs mobilenetv3_small_100"  # not MLflow's random name


def test_parent_names_read_a_vs_b_and_are_shortened_past_60_characters() -> None:
    assert runs.run_name(["resnet18", "mobilenetv3_small_100"]) == "resnet18 vs mobilenetv3_small_100"
    assert runs.run_name(["models:/clf@champion", "runs:/" + "0123456789abcdef" * 2 + "/model", "/w/best.ckpt"]) == (
        "clf@champion vs run 01234567 vs best.ckpt")
    long = runs.run_name(["efficientnet_b3.ra2_in1k", "convnext_tiny.fb_in22k_ft_in1k", "resnet50.a1_in1k"])
    assert len(long) <= 60 and long.endswith("…") and long.startswith("efficientnet_b3.ra2_in1k vs convnext_tiny")


def test_the_parent_goes_where_mlflow_s_environment_says_unless_experiment_is_given(
        tracking: str, monkeypatch: pytest.MonkeyPatch) -> None:
    client = mlflow.MlflowClient()
    with runs.parent_run("", "a vs b"):
        pass
    assert only_run("ablab").info.run_name == "a vs b"  # nothing given: ablab
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ  # mlflow.set_experiment exports it; we do not leave it set

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "by-name")
    with runs.parent_run("", "a vs b"):
        pass
    assert only_run("by-name").info.status == "FINISHED"
    with runs.parent_run("given", "a vs b"):
        pass
    assert only_run("given").info.status == "FINISHED"  # experiment= wins

    by_id = client.create_experiment("by-id")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", by_id)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    with runs.parent_run("", "a vs b"):
        pass
    assert only_run("by-id").info.status == "FINISHED" and os.environ["MLFLOW_EXPERIMENT_ID"] == by_id

    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "987654")
    with pytest.raises(ValueError, match=r"^experiment id 987654 \(MLFLOW_EXPERIMENT_ID\)"), \
            runs.parent_run("", "a vs b"):
        pass


def test_children_of_maps_arm_indices_of_one_parent(tracking: str) -> None:
    client = mlflow.MlflowClient()
    exp = client.create_experiment("e")
    parent, other = client.create_run(exp).info.run_id, client.create_run(exp).info.run_id
    frame = predictions(LABELS, LABELS > 0)
    first = log_child(client, exp, frame, parent_run_id=parent, **{"ab.arm_index": "0"})
    failed = log_child(client, exp, frame, parent_run_id=parent, status="FAILED", **{"ab.arm_index": "2"})
    log_child(client, exp, frame, parent_run_id=other, **{"ab.arm_index": "1"})
    assert runs.children_of(client, exp, parent) == {0: first, 2: failed}


def test_search_children_finds_finished_children_in_every_experiment_newest_first(tracking: str) -> None:
    client = mlflow.MlflowClient()
    team_a, team_b = client.create_experiment("team-a"), client.create_experiment("team-b")
    frame = predictions(LABELS, LABELS > 0)
    old = log_child(client, team_a, frame)
    new = log_child(client, team_b, frame, model="resnet18")
    log_child(client, team_b, frame, status="FAILED")
    assert [r.info.run_id for r in runs.search_children(client)] == [new, old]
    assert [r.info.run_id for r in runs.search_children(client, "tags.`ab.model` = 'resnet18'")] == [new]
    assert [r.info.run_id for r in runs.search_children(client, experiment_ids=[team_a])] == [old]
    assert set(runs.readable_experiment_ids(client)) >= {team_a, team_b}


class HttpError(Exception):
    def __init__(self, message: str, error_code: str) -> None:
        super().__init__(message)
        self.error_code = error_code


def test_mlflow_errors_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    assert runs.mlflow_error_line(HttpError("x", "RESOURCE_DOES_NOT_EXIST"), "run 1") == \
        "run 1 does not exist on http://server"
    assert runs.mlflow_error_line(HttpError("x", "PERMISSION_DENIED"), "run 1") == (
        "run 1: permission denied for this user (no MLFLOW_TRACKING_USERNAME); ask its experiment's owner for READ "
        "permission")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    assert "permission denied for user 'bob'" in runs.mlflow_error_line(HttpError("x", "UNAUTHENTICATED"), "run 1")
    assert runs.mlflow_error_line(ConnectionError("refused\ntrace"), "tracking server") == "tracking server: refused"


def test_reading_runs_turns_errors_into_one_line_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AB_DEBUG", raising=False)
    with pytest.raises(ValueError, match=r"^tracking server: connection refused$"), runs.reading_runs():
        raise ConnectionError("connection refused")
    with pytest.raises(ValueError, match=r"^no such run$"), runs.reading_runs():
        raise ValueError("no such run")
    monkeypatch.setenv("AB_DEBUG", "1")
    with pytest.raises(ConnectionError), runs.reading_runs():
        raise ConnectionError("connection refused")


def test_the_tracking_uri_defaults_to_a_store_here_and_is_exported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert runs.export_tracking_uri() == "sqlite:///mlflow.db" == runs.tracking_uri()
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server")
    assert runs.export_tracking_uri() == "http://server"
