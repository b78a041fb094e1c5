"""Latency of the arms: whether it is comparable (the flag and the note agree), p50/p99 with bootstrap intervals,
and for two comparable arms the paired differences over the batches both measured, matched by batch_idx.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from lab import stats
from lab.compare.arms import Arm
from lab.config import Config

LATENCY_QUANTILES = (0.5, 0.99)


def _device(arm: Arm) -> tuple[str, str]:
    """The device an arm measured on: its name, and the GPU's UUID where recorded (two cards of one model)."""
    return arm.tags.get("ab.device", "unknown"), arm.tags.get("ab.gpu_uuid", "none")


def latency_verdict(arms: list[Arm], placement: str) -> tuple[bool, str]:
    """(comparable, note): only lockstep, or sequential on the same device in the same job, gives comparable
    latencies; the note always says which, and why."""
    parents = {a.tags.get("mlflow.parentRunId", a.run_id) for a in arms}
    names = sorted({a.tags.get("ab.device", "unknown") for a in arms})
    if len(parents) > 1:  # reused or compared runs: measured at other times, perhaps on other machines
        return False, "arms were measured in different jobs: latencies are not comparable"
    if len({_device(a) for a in arms}) > 1:
        shown = " vs ".join(names) if len(names) > 1 else f"{names[0]}, different units"
        return False, f"arms ran on different devices ({shown}): latencies are not comparable"
    if placement == "lockstep":
        return True, "arms took turns on the same batches on one device (lockstep): latencies are comparable"
    if placement == "sequential":
        return True, ("arms ran one after the other on the same device in this job: latencies are comparable, "
                      "though clocks and temperature may have drifted between them")
    if placement == "parallel":
        return False, "arms ran at the same time on one device and competed for it: latencies are not comparable"
    if placement == "ray":
        return False, "arms ran as Ray tasks, at the same time or on different nodes: latencies are not comparable"
    return False, f"placement {placement or 'unknown'}: latencies are not comparable"


def paired_batches(a: pd.DataFrame, b: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Measured (non-warm-up) batches of both arms joined on batch_idx; a note when sizes or counts differ."""
    keys = [k for k in ("dataloader_idx", "batch_idx") if k in a.columns and k in b.columns]
    cols = [*keys, "latency_ms", *(["batch_size"] if "batch_size" in a.columns and "batch_size" in b.columns else [])]
    joined = a.loc[~a["warmup"], cols].merge(b.loc[~b["warmup"], cols], on=keys, suffixes=("_a", "_b"))
    note = ""
    if "batch_size_a" in joined:
        differ = joined[joined["batch_size_a"] != joined["batch_size_b"]]
        if len(differ):
            row = differ.iloc[0]
            note = (f"batch sizes differ on {len(differ)} batches (batch {int(row['batch_idx'])}: "
                    f"{int(row['batch_size_a'])} vs {int(row['batch_size_b'])}): latencies are not comparable")
    unmatched = max((~a["warmup"]).sum(), (~b["warmup"]).sum()) - len(joined)
    if not note and unmatched:
        note = f"{unmatched} measured batches have no partner with the same batch_idx and are left out"
    return joined, note


def latency_comparison(cfg: Config, arms: list[Arm], placement: str, seed: int) -> dict[str, Any]:
    """Whether the arms' latencies are comparable (the flag and the note agree), p50/p99 with bootstrap intervals
    over batches for every arm, and for two comparable arms the paired differences over batches by batch_idx."""
    comparable, note = latency_verdict(arms, placement)
    level = {"n_resamples": cfg.n_resamples, "confidence": 1 - cfg.alpha, "seed": seed}
    quantiles = {}
    for arm in arms:
        measured = arm.batches.loc[~arm.batches["warmup"], "latency_ms"].to_numpy() if arm.batches is not None else []
        if len(measured) >= 2:
            quantiles[arm.name] = {f"p{round(100 * r.quantile)}": [r.estimate, r.low, r.high]
                                   for r in stats.quantile_ci(measured, None, LATENCY_QUANTILES, **level)}
    devices = sorted({a.tags.get("ab.device", "unknown") for a in arms})
    out: dict[str, Any] = {"placement": placement, "devices": devices, "comparable": comparable, "note": note,
                           "quantiles": quantiles, "paired": None}  # fmt: skip
    if not (comparable and len(arms) == 2 and all(a.batches is not None for a in arms)):
        return out
    joined, batch_note = paired_batches(arms[0].batches, arms[1].batches)
    if batch_note.startswith("batch sizes differ"):
        return out | {"comparable": False, "note": batch_note}
    out["note"] += f"; {batch_note}" if batch_note else ""
    if len(joined) < 2:
        both = f"{len(joined)} batch{'' if len(joined) == 1 else 'es'}"
        return out | {"note": out["note"] + f"; {both} measured by both, so no paired interval"}
    xa, xb = joined["latency_ms_a"].to_numpy(), joined["latency_ms_b"].to_numpy()
    ci = stats.paired_mean_diff_ci(xa, xb, **level)
    paired = {"estimate_ms": ci.estimate, "low_ms": ci.low, "high_ms": ci.high, "confidence": ci.confidence,
              "n_batches": len(xa)}  # fmt: skip
    for r in stats.quantile_ci(xa, xb, LATENCY_QUANTILES, **level):
        paired[f"p{round(100 * r.quantile)}_diff_ms"] = [r.diff, r.diff_low, r.diff_high]
    return out | {"paired": paired}
