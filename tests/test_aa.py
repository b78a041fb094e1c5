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


def job(tracking: str, *extra: str) -> dict:
    """One A/A job on digits (one epoch at 16 px); the parent's tags and each child's predictions."""
    from mlflow import MlflowClient, artifacts

    cmd = [sys.executable, "-m", "lab", "run", "--data", "digits", "--epochs", "1", "--a", "resnet10t", "--b",
           "resnet10t", "--image_size", "16", "--n_resamples", "1000", "--warmup_batches", "1", "--devices", "cpu",
           *extra]
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


@pytest.mark.slow  # two one-epoch jobs on digits: several minutes on two CPU cores
def test_aa_on_digits_identical_with_one_seed_and_seed_noise_with_seed_b(tracking: str) -> None:
    same = job(tracking, "--deterministic", "true")
    assert same["parent"].data.tags.get("ab.aa_test") == "true"
    assert all(k.data.tags["ab.deterministic"] == "true" for k in same["kids"].values())
    pd.testing.assert_frame_equal(same["preds"]["a"], same["preds"]["b"])  # same seed, deterministic: identical
    assert "A/A test: every arm is resnet10t, with one seed: here 0 of" in same["report"]
    noisy = job(tracking, "--seed_b", "1")
    assert noisy["kids"]["b"].data.tags["ab.seed"] == "1" and noisy["kids"]["a"].data.tags["ab.seed"] == "0"
    assert "A/A test: every arm is resnet10t, trained with seeds 0 and 1:" in noisy["report"]
