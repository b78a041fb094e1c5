"""MLflow plumbing that every command shares: the tracking URI (resolved once), the parent run's lifecycle,
the search for child runs, and errors as one line.

    uri = export_tracking_uri()                      # once, when a command starts (lab/cli.py)
    with parent_run("", run_name(specs)) as run:     # always ends FINISHED, FAILED or KILLED
        ...

The parent goes to the experiment the config names, else MLflow's own MLFLOW_EXPERIMENT_ID /
MLFLOW_EXPERIMENT_NAME, else `ablab`; under `mlflow run` it is the run MLflow created (MLFLOW_RUN_ID), renamed.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import mlflow
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException

from lab import lifecycle, outage

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # the embedded store, in the working directory
DEFAULT_EXPERIMENT = "ablab"
MAX_RUN_NAME = 60  # characters of a parent's name before it is shortened with an ellipsis
SEARCH_CHUNK = 100  # experiment ids per search_runs call
MAX_TAG = 5000  # characters of an `ab.error` tag


class RunFailed(Exception):
    """Raised out of `parent_run` once the run has ended FAILED or KILLED; `str()` is its `ab.error` line."""

    def __init__(self, message: str, interrupted: bool = False) -> None:
        super().__init__(message)
        self.interrupted = interrupted


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the embedded SQLite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def open_store() -> None:
    """Open the tracking store now (a new SQLite store migrates its schema: a second or more), where something
    else is being waited for anyway. Bad input or an unreachable server is reported where it is used, not here."""
    try:
        mlflow.MlflowClient().search_experiments(max_results=1)
    except Exception:
        pass


def export_tracking_uri() -> str:
    """Resolve the tracking URI once, into MLFLOW_TRACKING_URI, so that this process's MLflow calls and the
    arm processes it starts (they inherit the environment) all talk to the same store."""
    os.environ["MLFLOW_TRACKING_URI"] = uri = tracking_uri()
    return uri


def one_line(err: BaseException) -> str:
    """An exception as one line: our ValueErrors (bad config, model, data) as they are, others with their type."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if isinstance(err, ValueError) else f"{type(err).__name__}: {text}"


def mlflow_error_line(err: Exception, what: str) -> str:
    """One line for an MLflow/HTTP error about `what`: not found, permission denied, anything else."""
    code = getattr(err, "error_code", "")
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if code == "RESOURCE_DOES_NOT_EXIST":
        return f"{what} does not exist on {os.environ.get('MLFLOW_TRACKING_URI')}"
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        who = f"user {user!r}" if user else "this user (no MLFLOW_TRACKING_USERNAME)"
        return f"{what}: permission denied for {who}; ask its experiment's owner for READ permission"
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{what}: {text[:300]}"


@contextmanager
def reading_runs() -> Iterator[None]:
    """Before a parent run exists: an MLflow or connection error becomes one ValueError line (bad input).

    Our own ValueErrors pass as they are; with AB_DEBUG set, the original error is raised with its trace.
    """
    try:
        yield
    except ValueError:
        raise
    except Exception as err:
        if os.environ.get("AB_DEBUG"):
            raise
        raise ValueError(mlflow_error_line(err, "tracking server")) from None


def short_spec(spec: str) -> str:
    """A model spec as a parent's name shows it: `models:/clf@champion` -> `clf@champion`, `runs:/<id>/model`
    -> `run <id[:8]>`, a checkpoint path -> its file name; a timm name as it is."""
    if spec.startswith("models:/"):
        return spec.removeprefix("models:/")
    if spec.startswith("runs:/"):
        return f"run {spec.removeprefix('runs:/')[:8]}"
    return spec.rstrip("/").rsplit("/", 1)[-1] if "/" in spec else spec


def run_name(specs: Sequence[str]) -> str:
    """`<a> vs <b>` (`<a> vs <b> vs <c>` for A/B/n), shortened with an ellipsis past MAX_RUN_NAME characters."""
    name = " vs ".join(short_spec(s) for s in specs)
    return name if len(name) <= MAX_RUN_NAME else name[: MAX_RUN_NAME - 1].rstrip() + "…"


def use_experiment(experiment: str) -> str:
    """Make the parent's experiment active and return its id: `experiment` when given, else MLflow's
    MLFLOW_EXPERIMENT_ID or MLFLOW_EXPERIMENT_NAME (as `mlflow` itself honours them), else `ablab`."""
    by_id = "" if experiment else os.environ.get("MLFLOW_EXPERIMENT_ID", "")
    name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    try:
        chosen = mlflow.set_experiment(experiment_id=by_id) if by_id else mlflow.set_experiment(name)
    except MlflowException as err:
        what = f"experiment id {by_id} (MLFLOW_EXPERIMENT_ID)" if by_id else f"experiment {name!r}"
        raise ValueError(mlflow_error_line(err, what)) from None
    finally:  # set_experiment exports MLFLOW_EXPERIMENT_ID: the environment must stay the user's choice
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        if by_id:
            os.environ["MLFLOW_EXPERIMENT_ID"] = by_id
    return chosen.experiment_id


