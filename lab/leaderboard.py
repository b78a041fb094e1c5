"""`python -m lab leaderboard`: every FINISHED evaluation of one test set (one dataset fingerprint), from every
experiment you can read, ranked: accuracy with its Wilson interval, latency and memory, and whether each is
significantly worse than the best (paired McNemar on the per-sample predictions, Holm-corrected over the
comparisons with the best). Logged as an MLflow table (leaderboard.json) in a new run, and printed.
Per-sample correctness comes from each run's packed bits (lab/correctness.py: one search for every run's tags
and metrics, then small artifacts read concurrently and cached by run id), so 1,000 evaluations rank in seconds.

    python -m lab leaderboard --fingerprint sha256:...        # a child run's tag ab.dataset_fingerprint
    python -m lab leaderboard --data digits --seed 0          # or computed from the data keys, as `run` would
"""

from __future__ import annotations

import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient

from lab import correctness, lifecycle, runs, stats
from lab.compare import GUARDED_TAGS, Arm, ComparisonError, align, check_comparable, fetch_arms
from lab.config import Config, unique_names

FINGERPRINT = re.compile(r"sha256:[0-9a-f]{8,64}")

COLUMNS = ("rank", "model", "accuracy", "acc_low", "acc_high", "n", "pvalue_vs_best", "pvalue_holm",
           "worse_than_best", "latency_ms_p50", "latency_ms_p99", "throughput_img_per_s", "peak_mem_mb", "device",
           "precision", "preprocess", "identity", "experiment", "epochs", "run_id")


def leaderboard_table(arms: list[Arm], context: dict[str, dict[str, Any]] | None = None, alpha: float = 0.05,
                      method: str = "exact") -> pd.DataFrame:
    """One row per evaluation, best first; `context` adds columns per run id (experiment name, epochs).

    The arms' predictions are guarded (`check_comparable`) and aligned, then ranked by `rank`.
    """
    if not arms:
        raise ValueError("leaderboard needs at least one evaluation; got none")
    if len(arms) > 1:
        check_comparable(arms)  # one fingerprint should imply it; the guard proves it on the predictions
    _, _, correct = align(arms)
    columns = [describe(a.run_id, a.spec or a.name, a.tags, a.metrics) | (context or {}).get(a.run_id, {})
               for a in arms]
    return rank(correct, columns, alpha, method)


def describe(run_id: str, model: str, tags: dict[str, str], metrics: dict[str, float]) -> dict[str, Any]:
    """The columns of one evaluation that need no statistics: what it was, where it ran, latency and memory."""
    return {"model": model, "latency_ms_p50": metrics.get("latency_ms_p50"),
            "latency_ms_p99": metrics.get("latency_ms_p99"),
            "throughput_img_per_s": metrics.get("throughput_img_per_s"),
            "peak_mem_mb": metrics.get("gpu_mem_peak_mb", metrics.get("cpu_rss_peak_mb")),
            "device": tags.get("ab.device", ""), "precision": tags.get("ab.precision", ""),
            "preprocess": tags.get("ab.preprocess", ""), "identity": tags.get("ab.model_identity", ""),
            "experiment": "", "epochs": "", "run_id": run_id}


