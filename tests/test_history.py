"""lab/history.py, lab/leaderboard.py, lab/registry.py and the guard in lab/compare.py, on a SQLite store.

Evaluations are faked (tests/history_fakes.py: child runs with the tags and predictions an arm logs), so reuse,
`compare`, `leaderboard` and the promotion gate run in seconds; tests/test_server.py runs real arms over HTTP.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from conftest import FAST_ARGS
from history_fakes import FINGERPRINT, PREPROCESS, correct_mask, log_child, log_parent, make_arm, predictions
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.multitest import multipletests

from lab import history
from lab.cli import build_parser, main
from lab.compare import ComparisonError, analyse, check_comparable
from lab.config import load_config
from lab.launch import ArmOutcome
from lab.registry import decide_promotion
from lab.report import render

ROOT = Path(__file__).resolve().parent.parent


def fast_cfg(**changes: str):
    values = dict(zip(FAST_ARGS[::2], FAST_ARGS[1::2], strict=True))
    return load_config(None, {k.removeprefix("--"): v for k, v in values.items()} | changes)


def fast_dataset():
    """(fingerprint, test ids, test labels, shared preprocessing) of the FAST_ARGS dataset."""
    from lab.arm import preprocess_for
    from lab.data import resolve_dataset

    cfg = fast_cfg()
    info = resolve_dataset(cfg)
    return info.fingerprint, info.test.sample_ids, info.test.labels, preprocess_for(cfg, None).describe()


def log_fast_child(client, experiment_id: str, accuracy: float, identity: str, seed: int = 0, **kw) -> str:
    """A fake child on the FAST_ARGS test set, as an arm of that config would log it."""
    from lab.config import flat_params

    fp, ids, labels, pre = fast_dataset()
    frame = predictions(labels, correct_mask(len(labels), accuracy, seed), ids, num_classes=10)
    params = {k: v for k, v in flat_params(fast_cfg()).items() if k not in ("a", "b")}
    return log_child(client, experiment_id, frame, identity=identity, params=params,
                     **{"ab.dataset_fingerprint": fp, "ab.preprocess": pre, "ab.num_classes": "10"} | kw)


def parent_runs(experiment: str, kind: str | None = None) -> list:
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return []
    query = "tags.`ab.role` = 'parent'" + (f" and tags.`ab.kind` = '{kind}'" if kind else "")
    return mlflow.search_runs([exp.experiment_id], query, output_format="list")


def summary_of(run_id: str) -> dict:
    return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/comparison/summary.json"))


# ----------------------------------------------------------------------------------------- comparability guard

LABELS = np.arange(60) % 3


@pytest.mark.parametrize(("change", "expected"), [
    ({"ab.num_classes": "4"}, "number of classes differs: a (run a-run-id) has 3, b (run b-run-id) has 4"),
    ({"ab.label_map": "other"}, "label map (class names and their order) differs: a (run a-run-id) has labelmap3, "
                                "b (run b-run-id) has other"),
    ({"ab.dataset_fingerprint": "sha256:" + "cd" * 16}, f"dataset fingerprint differs: a (run a-run-id) has "
                                                        f"{FINGERPRINT}, b (run b-run-id) has sha256:cdcd"),
])
def test_guard_names_what_differs_and_both_values(change: dict, expected: str) -> None:
    arms = [make_arm("a", predictions(LABELS, LABELS > 0)), make_arm("b", predictions(LABELS, LABELS > 1), **change)]
    with pytest.raises(ComparisonError) as err:
        check_comparable(arms)
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_guard_names_the_label_map_before_the_fingerprint_it_changes() -> None:
    arms = [make_arm("a", predictions(LABELS, LABELS > 0)),
            make_arm("b", predictions(LABELS, LABELS > 0), **{"ab.label_map": "x", "ab.dataset_fingerprint": "y"})]
    with pytest.raises(ComparisonError, match=r"^label map .* same class index means a different class"):
        check_comparable(arms)


def test_guard_refuses_other_samples_and_other_labels_with_the_first_example() -> None:
    base = make_arm("a", predictions(LABELS, LABELS > 0))
    with pytest.raises(ComparisonError, match=r"^sample ids differ: a has 60 samples, b has 59 \(1 ids in only one\)"):
        check_comparable([base, make_arm("b", predictions(LABELS[1:], LABELS[1:] > 0, np.arange(1, 60)))])
    relabelled = LABELS.copy()
    relabelled[[4, 7]] = (relabelled[[4, 7]] + 1) % 3
    with pytest.raises(ComparisonError, match=r"^labels differ on 2 samples between a and b \(sample 4: a has 1, "
                                              r"b has 2\)"):
        check_comparable([base, make_arm("b", predictions(relabelled, LABELS > 0))])


def test_preprocessing_difference_is_allowed_and_flagged_at_the_top(tmp_path: Path) -> None:
    arms = [make_arm("a", predictions(LABELS, LABELS > 0)),
            make_arm("b", predictions(LABELS, LABELS > 1), **{"ab.preprocess": "size=224 interp=bicubic"})]
    summary = analyse(fast_cfg(), arms)
    assert summary["preprocess_differs"]
    md = render(summary, tmp_path)["report.md"].read_text()
    assert md.index("preprocessing differs") < md.index("## Arms") and "b: size=224 interp=bicubic" in md


# ------------------------------------------------------------------------------------------------------- reuse


def test_find_reusable_needs_every_part_of_the_key(tracking: str) -> None:
    client = mlflow.MlflowClient()
    team_a, team_b = client.create_experiment("team-a"), client.create_experiment("team-b")
    frame = predictions(LABELS, LABELS > 0)
    key = history.EvalKey("timm:resnet10t:pretrained=False:classes=3", FINGERPRINT, PREPROCESS, "32",
                          (("epochs", "0"),))
    older = log_child(client, team_a, frame)
    assert history.find_reusable(client, key).info.run_id == older
    newer = log_child(client, team_b, frame)  # another team's experiment counts too; the newest wins
    log_child(client, team_b, frame, status="FAILED")
    assert history.find_reusable(client, key).info.run_id == newer
    for change in ({"identity": "timm:resnet18:pretrained=False:classes=3"},
                   {"fingerprint": "sha256:" + "00" * 16}, {"preprocess": "size=224"}, {"precision": "16-mixed"},
                   {"recipe": (("epochs", "3"),)}):
        other = history.EvalKey(**{**key.__dict__, **change})
        assert history.find_reusable(client, other) is None, change


def test_recipe_of_a_fine_tuned_arm_holds_the_training_keys() -> None:
    as_is, tuned = history.recipe(fast_cfg()), dict(history.recipe(fast_cfg(epochs="3", lr="0.01")))
    assert as_is == (("epochs", "0"),)
    assert tuned == {"epochs": "3", "lr": "0.01", "weight_decay": "0.05", "batch_size": "16", "augment": "none",
                     "seed": "0", "data": "fake"}


@pytest.mark.parametrize("preprocess", ["shared", "native"])
def test_expected_key_agrees_with_what_the_arm_resolves(tracking: str, tmp_path: Path, preprocess: str) -> None:
    """Computed without weights, the key must equal what lab.models.resolve_model gives the arm to log."""
    import timm

    from lab.arm import preprocess_for
    from lab.models import resolve_model, save_safetensors

    fp = fast_dataset()[0]
    cfg = fast_cfg(preprocess=preprocess)
    weights = save_safetensors(timm.create_model("resnet10t", num_classes=10), "resnet10t", tmp_path / "w.safetensors",
                               10)
    for spec in ("resnet10t", "mobilenetv3_small_100", f"resnet10t:{weights}"):
        resolved = resolve_model(spec, cfg, 10)
        key = history.expected_key(spec, cfg, 10, fp)
        assert (key.identity, key.preprocess) == (resolved.identity, preprocess_for(cfg, resolved.native).describe())
        assert (key.fingerprint, key.precision, key.recipe) == (fp, "32", (("epochs", "0"),))
    assert (preprocess == "native") is key.preprocess.startswith("size=176 interp=bicubic")  # resnet10t's own
    bare = history.expected_key(str(weights), cfg, 10, fp)  # the architecture is named only inside the file
    if preprocess == "native":
        assert bare is None  # knowing its input size means reading the file: no key, the arm is evaluated
    else:
        assert bare.identity == resolve_model(str(weights), cfg, 10).identity


def test_expected_key_of_registry_uris(tracking: str) -> None:
    fp = fast_dataset()[0]
    client = mlflow.MlflowClient()
    client.create_registered_model("clf")
    for _ in range(2):
        client.create_model_version("clf", source="file:///models/clf")
    client.set_registered_model_alias("clf", "champion", "2")
    assert history.expected_key("models:/clf@champion", fast_cfg(), 10, fp).identity == "models:/clf/2"
    assert history.expected_key("models:/clf/1", fast_cfg(), 10, fp).identity == "models:/clf/1"
    assert history.expected_key("models:/clf@nobody", fast_cfg(), 10, fp) is None
    assert history.expected_key("runs:/" + "0" * 32 + "/model", fast_cfg(), 10, fp) is None


class FakeEvaluate:
    """Stands in for history.evaluate: logs the child runs the arms would, records which arms it was asked for."""

    def __init__(self, accuracy: float = 0.5) -> None:
        self.calls: list[list[int]] = []
        self.configs: list = []
        self.accuracy = accuracy

    def __call__(self, cfg, cfg_path, parent_run_id, experiment_id, uri, p, indices) -> list[ArmOutcome]:
        from lab.models import _registry_identity

        self.calls.append(list(indices))
        self.configs.append(cfg)
        outcomes = []
        for i in indices:
            spec = cfg.arm_specs[i]
            identity = _registry_identity(spec) or f"timm:{spec}:pretrained=False:classes=10"
            run_id = log_fast_child(mlflow.MlflowClient(), experiment_id, self.accuracy, identity, seed=i,
                                    parent_run_id=parent_run_id, arm=cfg.arm_names[i], model=spec)
            outcomes.append(ArmOutcome(i, cfg.arm_names[i], run_id, 0, ""))
        return outcomes


def test_run_reuses_finished_evaluations_and_rerun_evaluates_again(tracking: str, monkeypatch, capsys) -> None:
    client = mlflow.MlflowClient()
    old = client.create_experiment("last-month")
    run_a = log_fast_child(client, old, 0.3, "timm:resnet10t:pretrained=False:classes=10")
    fake = FakeEvaluate()
    monkeypatch.setattr(history, "evaluate", fake)

    assert main(["run", *FAST_ARGS]) == 0  # a is reused, only b is evaluated
    assert fake.calls == [[1]]
    parent = parent_runs("ablab")[0]
    assert parent.data.tags["ab.reused.a"] == run_a and "ab.reused.b" not in parent.data.tags
    assert [a["reused_from"] for a in summary_of(parent.info.run_id)["arms"]] == [run_a, None]
    report = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/comparison/report.md")
    assert f"Arm a reused the predictions of run {run_a}" in report and "measured in different jobs" in report
    assert "reuses the predictions of run" in capsys.readouterr().err

    assert main(["run", *FAST_ARGS]) == 0  # now both arms have a finished evaluation
    assert fake.calls == [[1], []]
    assert main(["run", *FAST_ARGS, "--rerun", "true"]) == 0
    assert fake.calls == [[1], [], [0, 1]]


# ----------------------------------------------------------------------------------------------------- compare


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


def test_compare_evaluates_a_registered_model_that_has_no_evaluation(tracking: str, monkeypatch) -> None:
    client = mlflow.MlflowClient()
    client.create_registered_model("clf")
    for _ in range(3):
        client.create_model_version("clf", source="file:///models/clf")
    exp = client.create_experiment("evals")
    run_v1 = log_fast_child(client, exp, 0.4, "models:/clf/1", model="models:/clf/1")
    fake = FakeEvaluate(accuracy=0.5)
    monkeypatch.setattr(history, "evaluate", fake)

    assert main(["compare", "--a", run_v1, "--b", "models:/clf/3", "--n_resamples", "500"]) == 0
    assert fake.calls == [[1]]
    assert (fake.configs[0].data, fake.configs[0].fake_samples) == ("fake", 96)  # run_v1's test set, not the YAML's
    [parent] = parent_runs("ablab", kind="compare")
    children = mlflow.search_runs([parent.info.experiment_id], output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert [c.data.tags["ab.model_identity"] for c in children] == ["models:/clf/3"]
    assert parent.data.tags["ab.child.b"] == children[0].info.run_id


@pytest.mark.parametrize(("verdict", "arms", "b", "current", "moved"), [
    ("b_better", 2, ("clf", "2"), "1", True),
    ("b_non_inferior", 2, ("clf", "2"), None, True),
    ("b_better", 2, ("clf", "2"), "2", False),
    ("a_better", 2, ("clf", "2"), "1", False),
    ("no_significant_difference", 2, ("clf", "2"), "1", False),
    ("non_inferiority_not_shown", 2, ("clf", "2"), "1", False),
    ("equivalent", 2, ("clf", "2"), "1", False),
    ("b_better", 2, None, "1", False),
    ("b_best", 3, ("clf", "2"), "1", False),
])
def test_promotion_gate_moves_only_on_a_win(verdict, arms, b, current, moved) -> None:
    assert decide_promotion(verdict, arms, b, current)[0] is moved


def test_promotion_needs_a_registered_b(tracking: str, capsys) -> None:
    assert main(["run", *FAST_ARGS, "--promote_alias", "champion"]) == 2
    assert "promote_alias: B must be a registered model" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- leaderboard


def test_leaderboard_ranks_every_evaluation_across_experiments(tracking: str, capsys) -> None:
    client = mlflow.MlflowClient()
    team_a, team_b = client.create_experiment("team-a"), client.create_experiment("team-b")
    n = 300
    labels = np.arange(n) % 3
    masks = {"resnet50": correct_mask(n, 0.9, 1), "resnet18": correct_mask(n, 0.87, 2),
             "mobilenet": correct_mask(n, 0.6, 3)}
    runs = {name: log_child(client, exp, predictions(labels, mask), model=name,
                            identity=f"timm:{name}:pretrained=True:classes=3", metrics={"latency_ms_p50": i + 1.0})
            for i, ((name, mask), exp) in enumerate(zip(masks.items(), [team_a, team_b, team_b], strict=True))}
    log_child(client, team_a, predictions(labels, masks["resnet50"]), status="FAILED")
    other_test_set = {"ab.dataset_fingerprint": "sha256:" + "0" * 32}
    log_child(client, team_a, predictions(labels, masks["resnet50"]), **other_test_set)

    assert main(["leaderboard", "--fingerprint", FINGERPRINT, "--experiment", "boards"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("1  resnet50") and "mobilenet" in out.splitlines()[3]
    [board] = mlflow.search_runs([mlflow.get_experiment_by_name("boards").experiment_id], output_format="list")
    assert board.data.tags["ab.role"] == "leaderboard" and board.data.tags["ab.leaderboard_best"] == "resnet50"
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{board.info.run_id}/leaderboard.json"))
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [r["model"] for r in rows] == ["resnet50", "resnet18", "mobilenet"]
    assert [r["run_id"] for r in rows] == [runs["resnet50"], runs["resnet18"], runs["mobilenet"]]
    assert [r["experiment"] for r in rows] == ["team-a", "team-b", "team-b"]
    assert rows[0]["latency_ms_p50"] == 1.0 and rows[0]["peak_mem_mb"] == 900.0
    best = masks["resnet50"]
    raw = [sm_mcnemar(np.array([[np.sum(best & m), np.sum(best & ~m)], [np.sum(~best & m), np.sum(~best & ~m)]]),
                      exact=True).pvalue for m in (masks["resnet18"], masks["mobilenet"])]
    holm = multipletests(raw, method="holm")[1]
    np.testing.assert_allclose([rows[1]["pvalue_holm"], rows[2]["pvalue_holm"]], holm, rtol=1e-8)  # JSON: 10 digits
    assert [r["worse_than_best"] for r in rows] == [False, False, True]
    assert rows[0]["acc_low"] < rows[0]["accuracy"] < rows[0]["acc_high"] and rows[0]["accuracy"] == pytest.approx(0.9)


def test_leaderboard_of_an_unknown_test_set_fails_with_one_line(tracking: str, capsys) -> None:
    assert main(["leaderboard", "--fingerprint", "sha256:" + "9" * 32]) == 2
    assert "no FINISHED ablab evaluation on dataset fingerprint" in capsys.readouterr().err
    assert main(["leaderboard", "--fingerprint", "digits"]) == 2
    assert "is not a dataset fingerprint" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ the CLI


@pytest.mark.parametrize("entry", ["compare", "leaderboard"])
def test_mlproject_entry_points_match_the_cli_one_to_one(entry: str) -> None:
    project = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"][entry]
    params = project["parameters"]
    assert all({"type", "default"} <= set(spec) for spec in params.values())
    command = project["command"]
    assert command.startswith(f"python -m lab {entry} ")
    assert [w for w in command.split() if w.startswith("--")] == [f"--{p}" for p in params]
    args = build_parser().parse_args([entry, *[x for p, s in params.items() for x in (f"--{p}", str(s["default"]))]])
    assert args.command == entry
