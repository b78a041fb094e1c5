"""lab/history.py: the evaluation key, and finding the finished child runs to reuse, on a SQLite store.

Evaluations are faked (tests/history_fakes.py: child runs with the tags and predictions an arm logs), so the
search runs in seconds; tests/test_experiment.py checks that `run` reuses what is found.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import write_safetensors
from history_fakes import (
    FINGERPRINT,
    PREPROCESS,
    fast_cfg,
    fast_dataset,
    log_child,
    log_fast_child,
    make_arm,
    predictions,
)

from lab import history

LABELS = np.arange(60) % 3


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


def test_a_registry_version_is_found_in_the_fine_tune_that_produced_it(tracking: str) -> None:
    """`models:/clf/2` evaluated as it is = the predictions its fine-tuned child recorded (registered by
    lab/registry.py, tag ab.registered.clf = 2): same test set, preprocessing and precision, any recipe."""
    client = mlflow.MlflowClient()
    exp = client.create_experiment("e")
    fp, _, _, pre = fast_dataset()
    tuned = log_fast_child(client, exp, 0.5, "timm:resnet10t:pretrained=False:classes=10", **{"ab.registered.clf": "2"})
    log_fast_child(client, exp, 0.5, "timm:resnet10t:pretrained=False:classes=10", **{"ab.registered.clf": "3"})
    key = history.EvalKey("models:/clf/2", fp, pre, "32", (("epochs", "7"),))  # the child's epochs: 0
    assert history.find_reusable(client, key).info.run_id == tuned
    for change in ({"identity": "models:/clf/4"}, {"identity": "models:/other/2"}, {"precision": "16-mixed"},
                   {"preprocess": "size=224"}, {"fingerprint": "sha256:" + "00" * 16}):
        assert history.find_reusable(client, history.EvalKey(**{**key.__dict__, **change})) is None, change


def test_recipe_of_a_fine_tuned_arm_holds_the_training_keys() -> None:
    as_is, tuned = history.recipe(fast_cfg()), dict(history.recipe(fast_cfg(epochs="3", lr="0.01")))
    assert as_is == (("epochs", "0"),)
    assert tuned == {"epochs": "3", "lr": "0.01", "weight_decay": "0.05", "batch_size": "16", "augment": "none",
                     "seed": "0", "data": "fake", "devices_per_arm": "1"}


def test_a_ddp_fine_tune_and_a_one_process_one_are_not_reused_for_each_other(tracking: str) -> None:
    """devices_per_arm changes a fine-tune's effective batch and order; runs from before the param count as 1."""
    client = mlflow.MlflowClient()
    frame = predictions(LABELS, LABELS > 0)
    recipe = dict(history.recipe(fast_cfg(epochs="3")))
    key = history.EvalKey("timm:resnet10t:pretrained=False:classes=3", FINGERPRINT, PREPROCESS, "32",
                          tuple(recipe.items()))
    ddp_key = dataclasses.replace(key, recipe=tuple((recipe | {"devices_per_arm": "2"}).items()))
    before = {k: v for k, v in recipe.items() if k != "devices_per_arm"}  # logged before the param existed
    legacy = log_child(client, "0", frame, params=before)
    assert history.find_reusable(client, key).info.run_id == legacy
    assert history.find_reusable(client, ddp_key) is None
    ddp = log_child(client, "0", frame, params=recipe | {"devices_per_arm": "2"})
    assert history.find_reusable(client, ddp_key).info.run_id == ddp
    assert history.find_reusable(client, key).info.run_id == legacy


@pytest.mark.parametrize("preprocess", ["shared", "native"])
def test_expected_key_agrees_with_what_the_arm_resolves(tracking: str, tmp_path: Path, preprocess: str) -> None:
    """Computed without weights, the key must equal what lab.models.resolve_model gives the arm to log."""
    import timm

    from lab.models import preprocess_for, resolve_model

    fp = fast_dataset()[0]
    cfg = fast_cfg(preprocess=preprocess)
    weights = write_safetensors(timm.create_model("resnet10t", num_classes=10), "resnet10t", tmp_path / "w.safetensors")
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
    assert history.expected_key(str(tmp_path / "missing.safetensors"), cfg, 10, fp) is None


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