def rank(correct: np.ndarray, columns: list[dict[str, Any]], alpha: float = 0.05,
         method: str = "exact") -> pd.DataFrame:
    """The table from an (n, k) correctness matrix (samples in one order for every column) and k `describe` dicts.

    The best evaluation (highest accuracy; the first listed among ties) is tested against every other with
    McNemar `method` (`stats.mcnemar_counts`, vectorised over the k - 1 pairs); the p-values are Holm-adjusted
    (`stats.adjust_pvalues`, checked against statsmodels), and `worse_than_best` is adjusted p < `alpha`.
    """
    n, k = correct.shape
    if k == 0:
        raise ValueError("leaderboard needs at least one evaluation; got none")
    accuracy = correct.mean(axis=0)
    best = int(np.argmax(accuracy))
    others = [j for j in range(k) if j != best]
    raw, holm = np.full(k, np.nan), np.full(k, np.nan)
    if others:
        top, rest = correct[:, best, None], correct[:, others]
        discordant_b, discordant_c = np.count_nonzero(top & ~rest, axis=0), np.count_nonzero(~top & rest, axis=0)
        raw[others] = stats.mcnemar_counts(discordant_b, discordant_c, method)[1]
        holm[others] = stats.adjust_pvalues(raw[others], "holm")
    rows = []
    for j, described in enumerate(columns):
        w = stats.wilson_ci(int(correct[:, j].sum()), n, 1 - alpha)
        rows.append({
            **described, "accuracy": w.estimate, "acc_low": w.low, "acc_high": w.high, "n": n,
            "pvalue_vs_best": None if j == best else float(raw[j]),
            "pvalue_holm": None if j == best else float(holm[j]),
            "worse_than_best": bool(j != best and holm[j] < alpha), "_best": j == best,
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
        table = evaluations_table(cfg, fingerprint)
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


def evaluations_table(cfg: Config, fingerprint: str) -> pd.DataFrame:
    """The table of every FINISHED child run on `fingerprint`, in every experiment this user can read."""
    client = MlflowClient()
    found, bits = finished_evaluations(client, fingerprint, correctness.default_cache_dir(cfg.data_dir))
    if not found:
        raise ValueError(f"no FINISHED ablab evaluation on dataset fingerprint {fingerprint} in any "
                         "experiment you can read")
    names = unique_names([r.info.run_id[:8] for r in found])
    experiment_names = {eid: client.get_experiment(eid).name for eid in {r.info.experiment_id for r in found}}
    columns = [describe(r.info.run_id, r.data.tags.get("ab.model") or name, r.data.tags, r.data.metrics)
               | {"experiment": experiment_names[r.info.experiment_id], "epochs": r.data.params.get("epochs", "")}
               for r, name in zip(found, names, strict=True)]
    correct = np.stack([bits[r.info.run_id].correct for r in found], axis=1)
    return rank(correct, columns, alpha=cfg.alpha, method=cfg.mcnemar_method)


def finished_evaluations(client, fingerprint: str, cache_dir=None,
                         one_per_model: bool = False) -> tuple[list, dict[str, correctness.Correctness]]:
    """Every FINISHED child run on `fingerprint` (newest first; none is an answer; with `one_per_model`, the newest
    of each model identity) and, by run id, its per-sample correctness, checked to be one test set. One paged
    search gives every run's tags and metrics; the bits come from `lab.correctness.fetch` (concurrent, cached by
    run id in `cache_dir`), never a predictions file."""
    experiments = runs.readable_experiment_ids(client)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ablab-stale") as pool:
        stale = pool.submit(lifecycle.stale_note, client, experiments, fingerprint)  # its own search, alongside
        found = runs.search_children(client, f"tags.`ab.dataset_fingerprint` = '{fingerprint}'", experiments)
        if one_per_model:  # `found` is newest first: the first run of each identity is its newest
            newest: dict[str, object] = {}
            for r in found:
                newest.setdefault(r.data.tags.get("ab.model_identity", r.info.run_id), r)
            found = list(newest.values())
        bits = correctness.fetch(found, cache_dir)
        note = stale.result()
    if lost := next((r for r in found if bits[r.info.run_id] is None and lifecycle.is_complete(r)), None):
        raise ComparisonError(f"run {lost.info.run_id} has no {lifecycle.PREDICTIONS}; it is not an ablab evaluation")
    # A run ended FINISHED by an older ablab before its predictions existed (killed in test) cannot be ranked.
    found = [r for r in found if bits[r.info.run_id] is not None]
    if note:
        print(note, file=sys.stderr)
    if found:
        _check_one_test_set(client, found, unique_names([r.info.run_id[:8] for r in found]), bits)
    return found, bits


def _check_one_test_set(client, found: list, names: list[str], bits: dict[str, correctness.Correctness]) -> None:
    """`compare`'s guard (classes, label map, sample ids and labels) on the tags and the bits' sample digest.
    Where a run differs from the first, both predictions files are fetched so that the refusal says what."""
    def scored(run) -> tuple[str, ...]:
        tags = run.data.tags
        return (*(tags.get(key, "<missing>") for key, _, _ in GUARDED_TAGS), bits[run.info.run_id].test_set)

    base = scored(found[0])
    odd = next((j for j in range(1, len(found)) if scored(found[j]) != base), None)
    if odd is None:
        return
    pair = [found[0].info.run_id, found[odd].info.run_id]
    check_comparable(fetch_arms(client, pair, [names[0], names[odd]]))  # raises, naming the difference
    raise ComparisonError(f"runs {pair[0]} and {pair[1]} scored different samples (digest "
                          f"{base[-1][:15]}… vs {scored(found[odd])[-1][:15]}…): evaluate both on the same dataset, "
                          "split and seed")