@contextmanager
def parent_run(experiment: str, run_name: str) -> Iterator[Run]:
    """The run `mlflow run` created (MLFLOW_RUN_ID), else a new run in `use_experiment(experiment)`; named
    `run_name` either way, and never left RUNNING.

    The block completing ends the run FINISHED. Ctrl-C ends it KILLED, any other exception FAILED, both with
    the reason in tag `ab.error`, and then raise `RunFailed` (from the original error).
    """
    if os.environ.get("MLFLOW_RUN_ID"):
        run = mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"])
        mlflow.set_tag("mlflow.runName", run_name)  # MLflow Projects named it at random
    else:
        use_experiment(experiment)
        run = mlflow.start_run(run_name=run_name)
    mlflow.set_tags(lifecycle.owner_tags())  # `python -m lab doctor` tells a crashed job's run by these
    beating = lifecycle.start_heartbeat(mlflow.MlflowClient(), run.info.run_id)
    try:
        yield run
    except KeyboardInterrupt as err:
        _end(run.info.run_id, "interrupted", "KILLED")
        raise RunFailed("interrupted", interrupted=True) from err
    except RunFailed as err:  # raised inside with its own line (e.g. the arms that failed)
        _end(run.info.run_id, str(err), "FAILED")
        raise
    except Exception as err:
        line = one_line(err)
        if outage.unreachable(err):
            line = (f"{outage.unreachable_line(time.time())}; runs it could not end stay RUNNING until "
                    "`python -m lab doctor --fix` once the server is back")
        _end(run.info.run_id, line, "FAILED")
        raise RunFailed(line) from err
    finally:  # an in-process caller (a notebook, a test) goes on: no beat for a run this block has ended
        beating.set()
    mlflow.end_run("FINISHED")


def _end(run_id: str, message: str, status: str) -> None:
    """Record why, then end the active run (else MLflow's exit hook would mark it FINISHED). Best effort: a lost
    server cannot be told, and `end_run` forgets the active run before it calls the server."""
    with suppress(Exception):
        mlflow.MlflowClient().set_tag(run_id, "ab.error", message[:MAX_TAG])
    with suppress(Exception):
        mlflow.end_run(status)


def children_of(client, experiment_id: str, parent_run_id: str) -> dict[int, str]:
    """arm index -> run id of the ablab child runs of one parent (any status)."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`ab.role` = 'child'")
    return {int(r.data.tags.get("ab.arm_index", -1)): r.info.run_id for r in runs}


def readable_experiment_ids(client) -> list[str]:
    """Every active experiment the current user can read (a server with auth lists only those)."""
    ids, token = [], None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        ids += [e.experiment_id for e in page]
        token = page.token
        if not token:
            return ids


def search_children(client, filter_string: str = "", experiment_ids: Sequence[str] | None = None) -> list[Run]:
    """FINISHED ablab child runs matching `filter_string` in every readable experiment, newest first."""
    experiment_ids = list(experiment_ids) if experiment_ids is not None else readable_experiment_ids(client)
    query = " and ".join(filter(None, ["tags.`ab.role` = 'child'", "attributes.status = 'FINISHED'", filter_string]))
    runs = []
    for start in range(0, len(experiment_ids), SEARCH_CHUNK):
        token = None
        while True:
            with lifecycle.gc_paused():  # a bulk load of ORM objects (lab/lifecycle.py)
                page = client.search_runs(experiment_ids[start:start + SEARCH_CHUNK], query, max_results=1000,
                                          order_by=["attributes.start_time DESC"], page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                break
    return sorted(runs, key=lambda r: r.info.start_time, reverse=True)


def strict_json(value: Any, indent: int | None = None) -> str:
    """JSON that every parser accepts: NaN and infinities (a class absent from the test set, an undefined
    interval) are written as null, numpy numbers and arrays as plain ones (summary.json, metrics/*.json)."""

    def finite(v: Any) -> Any:
        if hasattr(v, "tolist"):  # numpy scalar or array
            v = v.tolist()
        if isinstance(v, dict):
            return {str(k): finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    return json.dumps(finite(value), indent=indent, allow_nan=False, default=str)
