"""Results kept on local disk until the tracking server has them, so that a lost server costs a wait or a
`resume`, never an evaluation.

An arm writes its predictions, metrics and telemetry to its spool folder first, then uploads them; while the
server is away its calls wait (up to `outage_window_s`, outage.Patient) and what its logger sends is kept
here. Past the window the job stops with one line naming the job's folder, and `python -m lab resume <dir>`
(experiment.resume) uploads what is kept, completes the children and finishes the parent.

    <data_dir>/spool/<parent run id>/parent.json         the job: tracking URI, experiment, parent run, config
    <data_dir>/spool/<parent run id>/arm<i>/spool.json   the arm's child run, the metrics/params/tags to log, state
    <data_dir>/spool/<parent run id>/arm<i>/files/       artifacts, laid out as under the run's artifact root

A job that ends with the server there (finished, failed or interrupted) removes its folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag

from lab import lifecycle, outage, runs
from lab.config import Config

PARENT, MANIFEST, FILES = "parent.json", "spool.json", "files"
SPOOL_TAG = "ab.spool"  # on the parent: its spool folder, for `doctor`
# An arm's state: "running" (no results yet), "results" (all written here, not yet uploaded), "uploaded".
RUNNING, RESULTS, UPLOADED = "running", "results", "uploaded"


def job_folder(cfg: Config, parent_run_id: str) -> Path:
    return Path(cfg.data_dir).expanduser() / "spool" / parent_run_id


def _write(path: Path, value: dict[str, Any]) -> None:
    """Whole or not at all: a process killed while writing leaves the previous manifest."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


