"""Run statuses that tell the truth: who owns a run (host, pid, heartbeat), when a child may be called FINISHED
(predictions verified, then the completion tag, then the status), signals turned into Ctrl-C, arms that died by a
signal, stale runs, bounded MLflow HTTP retries (outages of the tracking server: lab/outage.py).

    lifecycle.raise_on_signals()                     # SIGTERM/SIGHUP take the KeyboardInterrupt path
    client.create_run(..., tags={..., **lifecycle.owner_tags()})
    lifecycle.verify_predictions(client, run_id); lifecycle.complete(client, run_id)
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

COMPLETE_TAG = "ab.complete"  # written last, after the predictions were uploaded and verified
HOST_TAG, PID_TAG, HEARTBEAT_TAG = "ab.host", "ab.pid", "ab.heartbeat"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 10 * HEARTBEAT_S  # a run on another host whose heartbeat is this old has lost its process
PREDICTIONS = "predictions/predictions.parquet"
PREDICTION_COLUMNS = ("sample_id", "label", "pred", "confidence")
MAX_ERROR = 5000
# MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) wait minutes on a dead server before one call
# fails; these fail one call within about 15 s on a refused connection and 4 x 20 s + 15 s on a silent one.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
EXIT_SERVER_LOST = 75  # an arm gave up on the tracking server after outage_window_s; its results are spooled
PAUSE_ENV, MARKER_ENV = "AB_TEST_PAUSE_IN", "AB_TEST_PAUSE_MARKER"  # tests: an arm waits in `fit` or `test`

_received: list[int] = []


# OpenMP threads that wait spin for a short while only (GNU OpenMP, which torch's Linux wheels use; read when torch
# loads it). By default a thread that finishes its share spins ~300,000 times before it sleeps: with two arms
# taking turns, or one other busy process on the machine, the spinners hold the cores the working threads need,
# and every one of the thousands of parallel regions per batch waits out a time slice. Measured on 2 cores with
# one busy process beside the default job: over 300 s by default (stopped there), 61 s with 1,000 spins (the bare
# script beside the same process: 81 s); on a quiet machine, 34-40 s either way. The user's own setting wins.
OPENMP_ENV = {"GOMP_SPINCOUNT": "1000"}


def set_openmp_defaults(env: dict[str, str]) -> None:
    """`OPENMP_ENV` in the environment of a process that will import torch, unless the user chose a wait policy or
    a spin count."""
    if not {"OMP_WAIT_POLICY", *OPENMP_ENV} & env.keys():
        env |= OPENMP_ENV


def set_http_defaults(env: dict[str, str] | os._Environ = os.environ) -> None:
    """Bounded retries and timeouts for MLflow's HTTP client, unless the user set their own."""
    for key, value in HTTP_ENV.items():
        env.setdefault(key, value)


def owner_tags() -> dict[str, str]:
    """Tags naming the process that owns a run, so that a later `doctor` can tell whether it is still alive."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), HEARTBEAT_TAG: str(int(time.time()))}


def start_heartbeat(client, run_id: str, every_s: float = HEARTBEAT_S) -> threading.Event:
    """Refresh the heartbeat tag every `every_s` until the run leaves RUNNING or the returned event is set."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            try:
                if client.get_run(run_id).info.status != "RUNNING":
                    return
                client.set_tag(run_id, HEARTBEAT_TAG, str(int(time.time())))
            except Exception:  # an outage: the next beat tries again; the job's own calls report it
                continue

    threading.Thread(target=beat, name=f"ablab-heartbeat-{run_id[:8]}", daemon=True).start()
    return stop


def raise_on_signals(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)) -> dict[int, Any]:
    """SIGTERM (timeout, Docker, SLURM) and SIGHUP take the Ctrl-C path: KeyboardInterrupt, once. Later signals
    are ignored so that the cleanup they interrupt (ending runs, stopping arms, bounded) can finish quietly.
    Returns the previous handlers, for `restore_signals`."""

    def handler(signum: int, frame: Any) -> None:
        if not _received:
            _received.append(signum)
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return {}
    _received.clear()
    return {sig: signal.signal(sig, handler) for sig in signals}