def test_reusable_arms_finds_each_arm_and_rerun_finds_none(tracking: str, capsys) -> None:
    client = mlflow.MlflowClient()
    exp = client.create_experiment("last-month")
    run_b = log_fast_child(client, exp, 0.4, "timm:mobilenetv3_small_100:pretrained=False:classes=10")
    found = history.reusable_arms(fast_cfg())
    assert {i: r.info.run_id for i, r in found.items()} == {1: run_b}
    assert f"arm b (mobilenetv3_small_100) reuses the predictions of run {run_b}" in capsys.readouterr().err
    assert history.reusable_arms(fast_cfg(), indices=[0]) == {}
    assert history.reusable_arms(fast_cfg(rerun="true")) == {}
    assert history.reusable_arms(fast_cfg(deterministic="true")) == {}  # it ran without deterministic kernels


def test_deterministic_is_in_every_arms_key_and_an_untagged_run_counts_as_false(tracking: str) -> None:
    client = mlflow.MlflowClient()
    frame = predictions(LABELS, LABELS > 0)
    key = history.EvalKey("timm:resnet10t:pretrained=False:classes=3", FINGERPRINT, PREPROCESS, "32",
                          (("epochs", "0"),))
    strict = dataclasses.replace(key, deterministic="true")
    legacy = log_child(client, "0", frame)  # logged before ab.deterministic existed
    assert history.find_reusable(client, key).info.run_id == legacy
    assert history.find_reusable(client, strict) is None
    tagged = log_child(client, "0", frame, **{"ab.deterministic": "true"})
    assert history.find_reusable(client, strict).info.run_id == tagged
    assert history.find_reusable(client, key).info.run_id == legacy  # newer, but deterministic: not for false
    newest = log_child(client, "0", frame, **{"ab.deterministic": "false"})
    assert history.find_reusable(client, key).info.run_id == newest
    assert history.find_reusable(client, strict).info.run_id == tagged
    fp = fast_dataset()[0]
    assert history.expected_key("resnet10t", fast_cfg(deterministic="true"), 10, fp).deterministic == "true"
    assert history.expected_key("resnet10t", fast_cfg(), 10, fp).deterministic == "false"
    assert "deterministic" in history.reuse_key_line(False) and "deterministic" in history.reuse_key_line(True)


def test_lookup_finds_each_key_and_notes_stale_runs(tracking: str) -> None:
    """The store side of reuse (what benchmarks/history_scale.py times): one search per arm, one for stale runs."""
    client = mlflow.MlflowClient()
    frame = predictions(LABELS, LABELS > 0)
    key = history.EvalKey("timm:resnet10t:pretrained=False:classes=3", FINGERPRINT, PREPROCESS, "32",
                          (("epochs", "0"),))
    run = log_child(client, "0", frame)
    missing = dataclasses.replace(key, identity="timm:resnet18:pretrained=False:classes=3")
    found, note = history.lookup(client, {0: key, 3: missing})
    assert {i: r.info.run_id for i, r in found.items()} == {0: run} and note == ""
    stale = {"ab.host": "elsewhere", "ab.heartbeat": "1000"}  # another machine's run whose heartbeat stopped
    log_child(client, "0", frame, status="RUNNING", **stale, **{"ab.dataset_fingerprint": "sha256:" + "0" * 32})
    assert history.lookup(client, {0: key})[1] == ""  # stale, but on another test set: it would not be used
    log_child(client, "0", frame, status="RUNNING", **stale)
    assert "1 run(s) on this test set left RUNNING" in history.lookup(client, {0: key})[1]


def test_mark_reused_tags_the_parent_and_the_arm(tracking: str) -> None:
    client = mlflow.MlflowClient()
    exp = client.create_experiment("e")
    parent = client.create_run(exp).info.run_id
    old = client.get_run(log_child(client, exp, predictions(LABELS, LABELS > 0)))
    arms = [make_arm("a", predictions(LABELS, LABELS > 0)), make_arm("b", predictions(LABELS, LABELS > 1))]
    history.mark_reused(client, parent, arms, {1: old})
    assert arms[1].extra["reused_from"] == old.info.run_id and "reused_from" not in arms[0].extra
    tags = client.get_run(parent).data.tags
    assert tags["ab.reused.b"] == old.info.run_id and "ab.reused.a" not in tags
