"""The whole job through MLflow Projects: `mlflow run . --env-manager local` against a temporary SQLite store.

The parent's numbers must equal what one recomputes by hand from the two children's prediction files. The job's
lineage is checked on the same store: the parent named `<a> vs <b>`, the dataset search by the test set's digest,
both fine-tuned arms as logged models with linked metrics, and `compare` of `runs:/<child>/model` reproducing that
child's predictions exactly. Then promotion from a run (`register`, `promote_alias`) on digits, end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, subprocess_env
from mlflow.entities import Run
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar


@dataclass(frozen=True)
class Job:
    """What `mlflow run` left in its store: the parent and its children by arm."""

    uri: str
    env: dict[str, str]
    root: Path
    parent: Run
    children: dict[str, Run]


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Job:
    """One `mlflow run . --env-manager local` job (resnet10t vs mobilenetv3_small_100, one epoch on digits)."""
    import mlflow

    root = tmp_path_factory.mktemp("e2e")
    uri = f"sqlite:///{root}/mlflow.db"
    env = subprocess_env(uri)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    params = {"a": "resnet10t", "b": "mobilenetv3_small_100", "epochs": "1", "seed": "7", "n_resamples": "2000"}
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", "--experiment-name", "e2e"]
    cmd += [arg for k, v in params.items() for arg in ("-P", f"{k}={v}")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name("e2e").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("ab.role") == "parent")
    children = {r.data.tags["ab.arm"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    return Job(uri, env, root, parent, children)


@pytest.mark.slow
def test_mlflow_run_end_to_end(job: Job, tmp_path: Path) -> None:
    import mlflow

    client, parent, children = mlflow.MlflowClient(job.uri), job.parent, job.children
    assert parent.info.status == "FINISHED" and set(children) == {"a", "b"}
    assert all(c.info.status == "FINISHED" and c.data.tags["ab.role"] == "child" for c in children.values())
    assert children["a"].info.run_name == "a: resnet10t"
    assert children["a"].data.tags["ab.dataset_fingerprint"] == children["b"].data.tags["ab.dataset_fingerprint"]
    assert parent.data.params["config.seed"] == "7" and parent.data.params["config.epochs"] == "1"
    assert parent.data.params["config.data"] == "digits"  # from configs/default.yaml, not given with -P

    frames = {}
    for arm, run in children.items():
        path = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="predictions/predictions.parquet", dst_path=str(tmp_path / arm),
            tracking_uri=job.uri,
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
    expected = {"b_better", "a_better", "no_significant_difference", "inconclusive"}
    assert tags["ab.role"] == "parent" and tags["ab.verdict"] in expected
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id, "comparison")}
    assert {"comparison/report.md", "comparison/report.html", "comparison/summary.json"} <= artifacts
    assert "config.yaml" in {f.path for f in client.list_artifacts(parent.info.run_id)}
    report = Path(
        mlflow.artifacts.download_artifacts(
            run_id=parent.info.run_id, artifact_path="comparison", dst_path=str(tmp_path / "report"),
            tracking_uri=job.uri,
        )
    )
    html = (report / "report.html").read_text()
    assert escape(tags["ab.verdict_sentence"]) in html and html.count("data:image/png;base64,") >= 4
    summary = json.loads((report / "summary.json").read_text())
    assert summary["verdict"] == tags["ab.verdict"] and summary["n"] == len(a)
    assert (report / "report.md").read_text().splitlines()[2] == f"**{tags['ab.verdict_sentence']}**"


@pytest.mark.slow
def test_the_job_is_found_by_its_test_set_and_its_arms_are_logged_models(job: Job) -> None:
    """Issue 10: the parent named `<a> vs <b>` under `mlflow run`, a dataset search by the test set's digest that
    finds the parent and both children, and both fine-tuned arms as pt2 models whose metrics carry model and data."""
    import mlflow

    client, parent = mlflow.MlflowClient(job.uri), job.parent
    assert parent.info.run_name == "resnet10t vs mobilenetv3_small_100"  # not MLflow Projects' random name
    digest = parent.data.tags["ab.dataset_fingerprint"].removeprefix("sha256:")
    found = client.search_runs([parent.info.experiment_id], filter_string=f"dataset.digest = '{digest}'")
    assert {r.info.run_id for r in found} == {parent.info.run_id} | {c.info.run_id for c in job.children.values()}
    for child in job.children.values():
        contexts = {i.tags[0].value: i.dataset for i in child.inputs.dataset_inputs}
        assert set(contexts) == {"test", "train"} and contexts["test"].name == "digits"
        assert json.loads(contexts["test"].profile)["num_samples"] == 539
        model = client.get_logged_model(child.data.tags["ab.logged_model"])
        assert (child.data.tags["ab.logged_model_format"], model.source_run_id) == ("pt2", child.info.run_id)
        linked = {m.key: m for m in model.metrics}
        assert {"test_accuracy", "latency_ms_p50", "throughput_img_per_s", "cpu_rss_peak_mb"} <= set(linked)
        assert all((m.model_id, m.dataset_digest, m.dataset_name) == (model.model_id, digest, "digits")
                   for m in linked.values())
        assert linked["test_accuracy"].value == child.data.metrics["test_accuracy"]


@pytest.mark.slow
def test_compare_reloads_a_fine_tuned_arm_and_reproduces_its_predictions_exactly(job: Job) -> None:
    import mlflow

    client, a, b = mlflow.MlflowClient(job.uri), job.children["a"], job.children["b"]
    cmd = [sys.executable, "-m", "lab", "compare", "--a", f"runs:/{a.info.run_id}/model", "--b", b.info.run_id,
           "--experiment", "reload", "--n_resamples", "1000"]
    proc = subprocess.run(cmd, env=job.env, capture_output=True, text=True, timeout=900, cwd=job.root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = client.search_runs([client.get_experiment_by_name("reload").experiment_id])
    [again] = [r for r in runs if r.data.tags.get("ab.role") == "child"]  # B is reused; A is evaluated anew
    assert again.data.tags["ab.model"] == f"runs:/{a.info.run_id}/model"

    def predictions(run: Run) -> pd.DataFrame:
        path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, tracking_uri=job.uri,
                                                   artifact_path="predictions/predictions.parquet")
        return pd.read_parquet(path).sort_values("sample_id").reset_index(drop=True)

    pd.testing.assert_frame_equal(predictions(again), predictions(a), check_exact=True)  # pred, confidence, probs


def _lab(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "lab", *args], env=env, capture_output=True, text=True, timeout=900,
                          cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_a_run_registers_its_arms_and_promotes_only_a_significant_winner(job: Job, tmp_path: Path) -> None:
    """register + promote_alias on digits, in the module job's store: resnet18 beats mobilenetv3_small_100 (one
    epoch: about 15 points; the module job's mobilenetv3_small_100, same seed and recipe, is reused) and becomes
    champion; an A/A of mobilenetv3_small_100 (both arms reused: no significant difference) leaves the alias;
    `compare` of the champion and version 1 reuses the evaluations that produced them."""
    import mlflow

    client, env = mlflow.MlflowClient(job.uri), job.env
    gate = ["--register", "digits-clf", "--promote_alias", "champion", "--epochs", "1", "--seed", "7",
            "--n_resamples", "1000"]
    proc = _lab(env, tmp_path, "run", "--a", "mobilenetv3_small_100", "--b", "resnet18", *gate, "--experiment", "win")
    assert proc.stderr.count("reuses the predictions of run") == 1  # arm a: the module job's arm b
    [parent] = client.search_runs([client.get_experiment_by_name("win").experiment_id], "tags.`ab.role` = 'parent'")
    tags = parent.data.tags
    assert (tags["ab.verdict"], tags["ab.registered.a"], tags["ab.registered.b"]) == (
        "b_better", "digits-clf/1", "digits-clf/2")
    assert (tags["ab.promotion"], tags["ab.promotion_from"], tags["ab.promotion_to"]) == ("moved", "none", "2")
    assert str(client.get_model_version_by_alias("digits-clf", "champion").version) == "2"

    proc = _lab(env, tmp_path, "run", "--a", "mobilenetv3_small_100", "--b", "mobilenetv3_small_100", *gate,
                "--experiment", "same")
    assert proc.stderr.count("reuses the predictions of run") == 2
    [parent] = client.search_runs([client.get_experiment_by_name("same").experiment_id], "tags.`ab.role` = 'parent'")
    tags = parent.data.tags
    assert (tags["ab.verdict"], tags["ab.registered.b"]) == ("no_significant_difference", "digits-clf/1")
    assert (tags["ab.promotion"], tags["ab.promotion_from"], tags["ab.promotion_to"]) == ("kept", "2", "2")
    assert str(client.get_model_version_by_alias("digits-clf", "champion").version) == "2"
    assert len(client.search_model_versions("name = 'digits-clf'")) == 2  # at most one version per model

    proc = _lab(env, tmp_path, "compare", "--a", "models:/digits-clf@champion", "--b", "models:/digits-clf/1",
                "--experiment", "later", "--n_resamples", "1000", "--seed", "7")
    assert proc.stderr.count("reuses the predictions of run") == 2
    later = client.search_runs([client.get_experiment_by_name("later").experiment_id])
    assert [r.data.tags["ab.role"] for r in later] == ["parent"] and later[0].data.tags["ab.verdict"] == "a_better"
