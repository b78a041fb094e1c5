"""lab/compare_runs.py: `python -m lab compare` of existing runs and registered models, on a SQLite store.

Evaluations are faked (tests/history_fakes.py), and so are the arms a comparison must evaluate (FakeArms in place
of lab.launch.run_arms); tests/test_server.py compares real arms over HTTP.
"""

from __future__ import annotations

import json
import re

import mlflow
import numpy as np
from history_fakes import FINGERPRINT, FakeArms, correct_mask, log_child, log_fast_child, log_parent, predictions

from lab import launch
from lab.cli import main

LABELS = np.arange(60) % 3


def parent_runs(experiment: str, kind: str | None = None) -> list:
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return []
    query = "tags.`ab.role` = 'parent'" + (f" and tags.`ab.kind` = '{kind}'" if kind else "")
    return mlflow.search_runs([exp.experiment_id], query, output_format="list")


def summary_of(run_id: str) -> dict:
    return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/comparison/summary.json"))


def test_compare_runs_from_two_experiments_in_a_new_parent(tracking: str, capsys) -> None:
    client = mlflow.MlflowClient()
    team_a, team_b = client.create_experiment("team-a"), client.create_experiment("team-b")
    n = 200
    labels = np.arange(n) % 3
    run_a = log_child(client, team_a, predictions(labels, correct_mask(n, 0.6, 1)), model="resnet10t")
    run_b = log_child(client, team_b, predictions(labels, correct_mask(n, 0.6, 1) | correct_mask(n, 0.3, 2)),
                      model="mobilenetv3_small_100", identity="timm:mobilenetv3_small_100:pretrained=False:classes=3")

    assert main(["compare", "--a", run_a, "--b", run_b, "--experiment", "team-c", "--n_resamples", "500"]) == 0
    out = capsys.readouterr()
    assert "mobilenetv3_small_100 (b) is better than resnet10t (a)" in out.out
    [parent] = parent_runs("team-c", kind="compare")
    tags = parent.data.tags
    assert parent.info.status == "FINISHED" and tags["ab.verdict"] == "b_better"
    assert parent.info.run_name == "compare: a vs b" and tags["ab.arms"] == "a,b"
    assert out.err.splitlines()[-1] == (f"ablab: verdict b_better; report: comparison/report.html in run "
                                        f"{parent.info.run_id} (#/experiments/{parent.info.experiment_id}/runs/"
                                        f"{parent.info.run_id})")
    assert tags["ab.child.a"] == run_a and tags["ab.source.a"] == f"{team_a}/{run_a}"
    assert tags["ab.source.b"] == f"{team_b}/{run_b}" and tags["ab.compared_runs"] == f"{run_a},{run_b}"
    assert f"#/experiments/{team_b}/runs/{run_b}" in tags["mlflow.note.content"]
    summary = summary_of(parent.info.run_id)
    assert [a["run_id"] for a in summary["arms"]] == [run_a, run_b]
    assert not summary["latency"]["comparable"] and "different jobs" in summary["latency"]["note"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")} >= {
        "comparison/report.html", "comparison/report.md", "comparison/summary.json"}


def test_compare_refuses_incomparable_or_wrong_runs_with_one_line(tracking: str, capsys) -> None:
    client = mlflow.MlflowClient()
    exp = client.create_experiment("team-a")
    run_a = log_child(client, exp, predictions(LABELS, LABELS > 0))
    run_b = log_child(client, exp, predictions(LABELS, LABELS > 1), model="resnet18",
                      **{"ab.dataset_fingerprint": "sha256:" + "cd" * 16})
    parent = log_parent(client, exp)
    failed = log_child(client, exp, predictions(LABELS, LABELS > 1), status="FAILED")
    cases = [
        (run_b, rf"dataset fingerprint differs: a \(run {run_a[:8]}\) has {FINGERPRINT}, b \(run {run_b[:8]}\) has "),
        ("0" * 32, f"run {'0' * 32} does not exist on sqlite:///"),
        (parent, f"run {parent} is an ablab parent"),
        (failed, f"run {failed} is FAILED, not FINISHED"),
    ]
    for other, message in cases:
        assert main(["compare", "--a", run_a, "--b", other]) == 2
        err = capsys.readouterr().err.strip()  # MLflow's own INFO lines may come first
        assert "Traceback" not in err and [ln for ln in err.splitlines() if "error" in ln] == [err.splitlines()[-1]]
        assert re.match(f"ablab: error: {message}", err.splitlines()[-1]), err
    assert parent_runs("ablab", kind="compare") == []  # refused before any run was created