def restore_signals(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def received_signal() -> int | None:
    """The signal that interrupted this process (via `raise_on_signals`), if any."""
    return _received[0] if _received else None


def interrupted_exit_code() -> int:
    """128 + the signal number, as a shell reports a process ended by it (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + (received_signal() or signal.SIGINT)


def end_outer_run(message: str) -> None:
    """Under `mlflow run`: end its run (MLFLOW_RUN_ID) FAILED with the reason in `ab.error`; `mlflow run` itself
    would mark it FAILED without one."""
    if run_id := os.environ.get("MLFLOW_RUN_ID"):
        from mlflow import MlflowClient

        end_run(MlflowClient(), run_id, message, "FAILED")


def end_run(client, run_id: str, message: str, status: str) -> bool:
    """Record why, then end the run; False where the server could not be told (doctor --fix closes it later)."""
    try:
        client.set_tag(run_id, "ab.error", message[:MAX_ERROR])
        client.set_terminated(run_id, status)
    except Exception:
        return False
    return True


def verify_predictions(client, run_id: str) -> None:
    """Read back the uploaded predictions: every test row (tag `ab.n_test`) and the expected columns, else raise."""
    import pyarrow.parquet as pq

    expected = int(client.get_run(run_id).data.tags.get("ab.n_test", "-1"))
    with tempfile.TemporaryDirectory(prefix="ablab-verify-") as tmp:
        path = Path(client.download_artifacts(run_id, PREDICTIONS, tmp))
        meta = pq.read_metadata(path)
        columns = set(meta.schema.names)
    missing = [c for c in PREDICTION_COLUMNS if c not in columns]
    if missing or (expected >= 0 and meta.num_rows != expected):
        raise RuntimeError(f"{PREDICTIONS} is incomplete: {meta.num_rows} rows of {expected}"
                           + (f", columns {', '.join(missing)} missing" if missing else ""))


def complete(client, run_id: str) -> None:
    """The completion tag, written last, then FINISHED: only a run with both is reused."""
    client.set_tag(run_id, COMPLETE_TAG, "true")
    client.set_terminated(run_id, "FINISHED")


def is_complete(run) -> bool:
    return run.info.status == "FINISHED" and run.data.tags.get(COMPLETE_TAG) == "true"


def has_predictions(client, run_id: str) -> bool:
    try:
        return any(f.path == PREDICTIONS for f in client.list_artifacts(run_id, "predictions"))
    except Exception:
        return False


def reusable(client, run) -> bool:
    """FINISHED, with the completion tag, and its predictions still there."""
    return is_complete(run) and has_predictions(client, run.info.run_id)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def is_stale(run, now: float | None = None) -> bool:
    """A RUNNING run whose process is gone: on this host, its pid is not alive; elsewhere, no heartbeat for
    STALE_AFTER_S."""
    if run.info.status != "RUNNING":
        return False
    tags = run.data.tags
    if tags.get(HOST_TAG) == socket.gethostname() and tags.get(PID_TAG, "").isdigit():
        return not _alive(int(tags[PID_TAG]))
    beat = tags.get(HEARTBEAT_TAG, "")
    return beat.isdigit() and (now or time.time()) - int(beat) > STALE_AFTER_S


def die_with_parent() -> None:
    """In a child process (a `preexec_fn`, or just after a fork): get SIGKILL when its parent dies, however it
    dies (Linux), so that no arm or rank outlives the process that started it."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def exit_now(code: int) -> None:
    """End this process with `code` once its work is done: the exit handlers run (the launcher's reaping of its
    arms, MLflow's, logging's flush), then the interpreter's teardown is skipped. Freeing every torch, Lightning
    and MLflow object takes ~2 s of CPU per process at the end of every job, on cores other work may need."""
    # What a normal exit runs first, in its order: join the threads that are not daemons (a thread pool's
    # pending uploads), then the exit handlers. Both private, and the only way to run them before os._exit.
    getattr(threading, "_shutdown", lambda: None)()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_GC_PAUSE = threading.Lock()
_gc_pauses = 0  # sections inside gc_paused now, over every thread; the first turns the collector off, the last on
_gc_was_enabled = True


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a bulk load of runs. MLflow's SQL store builds ~90 ORM objects
    per run; every few hundred allocations the collector walks the live objects, and a full pass walks every
    object of torch, pandas and MLflow: 60% of the time of a 1,000-run search (2.4 s against 0.95 s here).
    The load makes no reference cycles worth collecting before it ends; the collector resumes when the last
    section open in any thread ends (the leaderboard's stale-run search runs beside its main search)."""
    global _gc_pauses, _gc_was_enabled
    with _GC_PAUSE:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _GC_PAUSE:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


def stale_runs(client, experiment_ids: Sequence[str], fingerprint: str = "") -> list:
    """ablab parent and child runs in `experiment_ids` that are RUNNING without a live process, oldest first;
    with `fingerprint`, only the child runs on that test set."""
    return _scan_stale(client, experiment_ids, fingerprint)[0]


def _scan_stale(client, experiment_ids: Sequence[str], fingerprint: str = "",
                scan: int | None = None) -> tuple[list, bool]:
    """(stale runs oldest first, whether every RUNNING run was looked at): in chunks of 100 experiments, each
    read whole, or only its `scan` newest RUNNING runs."""
    found, every, now = [], True, time.time()
    query = "attributes.status = 'RUNNING'" + (f" and tags.`ab.dataset_fingerprint` = '{fingerprint}'"
                                               if fingerprint else "")
    for start in range(0, len(experiment_ids), 100):
        token = None
        while True:
            with gc_paused():
                page = client.search_runs(list(experiment_ids[start:start + 100]), query, max_results=scan or 1000,
                                          order_by=["attributes.start_time DESC"], page_token=token)
            found += [r for r in page if r.data.tags.get("ab.role") and is_stale(r, now)]
            token = page.token
            if scan and token:
                every, token = False, None
            if not token:
                break
    return sorted(found, key=lambda r: r.info.start_time), every


# `run` and `leaderboard` look at this many RUNNING runs for their note: loading a run costs ~4 ms on SQLite,
# and hundreds of stale runs would double a leaderboard's time. `doctor` lists them all.
STALE_NOTE_SCAN = 100


def stale_note(client, experiment_ids: Sequence[str], fingerprint: str = "") -> str:
    """One line about stale runs, for `run` and `leaderboard` (which never use them); "" when there are none.
    With `fingerprint` it counts only the runs on that test set: those that would have been used."""
    try:
        stale, every = _scan_stale(client, experiment_ids, fingerprint, scan=STALE_NOTE_SCAN)
    except Exception:
        return ""
    count = f"{len(stale)}" if every else f"at least {len(stale)}"
    where = " on this test set" if fingerprint else ""
    return (f"ablab: note: {count} run(s){where} left RUNNING by a job whose process is gone are stale and not "
            "used; `python -m lab doctor --fix` ends them") if stale else ""


def settle_arm(client, run_id: str, code: int | None, interrupted: bool) -> None:
    """An arm process has ended: a child it left RUNNING is ended with the reason (killed by a signal,
    interrupted with the job, or exited without ending it). One that gave up on a lost server stays RUNNING: its
    results are spooled for `python -m lab resume`."""
    if code == EXIT_SERVER_LOST or client.get_run(run_id).info.status != "RUNNING":
        return
    if code is not None and code < 0 and not interrupted:
        end_run(client, run_id, f"arm killed by signal {-code}", "FAILED")
    elif interrupted:
        end_run(client, run_id, "interrupted", "KILLED")
    else:
        end_run(client, run_id, f"arm exited with code {code} without ending its run", "FAILED")


def _not_interrupt_noise(record: logging.LogRecord) -> bool:
    return not any(s in record.getMessage() for s in ("Received SIGTERM", "Detected KeyboardInterrupt"))


def quiet_interrupts() -> None:
    """Drop Lightning's lines about a signal or Ctrl-C in an arm: the launcher says "interrupted" once."""
    for name in ("lightning.pytorch.trainer.connectors.signal_connector", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero", "lightning_utilities.core.rank_zero"):
        logging.getLogger(name).addFilter(_not_interrupt_noise)


def arm_logger(tracking_uri: str, run_id: str, client=None):
    """Lightning's MLFlowLogger, except that it never ends the run: `finalize` would mark it FINISHED after
    `fit`, before the test stage and the predictions exist. lab/arm.py ends the run itself. `client` replaces
    the logger's own (lab/spool.py's, which keeps metrics and telemetry locally while the server is away)."""
    from lightning.pytorch.loggers import MLFlowLogger  # torch: only arm processes get here

    class ArmLogger(MLFlowLogger):
        def finalize(self, status: str = "success") -> None:
            return None

    logger = ArmLogger(tracking_uri=tracking_uri, run_id=run_id, log_model=False)
    if client is not None:
        logger._mlflow_client = client  # what `logger.experiment` returns: metrics, params, telemetry go through it
    return logger


def pause_callbacks() -> list:
    """Tests only: with AB_TEST_PAUSE_IN=fit|test, when that stage starts the arm writes its pid to a file in the
    folder AB_TEST_PAUSE_MARKER and waits while `hold` exists there (at most 10 min), so that a fault can be
    injected at a known point. Empty otherwise."""
    stage = os.environ.get(PAUSE_ENV)
    if stage not in ("fit", "test"):
        return []
    from lightning.pytorch.callbacks import Callback

    folder = Path(os.environ.get(MARKER_ENV, "ablab-paused"))

    def pause(where: str) -> None:
        if where != stage:
            return
        (folder / str(os.getpid())).write_text(where)
        deadline = time.monotonic() + 600
        while (folder / "hold").exists() and time.monotonic() < deadline:
            time.sleep(0.1)

    class Pause(Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            pause("fit")

        def on_test_epoch_start(self, trainer, pl_module) -> None:
            pause("test")

    return [Pause()]
