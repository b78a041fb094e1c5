"""The parent run's job: fetch every arm's predictions, prove the arms comparable, run the statistics.

Predictions come through the MLflow artifacts API, so this works against any tracking URI (a local SQLite
store or a shared `mlflow server`). Before any statistics the comparability guard checks that every arm
scored the same test set: dataset fingerprint, sample ids and labels, class count and label map. A mismatch
stops with one line naming what differs and both values.

    from lab.compare import fetch_arms, analyse
    arms = fetch_arms(client, [run_id_a, run_id_b])
    summary = analyse(cfg, arms)
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lab import stats
from lab.config import Config

# Child tags that must agree across arms before any statistic means anything: what to call it, and the fix.
# The most specific first: a label map difference also changes the fingerprint, and should be named as such.
GUARDED_TAGS = (
    ("ab.num_classes", "number of classes", "the models were scored on datasets with different classes"),
    (
        "ab.label_map",
        "label map (class names and their order)",
        "the same class index means a different class in each arm; evaluate both on the same dataset",
    ),
)
FINGERPRINT_TAG = (
    "ab.dataset_fingerprint",
    "dataset fingerprint",
    "evaluate both models on the same dataset, split and seed",
)
TELEMETRY_KEYS = (
    "latency_ms_p50",
    "latency_ms_p90",
    "latency_ms_p99",
    "latency_ms_mean",
    "throughput_img_per_s",
    "gpu_mem_peak_mb",
    "gpu_mem_reserved_peak_mb",
    "cpu_rss_peak_mb",
    "gpu_util_pct_mean",
    "gpu_power_w_mean",
    "gpu_temp_c_max",
    "gpu_sm_clock_mhz_mean",
    "energy_j_per_img",
)


class ComparisonError(ValueError):
    """Arms that cannot be compared; the message names what differs and both values."""


@dataclass
class Arm:
    name: str
    run_id: str
    spec: str
    tags: dict[str, str]
    metrics: dict[str, float]
    predictions: pd.DataFrame
    batches: pd.DataFrame | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def fetch_arms(client, run_ids: list[str], names: list[str] | None = None) -> list[Arm]:
    """Download predictions (and telemetry, where logged) of finished child runs."""
    import mlflow

    arms = []
    for i, run_id in enumerate(run_ids):
        run = client.get_run(run_id)
        if run.info.status != "FINISHED":
            raise ComparisonError(f"run {run_id} is {run.info.status}, not FINISHED; compare finished evaluations")
        tags = run.data.tags
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path="predictions/predictions.parquet", dst_path=tmp
                )
            except Exception as err:
                raise ComparisonError(
                    f"run {run_id} has no predictions/predictions.parquet ({type(err).__name__}); "
                    "it is not an ablab evaluation"
                ) from None
            predictions = pd.read_parquet(path)
            batches = None
            try:
                batches = pd.read_parquet(
                    mlflow.artifacts.download_artifacts(
                        run_id=run_id, artifact_path="telemetry/batches.parquet", dst_path=tmp
                    )
                )
            except Exception:
                pass
        name = names[i] if names else tags.get("ab.arm", run_id[:8])
        arms.append(
            Arm(name, run_id, tags.get("ab.model", ""), dict(tags), dict(run.data.metrics), predictions, batches)
        )
    return arms


def check_comparable(arms: list[Arm]) -> None:
    """Refuse arms that did not score the same test set; there is no switch to compare anyway.

    Checked in order, each with one line naming both values: class count, label map, sample ids, labels,
    then the dataset fingerprint (which also covers the pixels).
    """
    base = arms[0]
    for arm in arms[1:]:
        for key, what, fix in GUARDED_TAGS:
            _check_tag(base, arm, key, what, fix)
        ids_a, ids_b = base.predictions["sample_id"].to_numpy(), arm.predictions["sample_id"].to_numpy()
        if len(ids_a) != len(ids_b) or not np.array_equal(np.sort(ids_a), np.sort(ids_b)):
            raise ComparisonError(
                f"sample ids differ: {base.name} has {len(ids_a)} samples, {arm.name} has "
                f"{len(ids_b)} ({len(np.setxor1d(ids_a, ids_b))} ids in only one)"
            )
        la = base.predictions.set_index("sample_id")["label"]
        lb = arm.predictions.set_index("sample_id")["label"].reindex(la.index)
        bad = int((la.to_numpy() != lb.to_numpy()).sum())
        if bad:
            first = la.index[la.to_numpy() != lb.to_numpy()][0]
            raise ComparisonError(
                f"labels differ on {bad} samples between {base.name} and {arm.name} (sample "
                f"{first}: {base.name} has {la[first]}, {arm.name} has {lb[first]}); "
                "the arms did not score the same ground truth"
            )
        _check_tag(base, arm, *FINGERPRINT_TAG)


def _check_tag(base: Arm, arm: Arm, key: str, what: str, fix: str) -> None:
    va, vb = base.tags.get(key, "<missing>"), arm.tags.get(key, "<missing>")
    if va != vb:
        raise ComparisonError(
            f"{what} differs: {base.name} (run {base.run_id[:8]}) has {va}, {arm.name} "
            f"(run {arm.run_id[:8]}) has {vb}; {fix}"
        )


def align(arms: list[Arm]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample ids, labels, n x k correctness) with every arm's rows in sample_id order."""
    frames = [a.predictions.sort_values("sample_id", kind="stable").reset_index(drop=True) for a in arms]
    ids, labels = frames[0]["sample_id"].to_numpy(), frames[0]["label"].to_numpy()
    correct = np.stack([(f["pred"].to_numpy() == labels) for f in frames], axis=1)
    for a, f in zip(arms, frames, strict=True):
        a.predictions = f
    return ids, labels, correct