def test_compare_registered_models_reuses_their_evaluations_and_the_gate_moves_the_alias(tracking: str) -> None:
    client = mlflow.MlflowClient()
    client.create_registered_model("clf")
    for _ in range(2):
        client.create_model_version("clf", source="file:///models/clf")
    client.set_registered_model_alias("clf", "champion", "1")
    exp = client.create_experiment("evals")
    run_v1 = log_fast_child(client, exp, 0.2, "models:/clf/1", model="models:/clf/1")
    run_v2 = log_fast_child(client, exp, 1.0, "models:/clf/2", model="models:/clf/2")
    data = ["--data", "fake", "--fake_samples", "96", "--image_size", "32", "--n_resamples", "500"]

    assert main(["compare", "--a", "models:/clf@champion", "--b", "models:/clf/2", *data,
                 "--promote_alias", "champion"]) == 0
    [parent] = parent_runs("ablab", kind="compare")
    tags = parent.data.tags
    assert (tags["ab.reused.a"], tags["ab.reused.b"]) == (run_v1, run_v2) and tags["ab.verdict"] == "b_better"
    assert (tags["ab.promotion"], tags["ab.promotion_from"], tags["ab.promotion_to"]) == ("moved", "1", "2")
    assert str(client.get_model_version_by_alias("clf", "champion").version) == "2"

    # v1 does not beat the champion (now v2): the alias stays.
    assert main(["compare", "--a", "models:/clf@champion", "--b", "models:/clf/1", *data,
                 "--promote_alias", "champion", "--experiment", "second"]) == 0
    tags = parent_runs("second")[0].data.tags
    assert (tags["ab.promotion"], tags["ab.promotion_from"], tags["ab.promotion_to"]) == ("kept", "2", "2")
    assert tags["ab.verdict"] == "a_better" and str(client.get_model_version_by_alias("clf", "champion").version) == "2"


def test_compare_evaluates_a_registered_model_that_has_no_evaluation(tracking: str, monkeypatch, capsys) -> None:
    client = mlflow.MlflowClient()
    client.create_registered_model("clf")
    for _ in range(3):
        client.create_model_version("clf", source="file:///models/clf")
    exp = client.create_experiment("evals")
    run_v1 = log_fast_child(client, exp, 0.4, "models:/clf/1", model="models:/clf/1")
    fake = FakeArms(accuracy=0.5)
    monkeypatch.setattr(launch, "run_arms", fake)

    assert main(["compare", "--a", run_v1, "--b", "models:/clf/3", "--n_resamples", "500"]) == 0
    assert fake.calls == [[1]]
    assert (fake.configs[0].data, fake.configs[0].fake_samples) == ("fake", 96)  # run_v1's test set, not the YAML's
    assert fake.configs[0].epochs == 0  # registry models are evaluated as they are
    [parent] = parent_runs("ablab", kind="compare")
    assert (f"ablab: evaluating models:/clf/3 (no finished evaluation to reuse); parent run {parent.info.run_id}"
            in capsys.readouterr().err)
    children = mlflow.search_runs([parent.info.experiment_id], output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert [c.data.tags["ab.model_identity"] for c in children] == ["models:/clf/3"]
    assert parent.data.tags["ab.child.b"] == children[0].info.run_id


def test_empty_options_from_mlproject_take_the_dataset_keys_of_the_first_run(tracking: str, monkeypatch) -> None:
    """`mlflow run -e compare` passes every parameter, "" meaning not given: the keys still come from the run."""
    client = mlflow.MlflowClient()
    client.create_registered_model("clf")
    client.create_model_version("clf", source="file:///models/clf")
    run_v1 = log_fast_child(client, client.create_experiment("evals"), 0.4, "models:/clf/9", model="models:/clf/9")
    fake = FakeArms()
    monkeypatch.setattr(launch, "run_arms", fake)
    empty = [x for key in ("data", "fake_samples", "epochs", "seed") for x in (f"--{key}", "")]
    assert main(["compare", "--a", run_v1, "--b", "models:/clf/1", "--n_resamples", "500", *empty]) == 0
    assert (fake.configs[0].data, fake.configs[0].fake_samples, fake.configs[0].epochs) == ("fake", 96, 0)
