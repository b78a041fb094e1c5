"""lab/leaderboard.py: every finished evaluation of one test set, ranked with significance, on a SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from history_fakes import FINGERPRINT, TAGS, correct_mask, log_child, make_arm, predictions
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.multitest import multipletests

from lab.cli import main
from lab.leaderboard import format_table, leaderboard_table


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

    assert main(["leaderboard", "--fingerprint", FINGERPRINT, "--experiment", "boards", "--data_dir",
                 "cache"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("1  resnet50") and "mobilenet" in out.splitlines()[3]
    [board] = mlflow.search_runs([mlflow.get_experiment_by_name("boards").experiment_id], output_format="list")
    assert board.info.status == "FINISHED" and board.data.params["config.fingerprint"] == FINGERPRINT
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
    assert {p.stem for p in Path("cache/history").iterdir()} == set(runs.values())  # bits cached by run id


def test_leaderboard_of_an_unknown_test_set_fails_with_one_line(tracking: str, capsys) -> None:
    assert main(["leaderboard", "--fingerprint", "sha256:" + "9" * 32]) == 2
    assert "no FINISHED ablab evaluation on dataset fingerprint" in capsys.readouterr().err
    assert main(["leaderboard", "--fingerprint", "digits"]) == 2
    assert "is not a dataset fingerprint" in capsys.readouterr().err
    assert mlflow.get_experiment_by_name("ablab") is None  # refused before any run was created


def test_one_evaluation_is_its_own_leaderboard() -> None:
    labels = np.arange(30) % 3
    table = leaderboard_table([make_arm("a", predictions(labels, labels > 0))])
    assert table["rank"].tolist() == [1] and table["pvalue_holm"].isna().all() and not table["worse_than_best"][0]
    text = format_table(table)
    assert text.splitlines()[0].split()[:3] == ["#", "model", "accuracy"] and "best" in text.splitlines()[1]
    with pytest.raises(ValueError, match="needs at least one evaluation"):
        leaderboard_table([])


def test_bits_and_predictions_rank_alike_and_old_runs_still_count(tracking: str) -> None:
    """The table from the packed bits (new runs) and from predictions.parquet (runs older than correct.json) is
    the one the predictions themselves give: same rows, same numbers."""
    from lab import leaderboard, runs
    from lab.compare import fetch_arms
    from lab.config import load_config, unique_names

    client = mlflow.MlflowClient()
    labels = np.arange(120) % 3
    ids = np.arange(120)[::-1] * 3  # rows not in sample_id order: the bits must follow sample_id as align does
    for k, acc in enumerate((0.8, 0.9, 0.75, 0.9)):
        log_child(client, "0", predictions(labels, correct_mask(120, acc, k), ids), model=f"m{k}", bits=k % 2 == 0,
                  metrics={"latency_ms_p50": 2.0 + k})
    cfg = load_config(None, {"data_dir": "cache"})
    fast = leaderboard.evaluations_table(cfg, FINGERPRINT)
    found = runs.search_children(client, f"tags.`ab.dataset_fingerprint` = '{FINGERPRINT}'")
    arms = fetch_arms(client, [r.info.run_id for r in found], unique_names([r.info.run_id[:8] for r in found]))
    context = {r.info.run_id: {"experiment": "Default", "epochs": "0"} for r in found}
    pd.testing.assert_frame_equal(fast, leaderboard_table(arms, context))
    assert fast["model"].tolist()[:2] == ["m3", "m1"]  # tied at 0.9: the newest listed first is best
    assert len(list(Path("cache/history").iterdir())) == 4  # cached by run id, old runs' derived bits too
    pd.testing.assert_frame_equal(leaderboard.evaluations_table(cfg, FINGERPRINT), fast)  # from the cache


def test_a_run_that_scored_other_samples_is_refused_with_one_line(tracking: str, capsys) -> None:
    client = mlflow.MlflowClient()
    labels = np.arange(60) % 3
    log_child(client, "0", predictions(labels, labels > 0))
    log_child(client, "0", predictions((labels + 1) % 3, labels > 0))  # same fingerprint tag, other ground truth
    assert main(["leaderboard", "--fingerprint", FINGERPRINT, "--data_dir", "cache"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ablab: error:") and "labels differ on 60 samples" in err and len(err.splitlines()) == 1
    assert mlflow.get_experiment_by_name("ablab") is None


def test_a_complete_run_without_predictions_is_named(tracking: str, capsys) -> None:
    client = mlflow.MlflowClient()
    log_child(client, "0", predictions(np.arange(30) % 3, np.ones(30, bool)))
    bare = client.create_run("0", tags=TAGS | {"ab.complete": "true"}).info.run_id
    client.set_terminated(bare, "FINISHED")
    assert main(["leaderboard", "--fingerprint", FINGERPRINT, "--data_dir", "cache"]) == 2
    assert f"run {bare} has no predictions/predictions.parquet" in capsys.readouterr().err