def latency_comparison(cfg: Config, arms: list[Arm], placement: str, seed: int) -> dict[str, Any]:
    """Paired per-batch latency difference when the arms measured the same batches on comparable devices."""
    devices = {a.tags.get("ab.device", "unknown") for a in arms}
    parents = {a.tags.get("mlflow.parentRunId", a.run_id) for a in arms}
    note = ""
    if len(parents) > 1:  # reused or compared runs: measured at other times, perhaps on other machines
        note = "arms were measured in different jobs: latencies are not comparable"
    elif len(devices) > 1:
        note = f"arms ran on different devices ({' vs '.join(sorted(devices))}): latencies are not comparable"
    elif placement == "parallel" and next(iter(devices)).startswith("cpu"):
        note = "arms ran at the same time on one shared CPU: latencies are not comparable"
    elif placement == "sequential":
        note = "arms ran one after the other: clocks and temperature may have differed between them"
    comparable = not note or placement == "sequential"
    out: dict[str, Any] = {
        "placement": placement,
        "devices": sorted(devices),
        "comparable": comparable,
        "note": note or f"arms measured the same batches ({placement})",
        "paired": None,
    }
    base = arms[0].batches
    if comparable and base is not None and len(arms) == 2 and arms[1].batches is not None:
        xa = base.loc[~base["warmup"], "latency_ms"].to_numpy()
        xb = arms[1].batches.loc[~arms[1].batches["warmup"], "latency_ms"].to_numpy()
        if len(xa) == len(xb) and len(xa) >= 2:
            ci = stats.paired_mean_diff_ci(xa, xb, n_resamples=cfg.n_resamples, confidence=1 - cfg.alpha, seed=seed)
            out["paired"] = {
                "estimate_ms": ci.estimate,
                "low_ms": ci.low,
                "high_ms": ci.high,
                "confidence": ci.confidence,
                "n_batches": len(xa),
            }
        else:
            out["note"] += f"; batch counts differ ({len(xa)} vs {len(xb)}), so no paired interval"
    return out


def _label(arm: Arm) -> str:
    return f"{arm.spec} ({arm.name})" if arm.spec and arm.spec != arm.name else arm.name


def _pair_key(a: str, b: str) -> str:
    return f"{b}_vs_{a}"


