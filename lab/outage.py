"""Outages of the tracking server, waited out for a window: which errors mean "unreachable", this process's view
of the outage (MLflow's HTTP calls fail at once while it lasts), and a client whose calls wait for the server.

    client = outage.patient(MlflowClient(), cfg.outage_window_s)   # calls wait for a lost server, then ServerLost
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any

# Once a call found the server gone, every later call fails at once and `Patient` does the waiting, with its own
# backoff, so that nothing waits past outage_window_s by more than one call (at most this timeout).
FAIL_FAST_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_outage: dict[str, Any] = {"since": None, "saved": {}}  # this process's view of the tracking server


def unreachable(err: BaseException) -> bool:
    """Whether `err` says the tracking server could not be reached (rather than that it refused a request)."""
    if isinstance(err, ServerLost):
        return True
    text = f"{type(err).__name__}: {err}"
    return any(s in text for s in ("Max retries exceeded", "Connection refused", "ConnectionError",
                                   "Failed to establish a new connection", "Read timed out", "RemoteDisconnected"))


def unreachable_line(since: float) -> str:
    return f"tracking server unreachable since {time.strftime('%H:%M:%S', time.localtime(since))}"


class ServerLost(ConnectionError):
    """The tracking server stayed unreachable for longer than outage_window_s."""

    def __init__(self, since: float, window_s: float) -> None:
        super().__init__(f"{unreachable_line(since)}, longer than outage_window_s={window_s:g} s")
        self.since, self.window_s = since, window_s


def outage_since() -> float | None:
    """When this process found the tracking server gone (None: it answers)."""
    return _outage["since"]


def mark_unreachable(since: float, note: bool = True) -> float:
    """The server is gone (since `since`, unless known earlier): from now on MLflow calls of this process fail at
    once instead of retrying for about 15 s each (FAIL_FAST_ENV). With `note`, one line says so on stderr (else a
    job that waits for its server looks hung). Returns when the outage began."""
    if _outage["since"] is None:
        _outage["since"], _outage["noted"] = since, note
        if note:
            print(f"ablab: note: {unreachable_line(since)}; results are kept locally and uploaded when it is back",
                  file=sys.stderr, flush=True)
        _outage["saved"] = {k: os.environ.get(k) for k in FAIL_FAST_ENV}
        os.environ.update(FAIL_FAST_ENV)
    return _outage["since"]


def mark_reachable() -> None:
    """The server answered: MLflow's HTTP retries as they were before the outage."""
    if _outage["since"] is None:
        return
    if _outage.get("noted"):
        print(f"ablab: note: tracking server back after {time.time() - _outage['since']:.0f} s", file=sys.stderr,
              flush=True)
    for key, value in _outage["saved"].items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _outage["since"] = None


class Patient:
    """An MlflowClient whose calls wait out a lost tracking server: on a connection error the call is tried again
    with backoff (1, 2, 4 ... 10 s) until `window_s` have passed since the outage began, then `ServerLost` is
    raised. Other errors pass at once."""

    def __init__(self, client, window_s: float) -> None:
        self._client, self.window_s = client, window_s

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def waiting(*args: Any, **kwargs: Any) -> Any:
            return self.call(attr, *args, **kwargs)

        return waiting

    def call(self, fn, *args: Any, **kwargs: Any) -> Any:
        delay = 1.0
        while True:
            started = time.time()
            try:
                result = fn(*args, **kwargs)
            except Exception as err:
                if isinstance(err, ServerLost) or not unreachable(err):
                    raise
                since = mark_unreachable(started)
                left = since + self.window_s - time.time()
                if left <= 0:
                    raise ServerLost(since, self.window_s) from None
                time.sleep(min(delay, left))
                delay = min(2 * delay, 10.0)
                continue
            mark_reachable()
            return result


def patient(client, window_s: float) -> Patient:
    return client if isinstance(client, Patient) else Patient(client, window_s)
