"""Compact per-sample correctness: one bit per test sample, in sample_id order, so that ranking every evaluation
of a test set (lab/leaderboard.py) reads a few hundred bytes per run instead of its predictions file.

An arm writes `predictions/correct.json` next to `predictions/predictions.parquet` (lab/arm.py `log_results`):

    {"format": "ablab.correct/1", "n": 360, "test_set": "sha256:...", "bits": "<base64 of numpy.packbits>"}

`test_set` digests the sample ids and labels, so that two evaluations prove they scored the same samples with
the same ground truth without either predictions file. `fetch` reads many runs at once (threads) and caches
each under its run id: a finished run's artifacts never change. Runs logged before this file existed fall back
to their predictions.parquet; the bits derived from it are cached the same way.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pandas as pd

from lab.lifecycle import PREDICTIONS

ARTIFACT = "predictions/correct.json"
FORMAT = "ablab.correct/1"
WORKERS = 8  # concurrent artifact reads: a shared server answers each in one round trip, a local store in ~2 ms


@dataclass(frozen=True)
class Correctness:
    """Whether an evaluation got each test sample right (`correct`, bool, in sample_id order) and the digest of
    the samples it scored (`test_set`, over sample ids and labels)."""

    correct: np.ndarray
    test_set: str

    def to_json(self) -> str:
        bits = base64.b64encode(np.packbits(self.correct.astype(bool)).tobytes()).decode("ascii")
        return json.dumps({"format": FORMAT, "n": int(self.correct.size), "test_set": self.test_set, "bits": bits})


def from_predictions(frame: pd.DataFrame) -> Correctness:
    """The bits of a predictions frame (sample_id, label, pred), rows put in sample_id order as `align` does."""
    frame = frame.sort_values("sample_id", kind="stable")
    ids, labels = frame["sample_id"].to_numpy(np.int64), frame["label"].to_numpy(np.int64)
    return Correctness(frame["pred"].to_numpy() == labels, samples_digest(ids, labels))


def samples_digest(ids: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of the sample ids then the labels (int64, little-endian), in sample_id order."""
    digest = hashlib.sha256(np.ascontiguousarray(ids, "<i8").tobytes())
    digest.update(np.ascontiguousarray(labels, "<i8").tobytes())
    return "sha256:" + digest.hexdigest()


def from_json(text: str) -> Correctness:
    """Parse `Correctness.to_json`; a file of another format or length raises ValueError."""
    record = json.loads(text)
    if record.get("format") != FORMAT:
        raise ValueError(f"{ARTIFACT}: format {record.get('format')!r}, expected {FORMAT!r}")
    n = int(record["n"])
    packed = np.frombuffer(base64.b64decode(record["bits"]), dtype=np.uint8)
    if packed.size != (n + 7) // 8:
        raise ValueError(f"{ARTIFACT}: {packed.size} bytes of bits for n={n}")
    return Correctness(np.unpackbits(packed, count=n).astype(bool), str(record["test_set"]))


def write(frame: pd.DataFrame, folder: Path) -> Path:
    """Write correct.json for a predictions frame into `folder` (the arm logs it under predictions/)."""
    path = Path(folder) / Path(ARTIFACT).name
    path.write_text(from_predictions(frame).to_json())
    return path


def default_cache_dir(data_dir: str) -> Path:
    """Where derived bits are kept between commands: next to the dataset cache (config key data_dir)."""
    return Path(data_dir).expanduser() / "history"


def fetch(runs: Sequence, cache_dir: Path | None, workers: int = WORKERS,
          in_place: bool = True) -> dict[str, Correctness | None]:
    """run id -> its correctness, None where the run has neither correct.json nor predictions.parquet.

    `runs` are MLflow Run objects from a search (their `info.artifact_uri` saves a `get_run` each). Read
    concurrently; cached in `cache_dir` (None: no cache) by run id, only for FINISHED runs. Artifacts that are
    local files are read in place (`in_place=False`: through MLflow's download API, as for a server).
    """
    def one(run) -> Correctness | None:
        cached = cache_dir / f"{run.info.run_id}.json" if cache_dir is not None else None
        if cached is not None and cached.exists():
            try:
                return from_json(cached.read_text())
            except (ValueError, KeyError, OSError):  # a torn or foreign file: read the run again
                pass
        found = _download(run.info.artifact_uri, in_place)
        if found is not None and cached is not None and run.info.status == "FINISHED":
            _write_atomic(cached, found.to_json())
        return found

    if not runs:
        return {}
    with ThreadPoolExecutor(max_workers=min(workers, len(runs)), thread_name_prefix="ablab-correct") as pool:
        return dict(zip((r.info.run_id for r in runs), pool.map(one, runs), strict=True))


def _download(artifact_uri: str, in_place: bool) -> Correctness | None:
    import mlflow

    local = _local_folder(artifact_uri) if in_place else None
    if local is not None:  # a store on this machine: read in place, no copy (~10x faster than the download)
        if (local / ARTIFACT).is_file():
            return from_json((local / ARTIFACT).read_text())
        if (local / PREDICTIONS).is_file():
            return from_predictions(pd.read_parquet(local / PREDICTIONS, columns=["sample_id", "label", "pred"]))
        return None
    with tempfile.TemporaryDirectory(prefix="ablab-correct-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"{artifact_uri}/{ARTIFACT}", dst_path=tmp)
            return from_json(Path(local).read_text())
        except Exception:  # a run older than correct.json (a server says so with any of several errors)
            pass
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"{artifact_uri}/{PREDICTIONS}", dst_path=tmp)
        except Exception as err:  # no predictions at all is an answer; an unreachable server is not
            if _missing(err):
                return None
            raise
        return from_predictions(pd.read_parquet(local, columns=["sample_id", "label", "pred"]))


def _missing(err: Exception) -> bool:
    """Whether a failed download says the file is not there (local store, or a server's 404)."""
    text = str(err)
    return (getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" or isinstance(err, FileNotFoundError)
            or "404" in text or "No such" in text or "does not exist" in text)


def _local_folder(artifact_uri: str) -> Path | None:
    """The folder of a run's artifacts where they are plain local files (`file:` URI or a path), else None."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(url2pathname(parsed.path))
    return Path(artifact_uri) if parsed.scheme == "" else None


def _write_atomic(path: Path, text: str) -> None:
    """Write then rename, so that a concurrent reader sees the whole file or none (two leaderboards at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.replace(tmp, path)
