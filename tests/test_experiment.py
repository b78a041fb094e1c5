"""lab/experiment.py: one parent run from start to end, on a SQLite store, with the arm processes faked.

`launch.run_arms` is replaced by tests/history_fakes.py's FakeArms (child runs with the tags and predictions an
arm logs, made in milliseconds), so reuse, failed arms and the logged comparison are checked in seconds;
tests/test_launch.py and tests/test_e2e.py run real arms.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import FAST_ARGS
from history_fakes import FakeArms, correct_mask, fast_cfg, log_child, log_fast_child, predictions

from lab import experiment, launch, report
from lab.cli import main
from lab.compare import analyse, fetch_arms, parent_metrics


def parent_runs(name: str = "ablab") -> list:
    exp = mlflow.get_experiment_by_name(name)
    return [] if exp is None else mlflow.search_runs([exp.experiment_id], "tags.`ab.role` = 'parent'",
                                                     output_format="list")


def summary_of(run_id: str) -> dict:
    return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/comparison/summary.json"))


def test_run_reuses_finished_evaluations_and_rerun_evaluates_again(tracking: str, monkeypatch, capsys) -> None:
    client = mlflow.MlflowClient()
    old = client.create_experiment("last-month")
    run_a = log_fast_child(client, old, 0.3, "timm:resnet10t:pretrained=False:classes=10")
    fake = FakeArms()
    monkeypatch.setattr(launch, "run_arms", fake)

    assert main(["run", *FAST_ARGS]) == 0  # a is reused, only b is evaluated
    assert fake.calls == [[1]]
    parent = parent_runs()[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["ab.placement"] == "lockstep"
    assert parent.data.tags["ab.reused.a"] == run_a and "ab.reused.b" not in parent.data.tags
    assert [a["reused_from"] for a in summary_of(parent.info.run_id)["arms"]] == [run_a, None]
    report_md = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/comparison/report.md")
    assert f"Arm a reused the predictions of run {run_a}" in report_md and "measured in different jobs" in report_md
    out = capsys.readouterr()
    assert "reuses the predictions of run" in out.err and f"parent run {parent.info.run_id}" in out.err
    assert out.out.strip() == parent.data.tags["ab.verdict_sentence"]
    assert f"in run {parent.info.run_id} (mlflow ui --backend-store-uri {tracking}, then #/experiments/" in out.err

    assert main(["run", *FAST_ARGS]) == 0  # now both arms have a finished evaluation: nothing is started
    assert fake.calls == [[1]]
    assert main(["run", *FAST_ARGS, "--rerun", "true"]) == 0
    assert fake.calls == [[1], [0, 1]]


def test_failed_arms_end_the_parent_failed_naming_them(tracking: str, monkeypatch, capsys) -> None:
    monkeypatch.setattr(launch, "run_arms", FakeArms(fail=(1,)))
    assert main(["run", *FAST_ARGS]) == 1
    message = "arm b (mobilenetv3_small_100): RuntimeError: boom"
    assert capsys.readouterr().err.splitlines()[-1] == f"ablab: error: {message}"
    [parent] = parent_runs()
    assert (parent.info.status, parent.data.tags["ab.error"]) == ("FAILED", message)
    assert parent.data.params["config.a"] == "resnet10t"  # the config was logged before the arms ran


def test_a_failure_after_the_arms_ends_the_parent_failed(tracking: str, monkeypatch, capsys) -> None:
    monkeypatch.setattr(launch, "run_arms", FakeArms())

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(experiment, "log_comparison", broken)
    assert main(["run", *FAST_ARGS]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "ablab: error: RuntimeError: disk full"
    [parent] = parent_runs()
    assert (parent.info.status, parent.data.tags["ab.error"]) == ("FAILED", "RuntimeError: disk full")


def test_job_evaluates_only_what_is_neither_known_nor_reused() -> None:
    job = experiment.Job(fast_cfg(arms="resnet10t,resnet18,resnet34"), ["x", "y", "z"], "x vs y vs z", {}, None,
                         reused={1: object()}, known={0: object()})
    assert job.todo == [2]


def test_log_comparison_logs_metrics_tags_and_the_report(tracking: str) -> None:
    client = mlflow.MlflowClient()
    exp = client.create_experiment("e")
    parent = client.create_run(exp, tags={"ab.role": "parent"}).info.run_id
    n = 120
    labels = np.arange(n) % 3
    right_a = correct_mask(n, 0.6, 1)
    children = [log_child(client, exp, predictions(labels, right), parent_run_id=parent, model=model, arm=arm)
                for arm, model, right in (("a", "resnet10t", right_a),
                                          ("b", "mobilenetv3_small_100", right_a | correct_mask(n, 0.4, 2)))]
    cfg = fast_cfg(n_resamples="500")
    summary = report.describe(analyse(cfg, fetch_arms(client, children, ["a", "b"])))
    experiment.log_comparison(client, parent, cfg, summary, Path(tempfile.mkdtemp()) / "comparison")

    run = client.get_run(parent)
    assert run.data.metrics == pytest.approx(parent_metrics(summary))
    tags = run.data.tags
    assert (tags["ab.verdict"], tags["ab.verdict_sentence"]) == (summary["verdict"], summary["sentence"])
    assert (tags["ab.child.a"], tags["ab.child.b"]) == tuple(children) and "is better than" in summary["sentence"]
    assert tags["mlflow.note.content"].startswith(f"**{summary['sentence']}**")
    assert {a.path for a in client.list_artifacts(parent, "comparison")} >= {
        "comparison/report.html", "comparison/report.md", "comparison/summary.json"}
    assert summary_of(parent)["verdict"] == summary["verdict"]


def test_run_registers_the_arms_and_promotes_b_only_on_a_significant_win(tracking: str, monkeypatch, capsys) -> None:
    """register + promote_alias from a `run`; then a `compare` of the registered versions reuses both arms."""
    client = mlflow.MlflowClient()
    monkeypatch.setattr(launch, "run_arms", FakeArms(accuracy=(0.2, 1.0), logged_models=True))
    gate = ["--register", "clf", "--promote_alias", "champion"]
    assert main(["run", *FAST_ARGS, *gate]) == 0
    [parent] = parent_runs()
    tags = parent.data.tags
    assert (tags["ab.verdict"], tags["ab.registered.a"], tags["ab.registered.b"]) == ("b_better", "clf/1", "clf/2")
    assert (tags["ab.promotion"], tags["ab.promotion_from"], tags["ab.promotion_to"]) == ("moved", "none", "2")
    assert str(client.get_model_version_by_alias("clf", "champion").version) == "2"
    assert parent.info.run_name == "resnet10t vs mobilenetv3_small_100"
    assert [i.tags[0].value for i in parent.inputs.dataset_inputs] == ["test"]  # the children's test set

    monkeypatch.setattr(launch, "run_arms", FakeArms(accuracy=(0.5, 0.5), logged_models=True))
    assert main(["run", *FAST_ARGS, *gate, "--rerun", "true", "--experiment", "second"]) == 0
    tags = parent_runs("second")[0].data.tags
    assert (tags["ab.verdict"], tags["ab.registered.b"]) == ("no_significant_difference", "clf/4")
    assert (tags["ab.promotion"], tags["ab.promotion_from"], tags["ab.promotion_to"]) == ("kept", "2", "2")
    assert tags["ab.promotion_reason"] == "verdict no_significant_difference: B did not win under the chosen rule"
    assert str(client.get_model_version_by_alias("clf", "champion").version) == "2"

    fake = FakeArms()
    monkeypatch.setattr(launch, "run_arms", fake)
    capsys.readouterr()
    assert main(["compare", "--a", "models:/clf@champion", "--b", "models:/clf/1", *FAST_ARGS[:6]]) == 0
    assert fake.calls == []  # both versions found in the fine-tunes that produced them
    [compared] = [r for r in parent_runs() if r.data.tags.get("ab.kind") == "compare"]
    first = {c.data.tags["ab.arm"]: c.info.run_id for c in mlflow.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'", output_format="list")}
    assert (compared.data.tags["ab.reused.a"], compared.data.tags["ab.reused.b"]) == (first["b"], first["a"])
    assert compared.info.run_name == "clf@champion vs clf/1"
