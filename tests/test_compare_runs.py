"""lab/compare_runs.py: `python -m lab compare` of existing runs and registered models, on a SQLite store.

Evaluations are faked (tests/history_fakes.py), and so are the arms a comparison must evaluate (FakeArms in place
of lab.launch.run_arms); tests/test_server.py compares real arms over HTTP.
"""

from __future__ import annotations

import json
import re

import mlflow
import numpy as np
import pytest
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
    assert parent.info.run_name == "resnet10t vs mobilenetv3_small_100" and tags["ab.arms"] == "a,b"
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


def _refusal(capsys, run_a: str, run_b: str) -> str:
    """The one line `compare` refuses two runs with (exit code 2, no traceback, no run created)."""
    assert main(["compare", "--a", run_a, "--b", run_b]) == 2
    err = capsys.readouterr().err.strip()  # MLflow's own INFO lines may come first
    assert "Traceback" not in err and [ln for ln in err.splitlines() if "error" in ln] == [err.splitlines()[-1]]
    return err.splitlines()[-1]


OTHER = "sha256:" + "cd" * 16
RELABELLED = np.where(np.isin(np.arange(60), [4, 7]), (LABELS + 1) % 3, LABELS)
GUARD_CASES = {  # what differs -> (predictions of b, tags of b, params of b, <what>, <fix>)
    "samples": (predictions(LABELS[1:], LABELS[1:] > 0, np.arange(1, 60)), {"ab.dataset_fingerprint": OTHER},
                {"seed": "1"}, "1 sample ids in only one, 60 vs 59 samples",
                "compare runs made with the same data, seed and test_fraction"),
    "labels": (predictions(RELABELLED, LABELS > 0), {"ab.dataset_fingerprint": OTHER}, {},
               "labels differ on 2 samples, first sample 4: 1 vs 2",
               "the arms did not score the same ground truth; evaluate both models on the same dataset, split and "
               "seed"),
    "classes": (predictions(LABELS, LABELS > 0), {"ab.num_classes": "4"}, {}, "number of classes 3 vs 4",
                "evaluate both models on a dataset with the same classes"),
    "label map": (predictions(LABELS, LABELS > 0), {"ab.label_map": "other", "ab.dataset_fingerprint": OTHER},
                  {"data": "digits"}, "label map (class names and their order) labelmap3 vs other",
                  "compare runs made with the same data, seed and test_fraction"),
    "images": (predictions(LABELS, LABELS > 0), {"ab.dataset_fingerprint": OTHER}, {},
               "same sample ids and labels but different images or class names",
               "evaluate both models on the same dataset, split and seed"),
}


@pytest.mark.parametrize("kind", list(GUARD_CASES))
def test_compare_refuses_runs_scored_on_different_test_sets_with_the_cause_and_the_fix(tracking: str, capsys,
                                                                                        kind: str) -> None:
    frame, tags, params, what, fix = GUARD_CASES[kind]
    client = mlflow.MlflowClient()
    exp = client.create_experiment("team-a")
    run_a = log_child(client, exp, predictions(LABELS, LABELS > 0))
    run_b = log_child(client, exp, frame, model="resnet18", params=params, **tags)
    cause = {k: ({"data": "fake", "seed": "0"}[k], v) for k, v in params.items()}  # log_child's defaults for a
    shown_a = "".join(f", {k} {va}" for k, (va, _) in cause.items())
    shown_b = "".join(f", {k} {vb}" for k, (_, vb) in cause.items())
    fingerprint_b = tags.get("ab.dataset_fingerprint", FINGERPRINT)[:15]
    assert _refusal(capsys, run_a, run_b) == (
        f"ablab: error: arm a (run {run_a[:8]}…{shown_a}) and arm b (run {run_b[:8]}…{shown_b}) were scored on "
        f"different test sets (fingerprint {FINGERPRINT[:15]}… vs {fingerprint_b}…; {what}): {fix}")
    assert parent_runs("ablab", kind="compare") == []  # refused before any run was created


def test_compare_refuses_wrong_runs_with_one_line(tracking: str, capsys) -> None:
    client = mlflow.MlflowClient()
    exp = client.create_experiment("team-a")
    run_a = log_child(client, exp, predictions(LABELS, LABELS > 0))
    parent = log_parent(client, exp)
    failed = log_child(client, exp, predictions(LABELS, LABELS > 1), status="FAILED")
    cases = [
        ("0" * 32, f"run {'0' * 32} does not exist on sqlite:///"),
        (parent, f"run {parent} is an ablab parent"),
        (failed, f"run {failed} is FAILED, not FINISHED"),
    ]
    for other, message in cases:
        line = _refusal(capsys, run_a, other)
        assert re.match(f"ablab: error: {message}", line), line
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