class ArmSpool:
    """One arm's folder: what is still to be logged to its child run, and the artifacts to upload."""

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder, self.manifest = folder, manifest

    @classmethod
    def create(cls, folder: Path, run_id: str, index: int = 0, name: str = "") -> ArmSpool:
        (folder / FILES).mkdir(parents=True, exist_ok=True)
        box = cls(folder, {"run_id": run_id, "index": index, "arm": name, "state": RUNNING, "lost_since": None,
                           "metrics": [], "params": {}, "tags": {}})
        box.save()
        return box

    @classmethod
    def for_arm(cls, cfg: Config, parent_run_id: str, index: int, run_id: str) -> ArmSpool:
        return cls.create(job_folder(cfg, parent_run_id) / f"arm{index}", run_id, index, cfg.arm_names[index])

    @classmethod
    def read(cls, folder: Path) -> ArmSpool | None:
        try:
            return cls(folder, json.loads((folder / MANIFEST).read_text()))
        except (OSError, ValueError):
            return None

    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]

    @property
    def files(self) -> Path:
        return self.folder / FILES

    def save(self) -> None:
        _write(self.folder / MANIFEST, self.manifest)

    def add(self, metrics: Sequence[Metric] = (), params: Sequence[Param] = (), tags: Sequence[RunTag] = ()) -> None:
        """Keep metrics, params and tags for the upload (one manifest write)."""
        m = self.manifest
        m["metrics"] += [[x.key, x.value, x.timestamp, x.step] for x in metrics]
        m["params"].update({p.key: p.value for p in params})
        m["tags"].update({t.key: t.value for t in tags})
        self.save()

    def add_file(self, local_path: str, artifact_path: str | None = None) -> None:
        target = self.files / (artifact_path or "")
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(local_path, target / Path(local_path).name)

    def results_written(self) -> None:
        self.manifest["state"] = RESULTS
        self.save()

    def upload(self, client) -> None:
        """Everything kept, in few calls (log_batch takes 1000 values, at most 100 params and 100 tags), then the files;
        the manifest records each step, so that a second upload (`resume`) does only what is left."""
        if isinstance(client, HoldingClient):  # which would keep them here again while the server is away
            client = client.waiting
        m, run_id = self.manifest, self.run_id
        metrics = [Metric(*row) for row in m["metrics"]]
        params = [Param(k, v) for k, v in m["params"].items()]
        tags = [RunTag(k, v) for k, v in m["tags"].items()]
        for k in range(max(-(-len(metrics) // 800), -(-len(params) // 100), -(-len(tags) // 100))):
            client.log_batch(run_id, metrics=metrics[k * 800 : (k + 1) * 800], params=params[k * 100 : (k + 1) * 100],
                             tags=tags[k * 100 : (k + 1) * 100])
        m["metrics"], m["params"], m["tags"] = [], {}, {}
        self.save()
        if any(self.files.iterdir()):
            client.log_artifacts(run_id, str(self.files))
            shutil.rmtree(self.files)
            self.files.mkdir()
        if m["state"] == RESULTS:
            m["state"] = UPLOADED
        self.save()

    def mark_lost(self, since: float) -> None:
        self.manifest["lost_since"] = since
        self.save()

    def remove(self) -> None:
        """The folder, and the job's folder once it is empty (arms started without a launcher's parent.json)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        with suppress(OSError):
            self.folder.parent.rmdir()


@contextmanager
def temporary(run_id: str) -> Iterator[ArmSpool]:
    """A spool folder for one upload outside an arm process (benchmarks, tests), removed afterwards."""
    box = ArmSpool.create(Path(tempfile.mkdtemp(prefix="ablab-spool-")) / "arm0", run_id)
    try:
        yield box
    finally:
        box.remove()


class HoldingClient:
    """An arm's MlflowClient (and its logger's): while the tracking server is away, `log_batch` and `log_artifact`
    for the arm's run are kept in its spool and uploaded with the results, so that the test loop goes on; every
    other call waits for the server (outage.Patient)."""

    def __init__(self, box: ArmSpool, window_s: float) -> None:
        self.box, self._raw = box, MlflowClient()
        self.waiting = outage.patient(self._raw, window_s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.waiting, name)

    def _sent(self, run_id: str, call, *args: Any, **kwargs: Any) -> bool:
        """True once the server took the call; False when it is away (the caller keeps it here)."""
        if run_id != self.box.run_id:
            self.waiting.call(call, run_id, *args, **kwargs)
            return True
        if outage.outage_since() is None:
            started = time.time()
            try:
                call(run_id, *args, **kwargs)
                return True
            except Exception as err:
                if not outage.unreachable(err):
                    raise
                outage.mark_unreachable(started)
        return False

    def log_batch(self, run_id: str, metrics: Sequence[Metric] = (), params: Sequence[Param] = (),
                  tags: Sequence[RunTag] = (), **kwargs: Any) -> None:
        if not self._sent(run_id, self._raw.log_batch, metrics=metrics, params=params, tags=tags, **kwargs):
            self.box.add(metrics, params, tags)

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        if not self._sent(run_id, self._raw.log_artifact, local_path, artifact_path):
            self.box.add_file(local_path, artifact_path)


class JobSpooled(runs.RunFailed):
    """The tracking server stayed away past outage_window_s; the job's results are in its spool folder."""


def spooled_line(folder: Path, since: float, window_s: float) -> str:
    return (f"{outage.unreachable_line(since)}, longer than outage_window_s={window_s:g} s; results kept in "
            f"{folder}; once the server is back: python -m lab resume {folder}")


def arm_spools(folder: Path) -> list[ArmSpool]:
    return [box for sub in sorted(folder.glob("arm*")) if (box := ArmSpool.read(sub)) is not None]


def lost_since(folder: Path, err: BaseException) -> float | None:
    """When the job lost the server for good (an arm gave up, or the launcher's own call did); None if it did
    not (or was interrupted, which ends every run KILLED)."""
    if isinstance(err, KeyboardInterrupt) or (isinstance(err, runs.RunFailed) and err.interrupted):
        return None
    times = [box.manifest["lost_since"] for box in arm_spools(folder) if box.manifest.get("lost_since")]
    if isinstance(err, outage.ServerLost):
        times.append(err.since)
    elif outage.unreachable(err) or isinstance(err.__cause__, outage.ServerLost):
        times.append(outage.outage_since() or time.time())
    return min(times) if times else None


@contextmanager
def for_job(client, cfg: Config, run: Run, names: Sequence[str], run_name: str) -> Iterator[Path]:
    """The parent's spool folder for one job: written when the parent exists (what `resume` needs), removed when
    the job ends with the server there. A lost server ends the job with `JobSpooled`, whose line names the
    folder. Under `resume` (its parent.json says so) the folder is left to `resume`."""
    folder = job_folder(cfg, run.info.run_id)
    resuming = (job := read_manifest(folder)) is not None and job.get("resuming")
    if not resuming:
        folder.mkdir(parents=True, exist_ok=True)
        _write(folder / PARENT, {"tracking_uri": runs.tracking_uri(), "experiment_id": run.info.experiment_id,
                                 "parent_run_id": run.info.run_id, "names": list(names), "run_name": run_name,
                                 "config": cfg.to_yaml(), "window_s": cfg.outage_window_s})
        client.set_tag(run.info.run_id, SPOOL_TAG, str(folder))
    try:
        yield folder
    except BaseException as err:
        since = lost_since(folder, err)
        if since is None:
            if not resuming:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        outage.mark_unreachable(since, note=False)  # ending the parent is tried once, at once
        raise JobSpooled(spooled_line(folder, since, cfg.outage_window_s)) from err
    if not resuming:
        shutil.rmtree(folder, ignore_errors=True)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / PARENT).read_text())
    except (OSError, ValueError):
        return None


