"""lab/compare/classes.py and the parent at many classes: past 50 classes the summary, the figures and the report
show the classes that matter, every class goes to Parquet tables, summary.json stays small, and the parent's path
(fetch, class names, analyse, report, log) imports no torch.

Run with ``python -m pytest tests/test_compare_classes.py -q``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import subprocess_env
from history_fakes import log_child

from lab import report, runs
from lab.compare import MAX_CLASSES_SHOWN, Arm, analyse, fetch_arms
from lab.config import build_config

K, N = 300, 3000  # ten test images per class
IMPROVED, WORST = 7, 11  # B gets every image of class 7 right where A got none; nobody gets class 11 right


def many_class_frames(k: int = K, n: int = N, seed: int = 0) -> list[pd.DataFrame]:
    """Two arms' predictions as an arm writes them past 100 classes (top-5 classes and probabilities)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % k
    right_a = rng.random(n) < 0.8
    right_b = np.where(rng.random(n) < 0.9, right_a, ~right_a)
    right_a[labels == IMPROVED], right_b[labels == IMPROVED] = False, True
    right_a[labels == WORST] = right_b[labels == WORST] = False
    frames = []
    for right in (right_a, right_b):
        pred = np.where(right, labels, (labels + 1) % k)
        frame = {"sample_id": np.arange(n), "label": labels, "pred": pred, "confidence": rng.uniform(0.3, 1.0, n)}
        frame |= {f"top{j}_class": (pred + j - 1) % k for j in range(1, 6)}
        frame |= {f"top{j}_prob": np.full(n, 0.1, np.float32) for j in range(1, 6)}
        frames.append(pd.DataFrame(frame))
    return frames


def many_class_arms() -> list[Arm]:
    tags = {"ab.dataset_fingerprint": "sha256:f", "ab.num_classes": str(K), "ab.label_map": "m",
            "ab.preprocess": "size=32", "ab.precision": "32", "ab.device": "cpu:x", "ab.placement": "lockstep"}
    return [Arm(name, f"run-{name}", f"model-{name}", dict(tags), {}, frame)
            for name, frame in zip("ab", many_class_frames(), strict=True)]


def test_past_50_classes_the_summary_shows_the_classes_that_matter_and_the_tables_hold_every_class() -> None:
    arms = many_class_arms()
    summary = analyse(build_config({"n_resamples": 200}), arms)
    shown = summary["classes_shown"]
    assert len(shown) == MAX_CLASSES_SHOWN and len(set(shown)) == len(shown)
    assert shown[0] == IMPROVED and WORST in shown  # the largest change first; the worst class is there
    pair = summary["pairs"][0]
    assert [r["class"] for r in pair["per_class"]] == [c for c in shown if c in {r["class"] for r in pair["per_class"]}]
    assert pair["per_class"][0] == pair["per_class"][0] | {"label": str(IMPROVED), "only_a": 0, "only_b": 10}
    for arm, frame in zip(summary["arms"], (a.predictions for a in arms), strict=True):
        assert len(arm["per_class_accuracy"]) == K  # a vector per class stays whole
        matrix, other = np.asarray(arm["confusion"]), np.asarray(arm["confusion_other"])
        assert matrix.shape == (MAX_CLASSES_SHOWN, MAX_CLASSES_SHOWN)
        np.testing.assert_array_equal(matrix.sum(1) + other, 10)  # every image of a shown class, in or out
        right = (frame["pred"] == frame["label"]).to_numpy()
        np.testing.assert_array_equal(np.diag(matrix), [right[frame["label"].to_numpy() == c].sum() for c in shown])

    tables = summary.tables
    per_class = tables["per_class"]
    assert len(per_class) == K and per_class["n"].eq(10).all()
    np.testing.assert_allclose(per_class["accuracy.a"], summary["arms"][0]["per_class_accuracy"])
    assert per_class.loc[IMPROVED, "b_vs_a.only_b"] == 10 and per_class["b_vs_a.only_a"].sum() == pair["mcnemar_b"]
    confusion = tables["confusion"]
    assert confusion.groupby("arm")["count"].sum().to_dict() == {"a": N, "b": N}
    top = confusion[(confusion["arm"] == "b") & (confusion["true"] == IMPROVED)]
    assert top[["pred", "count"]].values.tolist() == [[IMPROVED, 10]]
    flips = tables["flips"]
    assert (flips["right"] == "a").sum() == pair["mcnemar_b"] and (flips["right"] == "b").sum() == pair["mcnemar_c"]

    small = analyse(build_config({"n_resamples": 200}), [Arm(a.name, a.run_id, a.spec, a.tags | {"ab.num_classes": "3"},
                                                             {}, a.predictions.assign(label=a.predictions["label"] % 3,
                                                                                      pred=a.predictions["pred"] % 3))
                                                         for a in many_class_arms()])  # fmt: skip
    assert small["classes_shown"] == [0, 1, 2] and np.asarray(small["arms"][0]["confusion"]).shape == (3, 3)
    assert "confusion_other" not in small["arms"][0]  # up to 50 classes: the summary as it always was


