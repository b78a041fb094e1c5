"""The whole job through MLflow Projects: `mlflow run . --env-manager local` against a temporary SQLite store.

The parent's numbers must equal what one recomputes by hand from the two children's prediction files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, subprocess_env
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar


@pytest.mark.slow
def test_mlflow_run_end_to_end(tracking: str, tmp_path: Path) -> None:
    import mlflow

    env = subprocess_env(tracking)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    params = {"a": "resnet10t", "b": "mobilenetv3_small_100", "epochs": "1", "seed": "7", "n_resamples": "2000"}
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", "--experiment-name", "e2e"]
    cmd += [arg for k, v in params.items() for arg in ("-P", f"{k}={v}")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    client = mlflow.MlflowClient(tracking)
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("ab.role") == "parent")
    children = {r.data.tags["ab.arm"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert parent.info.status == "FINISHED" and set(children) == {"a", "b"}
    assert all(c.info.status == "FINISHED" and c.data.tags["ab.role"] == "child" for c in children.values())
    assert children["a"].info.run_name == "a: resnet10t"
    assert children["a"].data.tags["ab.dataset_fingerprint"] == children["b"].data.tags["ab.dataset_fingerprint"]
    assert parent.data.params["config.seed"] == "7" and parent.data.params["config.epochs"] == "1"
    assert parent.data.params["config.data"] == "digits"  # from configs/default.yaml, not given with -P

    frames = {}
    for arm, run in children.items():
        path = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="predictions/predictions.parquet", dst_path=str(tmp_path / arm)
        )
        frames[arm] = pd.read_parquet(path)
        assert {"sample_id", "label", "pred", "confidence", "prob_0", "prob_9"} <= set(frames[arm].columns)
        assert frames[arm]["sample_id"].dtype == np.int64
        for key in ("latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "throughput_img_per_s", "test_accuracy"):
            assert key in run.data.metrics
        assert run.data.tags["ab.device"].startswith("cpu")
    a, b = frames["a"], frames["b"]
    np.testing.assert_array_equal(a["sample_id"], b["sample_id"])
    np.testing.assert_array_equal(a["label"], b["label"])

    # Recompute by hand, with an independent McNemar implementation.
    ca, cb = (a["pred"] == a["label"]).to_numpy(), (b["pred"] == b["label"]).to_numpy()
    n_b, n_c = int((ca & ~cb).sum()), int((~ca & cb).sum())
    m = parent.data.metrics
    assert m["acc_a"] == pytest.approx(ca.mean()) and m["acc_b"] == pytest.approx(cb.mean())
    assert (m["mcnemar_b"], m["mcnemar_c"]) == (n_b, n_c)
    table = [[int((ca & cb).sum()), n_b], [n_c, int((~ca & ~cb).sum())]]
    assert m["mcnemar_pvalue"] == pytest.approx(sm_mcnemar(table, exact=True).pvalue, rel=1e-9)
    assert m["acc_diff"] == pytest.approx(cb.mean() - ca.mean())
    assert m["acc_diff_ci_low"] <= m["acc_diff"] <= m["acc_diff_ci_high"]

    tags = parent.data.tags
    expected = {"b_better", "a_better", "no_significant_difference"}
    assert tags["ab.role"] == "parent" and tags["ab.verdict"] in expected
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id, "comparison")}
    assert {"comparison/report.md", "comparison/report.html", "comparison/summary.json"} <= artifacts
    assert "config.yaml" in {f.path for f in client.list_artifacts(parent.info.run_id)}
    report = Path(
        mlflow.artifacts.download_artifacts(
            run_id=parent.info.run_id, artifact_path="comparison", dst_path=str(tmp_path / "report")
        )
    )
    html = (report / "report.html").read_text()
    assert escape(tags["ab.verdict_sentence"]) in html and html.count("data:image/png;base64,") >= 4
    summary = json.loads((report / "summary.json").read_text())
    assert summary["verdict"] == tags["ab.verdict"] and summary["n"] == len(a)
    assert (report / "report.md").read_text().splitlines()[2] == f"**{tags['ab.verdict_sentence']}**"