def read_job(folder: str) -> dict[str, Any]:
    """The job a spool folder holds, or a one-line ValueError (bad input)."""
    job = read_manifest(Path(folder).expanduser())
    if job is None:
        raise ValueError(f"resume: {folder} is not an ablab spool folder (no readable {PARENT}); give the folder "
                         "that the failed job's last line names")
    return job


def mark(folder: Path, **values: Any) -> None:
    job = read_job(str(folder))
    _write(Path(folder).expanduser() / PARENT, job | values)


def settle_arms(client, folder: Path, job: dict[str, Any]) -> tuple[dict[int, str], list[str]]:
    """After an outage: upload what each arm kept, verify and complete its child run; a child that cannot be
    completed ends FAILED with the reason. Returns the complete children (arm index -> run id) and, for each
    other arm, why not."""
    names = job["names"]
    boxes = {box.manifest["index"]: box for box in arm_spools(folder)}
    children = runs.children_of(client, job["experiment_id"], job["parent_run_id"])
    complete, problems = {}, []
    for i, name in enumerate(names):
        box = boxes.get(i)
        run_id = children.get(i) or (box.run_id if box else None)
        if run_id is None:
            problems.append(f"arm {name} never started its run")
            continue
        if box is not None and box.run_id != run_id:
            box = None
        run = client.get_run(run_id)
        if lifecycle.reusable(client, run):
            complete[i] = run_id
            continue
        if box is None or box.manifest["state"] == RUNNING:
            why = "the tracking server was lost before its predictions existed"
            if run.info.status == "RUNNING":
                lifecycle.end_run(client, run_id, why, "FAILED")
            problems.append(f"arm {name}: {why}")
            continue
        try:
            box.upload(client)
            lifecycle.verify_predictions(client, run_id)
            if "ab.error" in run.data.tags:  # ended by `doctor --fix` or the launcher while the results waited here
                client.delete_tag(run_id, "ab.error")
            lifecycle.complete(client, run_id)
        except Exception as err:
            if outage.unreachable(err):
                raise
            lifecycle.end_run(client, run_id, f"resume: {runs.one_line(err)}", "FAILED")
            problems.append(f"arm {name}: {runs.one_line(err)}")
            continue
        box.remove()
        complete[i] = run_id
    return complete, problems
