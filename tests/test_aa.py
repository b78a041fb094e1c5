"""A/A tests (issue 11, item 6): the same model twice is allowed and labelled, B may differ only by seed
(`seed_b`), `deterministic=true` is a setting, and the report says what a clean A/A result looks like."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
from conftest import ROOT, subprocess_env

from lab.config import ConfigError, build_config
from lab.report.notes import aa_line


def test_the_same_model_twice_is_an_aa_test() -> None:
    cfg = build_config({"a": "resnet10t", "b": "resnet10t", "epochs": 1, "seed_b": 7})
    assert cfg.aa_test and cfg.arm_names == ("a", "b")
    assert (cfg.arm_seed(0), cfg.arm_seed(1)) == (0, 7)
    assert build_config({"arms": "resnet10t,resnet10t,resnet10t"}).aa_test
    assert build_config({"a": "resnet10t", "b": "resnet10t"}).arm_seed(1) == 0  # seed_b=-1: B follows `seed`
    assert not build_config({"a": "resnet10t", "b": "resnet18"}).aa_test


def test_a_repeated_model_among_others_is_still_refused() -> None:
    with pytest.raises(ConfigError, match=r"the same model appears twice .*an A/A test"):
        build_config({"arms": "resnet10t,resnet10t,resnet18"})
    with pytest.raises(ConfigError, match=r"^seed_b: -2 is out of range"):
        build_config({"seed_b": -2})


def summary(seeds: tuple[str, str], specs: tuple[str, str] = ("resnet10t", "resnet10t")) -> dict:
    arms = [{"name": n, "spec": s, "seed": seed} for n, s, seed in zip("ab", specs, seeds, strict=True)]
    return {"arms": arms, "pairs": [{"mcnemar_b": 3, "mcnemar_c": 5}], "n": 400, "alpha": 0.05}


def test_the_report_line_says_what_clean_looks_like_and_the_seed_noise() -> None:
    seeded = aa_line(summary(("0", "1")))
    assert seeded.startswith("A/A test: every arm is resnet10t, trained with seeds 0 and 1: here 8 of 400 test "
                             "images (2.00%) changed correctness, the seed-to-seed noise floor")
    assert "A clean result is no significant difference" in seeded and "latency differences" in seeded
    assert "deterministic=true" in aa_line(summary(("0", "0")))
    assert aa_line(summary(("0", "0"), ("resnet10t", "resnet18"))) is None


def test_an_aa_test_of_three_arms_reads_each_against_the_baseline_by_seed() -> None:
    arms = [{"name": n, "spec": "resnet10t", "seed": seed} for n, seed in (("x", "0"), ("y", "0"), ("z", "1"))]
    pairs = [{"a": "x", "b": "y", "mcnemar_b": 0, "mcnemar_c": 0}, {"a": "x", "b": "z", "mcnemar_b": 4, "mcnemar_c": 6}]
    line = aa_line({"arms": arms, "pairs": pairs, "n": 500, "alpha": 0.05})
    assert ("with seeds 0, 0, 1: y (seed 0) against x (seed 0): 0 of 500 test images (0.00%) changed correctness; "
            "z (seed 1) against x (seed 0): 10 of 500 test images (2.00%) changed correctness.") in line
    one_seed = aa_line({"arms": [dict(a, seed="0") for a in arms], "pairs": pairs, "n": 500, "alpha": 0.05})
    assert "with one seed: here 10 of 500 test images (2.00%) changed correctness" in one_seed  # the worst pair


def job(tracking: str, *extra: str) -> dict:
    """One A/A job on digits (one epoch at 16 px); the parent's tags and each child's predictions."""
    from mlflow import MlflowClient, artifacts

    cmd = [sys.executable, "-m", "lab", "run", "--data", "digits", "--epochs", "1", "--image_size", "16",
           "--n_resamples", "1000", "--warmup_batches", "1", "--devices", "cpu", *extra]
    done = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(tracking), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    client = MlflowClient(tracking)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time DESC"])
    parent = next(r for r in runs if r.data.tags.get("ab.role") == "parent")
    kids = {r.data.tags["ab.arm"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    preds = {name: pd.read_parquet(artifacts.download_artifacts(run_id=r.info.run_id, tracking_uri=tracking,
                                                                artifact_path="predictions/predictions.parquet"))
             for name, r in kids.items()}
    report = open(artifacts.download_artifacts(run_id=parent.info.run_id, tracking_uri=tracking,
                                               artifact_path="comparison/report.md")).read()
    return {"parent": parent, "kids": kids, "preds": preds, "report": report}


@pytest.mark.slow  # one three-arm job of one epoch on digits: a few minutes on two CPU cores
def test_aa_on_digits_identical_with_one_seed_and_seed_noise_with_a_seed_suffix(tracking: str) -> None:
    """Two arms with one seed and deterministic=true give identical predictions; a third with `@seed=1` shows the
    seed-to-seed noise. (`seed_b` and the suffix resolve through the same `Config.arm_seed`, tested above.)"""
    done = job(tracking, "--deterministic", "true", "--arms", "resnet10t,resnet10t,resnet10t@seed=1")
    assert done["parent"].data.tags.get("ab.aa_test") == "true"
    kids = done["kids"]
    assert sorted(kids) == ["resnet10t-seed_1", "resnet10t_0", "resnet10t_1"]
    assert all(k.data.tags["ab.deterministic"] == "true" for k in kids.values())
    assert [kids[n].data.tags["ab.seed"] for n in ("resnet10t_0", "resnet10t_1", "resnet10t-seed_1")] == ["0", "0", "1"]
    assert kids["resnet10t-seed_1"].data.tags["ab.model"] == "resnet10t"  # the suffix is not part of the model
    pd.testing.assert_frame_equal(done["preds"]["resnet10t_0"], done["preds"]["resnet10t_1"])  # identical
    seed_noise = (done["preds"]["resnet10t_0"]["pred"] != done["preds"]["resnet10t-seed_1"]["pred"]).sum()
    assert seed_noise > 0  # another initialisation and order: some predictions differ
    assert "A/A test: every arm is resnet10t, with seeds 0, 0, 1: resnet10t_1 (seed 0) against resnet10t_0 (seed 0): " \
           "0 of" in done["report"]
    assert "resnet10t-seed_1 (seed 1) against resnet10t_0 (seed 0):" in done["report"]
