"""`python -m lab leaderboard`: every FINISHED evaluation of one test set (one dataset fingerprint), from every
experiment you can read, ranked: accuracy with its Wilson interval, latency and memory, and whether each is
significantly worse than the best (paired McNemar on the per-sample predictions, Holm-corrected over the
comparisons with the best). Logged as an MLflow table (leaderboard.json) in a new run, and printed.

    python -m lab leaderboard --fingerprint sha256:...        # a child run's tag ab.dataset_fingerprint
    python -m lab leaderboard --data digits --seed 0          # or computed from the data keys, as `run` would
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient

from lab import lifecycle, runs, stats
from lab.compare import Arm, align, check_comparable, fetch_arms
from lab.config import Config, unique_names

FINGERPRINT = re.compile(r"sha256:[0-9a-f]{8,64}")

COLUMNS = ("rank", "model", "accuracy", "acc_low", "acc_high", "n", "pvalue_vs_best", "pvalue_holm",
           "worse_than_best", "latency_ms_p50", "latency_ms_p99", "throughput_img_per_s", "peak_mem_mb", "device",
           "precision", "preprocess", "identity", "experiment", "epochs", "run_id")


def leaderboard_table(arms: list[Arm], context: dict[str, dict[str, Any]] | None = None, alpha: float = 0.05,
                      method: str = "exact") -> pd.DataFrame:
    """One row per evaluation, best first; `context` adds columns per run id (experiment name, epochs).

    The best arm (highest accuracy; the first listed among ties) is tested against every other with McNemar
    `method`; the k - 1 p-values are Holm-adjusted (`stats.adjust_pvalues`, checked against statsmodels), and
    `worse_than_best` is adjusted p < `alpha`.
    """
    if not arms:
        raise ValueError("leaderboard needs at least one evaluation; got none")
    if len(arms) > 1:
        check_comparable(arms)  # one fingerprint should imply it; the guard proves it on the predictions
    _, _, correct = align(arms)
    n, k = correct.shape
    accuracy = correct.mean(axis=0)
    best = int(np.argmax(accuracy))
    others = [j for j in range(k) if j != best]
    raw, holm = np.full(k, np.nan), np.full(k, np.nan)
    if others:
        raw[others] = [stats.mcnemar(correct[:, best], correct[:, j], method=method).pvalue for j in others]
        holm[others] = stats.adjust_pvalues(raw[others], "holm")
    rows = []
    for j, arm in enumerate(arms):
        w = stats.wilson_ci(int(correct[:, j].sum()), n, 1 - alpha)
        t = arm.metrics
        rows.append({
            "model": arm.spec or arm.name, "accuracy": w.estimate, "acc_low": w.low, "acc_high": w.high, "n": n,
            "pvalue_vs_best": None if j == best else float(raw[j]),
            "pvalue_holm": None if j == best else float(holm[j]),
            "worse_than_best": bool(j != best and holm[j] < alpha),
            "latency_ms_p50": t.get("latency_ms_p50"), "latency_ms_p99": t.get("latency_ms_p99"),
            "throughput_img_per_s": t.get("throughput_img_per_s"),
            "peak_mem_mb": t.get("gpu_mem_peak_mb", t.get("cpu_rss_peak_mb")),
            "device": arm.tags.get("ab.device", ""), "precision": arm.tags.get("ab.precision", ""),
            "preprocess": arm.tags.get("ab.preprocess", ""), "identity": arm.tags.get("ab.model_identity", ""),
            "experiment": "", "epochs": "", "run_id": arm.run_id, **(context or {}).get(arm.run_id, {}),
            "_best": j == best,
        })
    table = pd.DataFrame(rows).sort_values(["_best", "accuracy"], ascending=False, kind="stable")
    table.insert(0, "rank", np.arange(1, k + 1))
    return table.drop(columns="_best").reset_index(drop=True)[list(COLUMNS)]


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return fmt.format(value)


def format_table(table: pd.DataFrame) -> str:
    """The leaderboard as fixed-width text for the terminal."""
    head = ["#", "model", "accuracy", "Wilson CI", "Holm p vs best", "worse", "p50 ms", "peak MB", "device",
            "experiment", "run"]
    rows = [[str(r["rank"]), str(r["model"]), _cell(100 * r["accuracy"], "{:.2f}%"),
             f"{100 * r['acc_low']:.1f}-{100 * r['acc_high']:.1f}%",
             "best" if r["rank"] == 1 else _cell(r["pvalue_holm"], "{:.3g}"),
             "yes" if r["worse_than_best"] else "no", _cell(r["latency_ms_p50"], "{:.2f}"),
             _cell(r["peak_mem_mb"], "{:.0f}"), str(r["device"]), str(r["experiment"]), str(r["run_id"])]
            for r in table.to_dict("records")]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def leaderboard(cfg: Config, fingerprint: str = "") -> pd.DataFrame:
    """`python -m lab leaderboard`: every FINISHED evaluation on one test set, ranked, logged as a table."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per fetched run is noise
    with runs.reading_runs():
        if fingerprint and not FINGERPRINT.fullmatch(fingerprint):
            raise ValueError(f"fingerprint: {fingerprint!r} is not a dataset fingerprint (sha256:<32 hex digits>, "
                             "tag ab.dataset_fingerprint of a child run)")
        fingerprint = fingerprint or _fingerprint_of(cfg)
        table = _rank(cfg, fingerprint)
    with runs.parent_run(cfg.experiment, f"leaderboard {fingerprint.removeprefix('sha256:')[:12]}") as run:
        mlflow.set_tags({"ab.role": "leaderboard", "ab.dataset_fingerprint": fingerprint,
                         "ab.leaderboard_best": table.iloc[0]["model"], "ab.leaderboard_size": str(len(table))})
        # Prefixed as in `run`: `mlflow run -e leaderboard` has already logged the raw -P values (fingerprint "").
        mlflow.log_params({"config.fingerprint": fingerprint, "config.alpha": cfg.alpha,
                           "config.mcnemar_method": cfg.mcnemar_method})
        mlflow.log_table(table, "leaderboard.json")
        text = format_table(table)
        mlflow.log_text(text + "\n", "leaderboard.txt")
    print(text)
    print(f"ablab: {len(table)} evaluations on {fingerprint}; table leaderboard.json in run {run.info.run_id}",
          file=sys.stderr)
    return table