def test_a_300_class_report_is_small_and_writes_every_class_to_parquet(tmp_path: Path) -> None:
    summary = analyse(build_config({"n_resamples": 200}), many_class_arms())
    paths = report.render(summary, tmp_path)
    page = paths["report.html"].read_text()
    assert paths["report.html"].stat().st_size < 1_000_000
    assert "show 50 of the 300 classes" in page and "per_class.parquet" in page
    flip_rows = report.layout.flip_table(summary["pairs"][0])[1]
    assert 0 < len(flip_rows) <= MAX_CLASSES_SHOWN and flip_rows[0][0] == str(IMPROVED)
    assert len(pd.read_parquet(paths["per_class.parquet"])) == K
    assert pd.read_parquet(paths["confusion.parquet"])["count"].sum() == 2 * N
    text = runs.strict_json(summary)  # what log_comparison writes as summary.json: no 300 x 300 matrix in it
    assert len(text) < 100_000 and "tables" not in json.loads(text)


def log_many_class_child(client, experiment_id: str, frame: pd.DataFrame, arm: str, names: list[str],
                         label_map: str) -> str:
    """A finished child run on K classes with metrics/per_class_accuracy.json keyed by class name, as arms log."""
    run_id = log_child(client, experiment_id, frame, arm=arm, bits=False, **{"ab.num_classes": str(K),
                                                                            "ab.label_map": label_map})
    client.log_text(run_id, json.dumps(dict.fromkeys(names, 0.5)), "metrics/per_class_accuracy.json")
    return run_id


PARENT = """
import json, sys
from pathlib import Path
from mlflow import MlflowClient
import lab.cli  # what `python -m lab compare` imports
from lab import experiment, report
from lab.compare import analyse, fetch_arms
from lab.config import build_config
client, cfg = MlflowClient(), build_config({"n_resamples": 200, "data": "imagefolder:/nowhere"})
arms = fetch_arms(client, sys.argv[1:3], ["a", "b"])
summary = report.describe(analyse(cfg, arms, experiment.class_names(cfg, arms)))
experiment.log_comparison(client, sys.argv[3], cfg, summary, Path(sys.argv[4]))
assert "torch" not in sys.modules, [m for m in sys.modules if m.startswith(("torch", "lightning"))][:5]
print(json.dumps(summary["class_names"][:3]))
"""


def test_the_parent_path_names_classes_from_the_children_and_imports_no_torch(tracking: str, tmp_path: Path) -> None:
    """Real SQLite store, real child runs; the parent's path (fetch, class names, analyse, report, log) runs in a
    fresh interpreter, which must never import torch (3-4 s of imports to read class names, before)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    experiment_id = client.create_experiment("many", artifact_location=(tmp_path / "artifacts").as_uri())
    names = [f"n{c:08d}" for c in range(K)]
    label_map = hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16]
    children = [log_many_class_child(client, experiment_id, frame, arm, names, label_map)
                for arm, frame in zip("ab", many_class_frames(), strict=True)]
    parent = client.create_run(experiment_id, tags={"ab.role": "parent"}).info.run_id
    done = subprocess.run([sys.executable, "-c", PARENT, *children, parent, str(tmp_path / "out")],
                          env=subprocess_env(tracking), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == names[:3]  # from the children's artifact, not indices
    client.set_terminated(parent, "FINISHED")
    stored = {f.path for f in client.list_artifacts(parent, "comparison")}
    assert {f"comparison/{t}.parquet" for t in ("per_class", "confusion", "flips")} <= stored
    summary = json.loads(Path(client.download_artifacts(parent, "comparison/summary.json", str(tmp_path))).read_text())
    assert all(np.asarray(a["confusion"]).shape == (MAX_CLASSES_SHOWN,) * 2 for a in summary["arms"])

    other = log_many_class_child(client, experiment_id, many_class_frames()[0], "c", names[::-1], label_map)
    assert fetch_arms(client, [other])[0].extra["class_names"] is None  # names that do not hash to the label map


@pytest.mark.parametrize(("k", "expected"), [(3, [0, 1, 2]), (60, None)])
def test_classes_that_matter_keep_small_sets_whole_and_never_pick_an_absent_class(k: int, expected) -> None:
    from lab.compare import classes_that_matter

    accuracy = np.tile(np.linspace(0.2, 0.9, k), (2, 1))
    accuracy[:, 0] = np.nan  # no test images
    net = np.zeros((1, k))
    net[0, k - 1] = -4
    shown = classes_that_matter(accuracy, net).tolist()
    if expected is not None:
        assert shown == expected
    else:
        assert len(shown) == MAX_CLASSES_SHOWN and shown[0] == k - 1 and 0 not in shown and shown[1:4] == [1, 2, 3]