def analyse(cfg: Config, arms: list[Arm], class_names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Every number the report shows, as one JSON-able summary (report.py only renders it)."""
    check_comparable(arms)
    ids, labels, correct = align(arms)
    n, k = correct.shape
    names = [a.name for a in arms]
    num_classes = int(arms[0].tags.get("ab.num_classes", labels.max() + 1))
    class_names = class_names or tuple(str(c) for c in range(num_classes))
    margin = 0.0 if cfg.rule == "superiority" else cfg.margin

    arm_rows = []
    for j, arm in enumerate(arms):
        w = stats.wilson_ci(int(correct[:, j].sum()), n, 1 - cfg.alpha)
        conf = arm.predictions["confidence"].to_numpy()
        cal = stats.calibration(conf, correct[:, j])
        preds = arm.predictions["pred"].to_numpy()
        confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        np.add.at(confusion, (labels, preds), 1)
        per_class = [
            float(correct[labels == c, j].mean()) if (labels == c).any() else float("nan") for c in range(num_classes)
        ]
        arm_rows.append(
            {
                "name": arm.name,
                "spec": arm.spec,
                "run_id": arm.run_id,
                "accuracy": w.estimate,
                "acc_low": w.low,
                "acc_high": w.high,
                "n_correct": int(correct[:, j].sum()),
                "confidence_mean": float(conf.mean()),
                "confidence_std": float(conf.std(ddof=1)) if n > 1 else 0.0,
                "ece": cal.ece,
                "calibration": {
                    "mean_confidence": list(cal.mean_confidence),
                    "accuracy": list(cal.accuracy),
                    "count": list(cal.count),
                    "bin_lower": list(cal.bin_lower),
                    "bin_upper": list(cal.bin_upper),
                },
                "per_class_accuracy": per_class,
                "confusion": confusion.tolist(),
                "preprocess": arm.tags.get("ab.preprocess", ""),
                "device": arm.tags.get("ab.device", ""),
                "precision": arm.tags.get("ab.precision", ""),
                "batch_size": arm.tags.get("ab.batch_size_final", ""),
                "reused_from": arm.extra.get("reused_from"),
                "telemetry": {key: arm.metrics[key] for key in TELEMETRY_KEYS if key in arm.metrics},
                "latencies_ms": (
                    arm.batches.loc[~arm.batches["warmup"], "latency_ms"].tolist() if arm.batches is not None else []
                ),
            }
        )

    # Every arm against the baseline (the first arm): rule-based decision, bootstrap CI, McNemar.
    pairs = []
    pairwise = stats.pairwise_mcnemar(correct, names, method=cfg.mcnemar_method, adjust="holm") if k > 2 else None
    adjusted = {(p.name_i, p.name_j): p.pvalue_adjusted for p in pairwise.pairs} if pairwise else {}
    for j in range(1, k):
        d = stats.decide(
            correct[:, 0],
            correct[:, j],
            rule=cfg.rule,
            margin=margin,
            alpha=cfg.alpha,
            n_resamples=cfg.n_resamples,
            seed=cfg.seed,
            method=cfg.mcnemar_method,
            names=(_label(arms[0]), _label(arms[j])),
        )
        ci = stats.paired_bootstrap_ci(
            correct[:, 0], correct[:, j], n_resamples=cfg.n_resamples, confidence=0.95, seed=cfg.seed
        )
        m = stats.mcnemar(correct[:, 0], correct[:, j], method=cfg.mcnemar_method)
        p_disc = (m.b + m.c) / n
        pcls = stats.per_class_mcnemar(correct[:, 0], correct[:, j], labels, method="exact", adjust="holm")
        pairs.append(
            {
                "a": names[0],
                "b": names[j],
                "key": _pair_key(names[0], names[j]),
                "acc_diff": ci.estimate,
                "ci_low": ci.low,
                "ci_high": ci.high,
                "ci_confidence": ci.confidence,
                "mcnemar_b": m.b,
                "mcnemar_c": m.c,
                "mcnemar_pvalue": m.pvalue,
                "mcnemar_statistic": m.statistic,
                "mcnemar_method": m.method,
                "pvalue_holm": adjusted.get((names[0], names[j])),
                "verdict": d.verdict,
                "sentence": d.explanation,
                "decision_low": d.low,
                "decision_high": d.high,
                "decision_confidence": d.confidence,
                "p_discordant": p_disc,
                "mde": stats.minimum_detectable_effect(n, p_disc, alpha=cfg.alpha) if p_disc > 0 else float("nan"),
                "per_class": [
                    {
                        "label": class_names[c.label] if c.label < len(class_names) else str(c.label),
                        "n": c.n,
                        "only_a": c.only_a,
                        "only_b": c.only_b,
                        "pvalue": c.pvalue,
                        "pvalue_adjusted": c.pvalue_adjusted,
                    }
                    for c in pcls.classes
                ],
                "flips_only_a": ids[correct[:, 0] & ~correct[:, j]].tolist(),
                "flips_only_b": ids[~correct[:, 0] & correct[:, j]].tolist(),
            }
        )

    summary: dict[str, Any] = {
        "dataset": arms[0].tags.get("ab.dataset", ""),
        "fingerprint": arms[0].tags.get("ab.dataset_fingerprint"),
        "n": n,
        "num_classes": num_classes,
        "class_names": list(class_names),
        "rule": cfg.rule,
        "margin": margin,
        "alpha": cfg.alpha,
        "mcnemar_method": cfg.mcnemar_method,
        "n_resamples": cfg.n_resamples,
        "arms": arm_rows,
        "pairs": pairs,
        "preprocess_differs": len({r["preprocess"] for r in arm_rows}) > 1,
        "precision_differs": len({r["precision"] for r in arm_rows}) > 1,
        "latency": latency_comparison(cfg, arms, arms[0].tags.get("ab.placement", "") or cfg.placement, cfg.seed),
    }
    if k > 2:
        q = stats.cochrans_q(correct)
        summary["cochran"] = {"statistic": q.statistic, "pvalue": q.pvalue, "df": q.df}
        summary["pairwise"] = [
            {
                "a": p.name_i,
                "b": p.name_j,
                "b_count": p.b,
                "c_count": p.c,
                "pvalue": p.pvalue,
                "pvalue_holm": p.pvalue_adjusted,
            }
            for p in pairwise.pairs
        ]
    summary["verdict"], summary["sentence"] = overall_verdict(summary)
    return summary


def overall_verdict(summary: dict[str, Any]) -> tuple[str, str]:
    """Two arms: the decision rule's verdict. More: Cochran's Q, then the Holm-corrected pairs."""
    pairs = summary["pairs"]
    if len(summary["arms"]) == 2:
        return pairs[0]["verdict"], pairs[0]["sentence"]
    q = summary["cochran"]
    alpha = summary["alpha"]
    if q["pvalue"] >= alpha:
        return "no_significant_difference", (
            f"No significant difference among the {len(summary['arms'])} arms: Cochran's Q = {q['statistic']:.2f}, "
            f"p = {q['pvalue']:.3g}, {summary['n']:,} test images."
        )
    best = max(summary["arms"], key=lambda r: r["accuracy"])
    beaten = [p for p in summary["pairwise"] if best["name"] in (p["a"], p["b"]) and p["pvalue_holm"] < alpha]
    if len(beaten) == len(summary["arms"]) - 1:
        return f"{best['name']}_best", (
            f"{best['name']} is the most accurate arm ({100 * best['accuracy']:.1f}%), significantly better than every "
            f"other after Holm correction; Cochran's Q p = {q['pvalue']:.3g}, {summary['n']:,} test images."
        )
    return "differences_found", (
        f"The arms differ (Cochran's Q p = {q['pvalue']:.3g}) but no single arm beats all others after Holm "
        f"correction; {best['name']} has the highest accuracy ({100 * best['accuracy']:.1f}%)."
    )


def gallery_images(cfg: Config, ids: list[int], limit: int = 8, fingerprint: str | None = None) -> list[np.ndarray]:
    """Raw pixels (uint8 HxWx3) of a few test samples, for the flips gallery; empty where unavailable or where
    the config's dataset is not the one the arms scored (`fingerprint`, e.g. a `compare` of old runs)."""
    from lab.data import resolve_dataset

    try:
        info = resolve_dataset(cfg)
    except Exception:
        return []
    if fingerprint is not None and info.fingerprint != fingerprint:
        return []
    position = {int(s): i for i, s in enumerate(info.test.sample_ids)}
    out = []
    for sid in ids[:limit]:
        i = position.get(int(sid))
        if i is None:
            continue
        if info.test.images is not None:
            out.append(np.asarray(info.test.images[i]))
        elif info.test.paths is not None:
            from PIL import Image

            out.append(np.asarray(Image.open(info.test.paths[i]).convert("RGB")))
    return out


def parent_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Metric names for the parent: two-arm names stay short; A/B/n names carry the pair."""
    out: dict[str, float] = {}
    arms, pairs = summary["arms"], summary["pairs"]
    for row in arms:
        out[f"acc.{row['name']}"] = row["accuracy"]
    if len(arms) == 2:
        out |= {"acc_a": arms[0]["accuracy"], "acc_b": arms[1]["accuracy"]}
        p = pairs[0]
        out |= {
            "acc_diff": p["acc_diff"],
            "acc_diff_ci_low": p["ci_low"],
            "acc_diff_ci_high": p["ci_high"],
            "mcnemar_pvalue": p["mcnemar_pvalue"],
            "mcnemar_b": p["mcnemar_b"],
            "mcnemar_c": p["mcnemar_c"],
            "mde": p["mde"],
            "decision_ci_low": p["decision_low"],
            "decision_ci_high": p["decision_high"],
        }
    for p in pairs:
        key = p["key"]
        out |= {
            f"acc_diff.{key}": p["acc_diff"],
            f"acc_diff_ci_low.{key}": p["ci_low"],
            f"acc_diff_ci_high.{key}": p["ci_high"],
            f"mcnemar_pvalue.{key}": p["mcnemar_pvalue"],
        }
        if p["pvalue_holm"] is not None:
            out[f"mcnemar_pvalue_holm.{key}"] = p["pvalue_holm"]
    if "cochran" in summary:
        out |= {"cochran_q": summary["cochran"]["statistic"], "cochran_pvalue": summary["cochran"]["pvalue"]}
    lat = summary["latency"].get("paired")
    if lat:
        out |= {
            "latency_diff_ms": lat["estimate_ms"],
            "latency_diff_ms_ci_low": lat["low_ms"],
            "latency_diff_ms_ci_high": lat["high_ms"],
        }
    return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}


def log_comparison(client, parent_run_id: str, cfg: Config, summary: dict[str, Any], out_dir: Path) -> None:
    """Metrics in one batch, verdict tags, and the rendered report under `comparison/`."""
    import json
    import time

    from mlflow.entities import Metric, RunTag

    from lab.report import render

    render(summary, out_dir, gallery=lambda ids: gallery_images(cfg, ids, fingerprint=summary["fingerprint"]))
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in parent_metrics(summary).items()]
    tags = [
        RunTag("ab.role", "parent"),
        RunTag("ab.verdict", summary["verdict"]),
        RunTag("ab.verdict_sentence", summary["sentence"][:5000]),
        RunTag("ab.dataset_fingerprint", str(summary["fingerprint"])),
        RunTag("ab.preprocess_differs", str(summary["preprocess_differs"]).lower()),
        RunTag("ab.latency_comparable", str(summary["latency"]["comparable"]).lower()),
        RunTag("mlflow.note.content", f"**{summary['sentence']}**\n\nSee artifacts: comparison/report.html"),
    ]
    tags += (
        [RunTag(f"ab.verdict.{p['key']}", p["verdict"]) for p in summary["pairs"]] if len(summary["pairs"]) > 1 else []
    )
    tags += [RunTag(f"ab.child.{a['name']}", a["run_id"]) for a in summary["arms"]]
    for start in range(0, len(metrics), 1000):
        client.log_batch(parent_run_id, metrics=metrics[start : start + 1000], tags=tags if start == 0 else [])
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    client.log_artifacts(parent_run_id, str(out_dir), "comparison")
