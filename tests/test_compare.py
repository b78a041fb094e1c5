"""lab/compare.py and lab/report.py on constructed arms: the guard, the numbers, the names, the rendering."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.contingency_tables import cochrans_q as sm_cochrans_q

from lab.compare import Arm, ComparisonError, analyse, parent_metrics
from lab.config import build_config
from lab.report import render

TAGS = {
    "ab.dataset_fingerprint": "sha256:f",
    "ab.num_classes": "3",
    "ab.label_map": "m",
    "ab.device": "cpu:x",
    "ab.placement": "lockstep",
    "ab.preprocess": "size=32",
    "ab.precision": "32",
    "mlflow.parentRunId": "p",
}


def _arms(accuracies: list[float], n: int = 600, seed: int = 0, **tag_changes) -> list[Arm]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    arms = []
    for i, acc in enumerate(accuracies):
        right = rng.random(n) < acc
        pred = np.where(right, labels, (labels + 1) % 3)
        frame = pd.DataFrame(
            {
                "sample_id": np.arange(n)[::-1],
                "label": labels[::-1],
                "pred": pred[::-1],
                "confidence": rng.uniform(0.4, 1.0, n),
            }
        )
        batches = pd.DataFrame(
            {"batch_idx": np.arange(12), "latency_ms": rng.normal(10 + i, 0.5, 12), "warmup": [True] * 2 + [False] * 10}
        )
        tags = TAGS | (tag_changes if i == len(accuracies) - 1 else {})
        arms.append(Arm(f"m{i}", f"run{i}", f"model{i}", dict(tags), {"latency_ms_p50": 10.0 + i}, frame, batches))
    return arms


def test_two_arms_metrics_match_the_data() -> None:
    arms = _arms([0.7, 0.8])
    summary = analyse(build_config({"n_resamples": 2000}), arms)
    frames = [a.predictions.sort_values("sample_id") for a in arms]
    correct = [(f["pred"] == f["label"]).to_numpy() for f in frames]
    m = parent_metrics(summary)
    assert m["acc_a"] == pytest.approx(correct[0].mean()) and m["acc_b"] == pytest.approx(correct[1].mean())
    assert m["mcnemar_b"] == (correct[0] & ~correct[1]).sum() and m["mcnemar_c"] == (~correct[0] & correct[1]).sum()
    assert summary["verdict"] == "b_better" and summary["sentence"].startswith("model1 (m1) is better than model0")
    assert summary["latency"]["comparable"] and summary["latency"]["paired"]["n_batches"] == 10
    assert m["latency_diff_ms"] == pytest.approx(summary["latency"]["paired"]["estimate_ms"])


def test_abn_runs_cochran_and_holm_and_names_pairs() -> None:
    arms = _arms([0.70, 0.72, 0.85])
    summary = analyse(build_config({"arms": ["model0", "model1", "model2"], "n_resamples": 1000}), arms)
    correct = np.stack([(a.predictions["pred"] == a.predictions["label"]).to_numpy() for a in arms], axis=1)
    assert summary["cochran"]["pvalue"] == pytest.approx(sm_cochrans_q(correct.astype(int)).pvalue)
    m = parent_metrics(summary)
    assert {"acc_diff.m1_vs_m0", "acc_diff.m2_vs_m0", "mcnemar_pvalue_holm.m2_vs_m0", "cochran_q"} <= set(m)
    assert "acc_a" not in m  # the two-arm names are only for two arms
    holm = {(p["a"], p["b"]): p["pvalue_holm"] for p in summary["pairwise"]}
    raw = {(p["a"], p["b"]): p["pvalue"] for p in summary["pairwise"]}
    assert all(holm[k] >= raw[k] for k in holm)
    assert summary["verdict"] == "m2_best"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ab.num_classes": "4"}, "number of classes differs"),
        ({"ab.label_map": "other"}, "label map"),
        ({"ab.dataset_fingerprint": "sha256:g"}, "dataset fingerprint differs"),
    ],
)
def test_guard_refuses_each_kind_of_mismatch(change: dict, message: str) -> None:
    with pytest.raises(ComparisonError, match=message):
        analyse(build_config({}), _arms([0.7, 0.8], **change))


def test_guard_refuses_different_labels_or_samples() -> None:
    arms = _arms([0.7, 0.8])
    arms[1].predictions.loc[0, "label"] = (arms[1].predictions.loc[0, "label"] + 1) % 3
    with pytest.raises(ComparisonError, match="labels differ on 1 samples"):
        analyse(build_config({}), arms)
    arms = _arms([0.7, 0.8])
    arms[1].predictions = arms[1].predictions.iloc[1:]
    with pytest.raises(ComparisonError, match="sample ids differ"):
        analyse(build_config({}), arms)


def test_non_inferiority_verdict_follows_the_interval() -> None:
    arms = _arms([0.80, 0.79], n=4000, seed=3)
    for margin in (0.05, 0.001):
        summary = analyse(build_config({"rule": "non_inferiority", "margin": margin, "n_resamples": 2000}), arms)
        p = summary["pairs"][0]
        expected = "b_non_inferior" if p["decision_low"] > -margin else "non_inferiority_not_shown"
        assert summary["verdict"] == expected
    assert analyse(build_config({"rule": "non_inferiority", "margin": 0.05}), arms)["verdict"] == "b_non_inferior"


def test_preprocessing_difference_is_flagged_and_report_renders(tmp_path: Path) -> None:
    arms = _arms([0.7, 0.8], **{"ab.preprocess": "size=224"})
    summary = analyse(build_config({"n_resamples": 1000}), arms)
    assert summary["preprocess_differs"]
    paths = render(summary, tmp_path, gallery=lambda ids: [np.zeros((8, 8, 3), np.uint8)] * min(len(ids), 3))
    page = paths["report.html"].read_text()
    assert (
        page.index(html.escape(summary["sentence"])) < page.index("preprocessing differs") < page.index("<h2>Arms</h2>")
    )
    assert 'src="http' not in page and page.count("data:image/png;base64,") >= 6  # self-contained
    assert paths["report.md"].read_text().splitlines()[2] == f"**{summary['sentence']}**"
    assert (tmp_path / "flip_gallery.png").stat().st_size > 0
