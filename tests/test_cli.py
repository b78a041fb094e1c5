"""Bad input through the real command line: one clear line, a non-zero exit, no run left RUNNING."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import FAST_ARGS, ROOT, runs_by_status, subprocess_env

from lab.cli import main


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("ablab: error:")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--a", "resnet5O"], "unknown model 'resnet5O'"),
        (["--data", "cifar11"], "unknown dataset 'cifar11'; did you mean cifar10"),
        (["--a", "/no/such/best.ckpt"], "checkpoint not found: '/no/such/best.ckpt'"),
        (["--data", "imagefolder:/no/such/dir"], "imagefolder: no such directory"),
        (["--epochs", "-2"], "epochs: -2 is out of range"),
        (["--placement", "diagonal"], "placement: 'diagonal' is not allowed"),
        (["--config", "configs/nope.yaml"], "config: no such file 'configs/nope.yaml'"),
        (["--allow_random_head", "false"], "would score randomly initialised weights"),
    ],
)
def test_bad_input_before_any_run(tracking: str, capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    code = main(["run", *FAST_ARGS, *args])
    err = capsys.readouterr().err
    assert code == 2
    assert len(_error_lines(err)) == 1 and message in _error_lines(err)[0], err
    assert runs_by_status(tracking).get("RUNNING", 0) == 0


def test_bad_checkpoints_fail_their_arms_and_the_parent(tracking: str, tmp_path: Path) -> None:
    """Three arms in lockstep: a good one, one with the wrong class count, one corrupt. Each bad arm's run is
    FAILED with its reason, the parent FAILED naming both, the good arm's run and artifacts are kept, and the
    good arm is not left waiting for the dead arms' turns."""
    import timm
    from mlflow import MlflowClient

    from lab.models import save_safetensors

    five = save_safetensors(
        timm.create_model("resnet10t", num_classes=5), "resnet10t", tmp_path / "five.safetensors", 5
    )
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 truncated zip")
    arms = f"resnet10t,{five},resnet10t:{corrupt}"
    proc = subprocess.run(
        [sys.executable, "-m", "lab", "run", *FAST_ARGS, "--arms", arms, "--placement", "lockstep"],
        env=subprocess_env(tracking),
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
    )
    assert proc.returncode == 1
    last = _error_lines(proc.stderr)[-1]
    assert "has 5 output classes but the dataset has 10" in last and "could not be read" in last
    client = MlflowClient(tracking)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    status = {r.data.tags.get("ab.role", "") + ":" + r.data.tags.get("ab.arm_index", ""): r.info.status for r in runs}
    assert status == {"parent:": "FAILED", "child:0": "FINISHED", "child:1": "FAILED", "child:2": "FAILED"}
    good = next(r for r in runs if r.data.tags.get("ab.arm_index") == "0")
    assert [a.path for a in client.list_artifacts(good.info.run_id, "predictions")] == [
        "predictions/predictions.parquet"
    ]
    parent = next(r for r in runs if r.data.tags.get("ab.role") == "parent")
    assert "output classes" in parent.data.tags["ab.error"]
    bad = next(r for r in runs if r.data.tags.get("ab.arm_index") == "2")
    assert "could not be read" in bad.data.tags["ab.error"]


def test_mismatched_fingerprints_are_refused() -> None:
    from lab.compare import Arm, ComparisonError, analyse
    from lab.config import build_config

    frame = pd.DataFrame(
        {"sample_id": np.arange(4), "label": [0, 1, 0, 1], "pred": [0, 1, 1, 1], "confidence": [0.9] * 4}
    )
    tags = {"ab.dataset_fingerprint": "sha256:aaa", "ab.num_classes": "2", "ab.label_map": "x"}
    a = Arm("a", "run-a", "resnet18", dict(tags), {}, frame.copy())
    b = Arm("b", "run-b", "resnet34", tags | {"ab.dataset_fingerprint": "sha256:bbb"}, {}, frame.copy())
    with pytest.raises(ComparisonError) as info:
        analyse(build_config({}), [a, b])
    message = str(info.value)
    assert message.startswith("dataset fingerprint differs:") and "\n" not in message
    assert "a (run run-a) has sha256:aaa" in message and "b (run run-b) has sha256:bbb" in message


def test_help_lists_every_config_key() -> None:
    from lab.cli import build_parser
    from lab.config import FIELDS

    text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    assert all(f"--{f.name}" in text for f in FIELDS)
