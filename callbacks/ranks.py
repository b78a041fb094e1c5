"""GPUTelemetry under DDP: every rank measures its own test batches; rank 0 logs their aggregate.

The arm's throughput is the sum over ranks (they run at once, each on its own batches), its latency comes
from rank 0 (tag ``ab.latency_source=rank0``: a batch's latency is one device's, not an average of devices),
memory is the largest of any rank. ``telemetry/batches.parquet`` (and the ``batch_latency_ms`` series) stay rank
0's, whose batch_idx pair up with another arm's; ``telemetry/batches_ranks.parquet`` holds every rank's batches,
each row with its ``rank``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

SUMMED = ("throughput_img_per_s", "n_batches_measured")
MAXED = ("gpu_mem_peak_mb", "gpu_mem_reserved_peak_mb", "cpu_rss_peak_mb")


def aggregate_summaries(summaries: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """One arm's summary from its ranks' (rank 0 first): sums, maxima, the rest from rank 0, and each rank's
    throughput as ``throughput_img_per_s_rank<r>``."""
    if not summaries:
        raise ValueError("aggregate_summaries: no rank summaries given")
    out = dict(summaries[0])
    for key in SUMMED:
        if all(key in s for s in summaries):
            out[key] = float(sum(s[key] for s in summaries))
    for key in MAXED:
        if any(key in s for s in summaries):
            out[key] = float(max(s[key] for s in summaries if key in s))
    for r, s in enumerate(summaries):
        if "throughput_img_per_s" in s:
            out[f"throughput_img_per_s_rank{r}"] = float(s["throughput_img_per_s"])
    return out


def rank_tags(world: int) -> dict[str, str]:
    """What the aggregate summary means, for the reader of the run."""
    return {"ab.telemetry_ranks": str(world), "ab.latency_source": "rank0",
            "ab.throughput_source": "sum_over_ranks", "ab.memory_source": "max_over_ranks"}


def merge_batches(tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The ranks' per-batch tables as one, each row with its rank."""
    return pd.concat([t.assign(rank=r) for r, t in enumerate(tables)], ignore_index=True)


def gather(obj: Any, world: int) -> list[Any]:
    """Every rank's `obj`, in rank order (one collective: the ranks call it once, at the end of the test)."""
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def log_rank_batches(client: Any, run_id: str, table: pd.DataFrame, artifact_dir: str) -> None:
    """Every rank's per-batch table as one artifact beside rank 0's ``batches.parquet``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "batches_ranks.parquet")
        table.to_parquet(path, index=False)
        client.log_artifact(run_id, path, artifact_dir)