def _fingerprint_of(cfg: Config) -> str:
    """The fingerprint of the test set the config's data keys give, as `run` would compute it."""
    from lab.data import resolve_dataset  # torch: only when no --fingerprint is given

    return resolve_dataset(cfg).fingerprint


def _rank(cfg: Config, fingerprint: str) -> pd.DataFrame:
    """The table of every FINISHED child run on `fingerprint`, in every experiment this user can read."""
    client = MlflowClient()
    found = runs.search_children(client, f"tags.`ab.dataset_fingerprint` = '{fingerprint}'")
    # A run ended FINISHED by an older ablab before its predictions existed (killed in test) cannot be ranked.
    found = [r for r in found if lifecycle.is_complete(r) or lifecycle.has_predictions(client, r.info.run_id)]
    if note := lifecycle.stale_note(client, runs.readable_experiment_ids(client)):
        print(note, file=sys.stderr)
    if not found:
        raise ValueError(f"no FINISHED ablab evaluation on dataset fingerprint {fingerprint} in any "
                         "experiment you can read")
    arms = fetch_arms(client, [r.info.run_id for r in found], unique_names([r.info.run_id[:8] for r in found]))
    experiments = {eid: client.get_experiment(eid).name for eid in {r.info.experiment_id for r in found}}
    context = {r.info.run_id: {"experiment": experiments[r.info.experiment_id],
                               "epochs": r.data.params.get("epochs", "")} for r in found}
    return leaderboard_table(arms, context, alpha=cfg.alpha, method=cfg.mcnemar_method)
