"""A fork server for arm processes (Linux): one interpreter imports torch, Lightning, timm and MLflow once, while
the launcher runs preflight, then forks one process per arm. Two arms used to import the same ~5,400 modules
twice, 6.5 CPU s each, on the cores the job needs.

    z = Zygote.start(os.environ)              # launcher: `python -m lab.arm --standby --report-fd N`
    proc = z.fork(argv, env)                  # one arm; a Popen-like handle (poll, wait, terminate, kill)
    z.close()                                 # no more arms: it exits once its arms have

The server answers each fork with the child's pid and reports each child's exit code (Popen's convention,
-N for signal N) on a pipe of its own: the arms' stdout and stderr stay the terminal's. Signals for an arm go
through the server, which holds a pidfd for each child until it has reaped it, so a recycled pid is never hit.
A forked arm dies with the server (PR_SET_PDEATHSIG), and the server with the launcher.
Where CUDA's driver is already loaded in the server (a library touched the GPU while importing), forking would
hand the arm a driver it cannot use: the child then execs a fresh `python -m lab.arm` under the same pid.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lab import lifecycle

# Variables a forked arm may differ in from the server: read after the fork (CUDA when it starts, MLflow's when
# it calls, the arm's placement tag when it creates its run), not while importing.
LATE_ENV = frozenset({"CUDA_VISIBLE_DEVICES", "AB_PLACEMENT", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID",
                      "MLFLOW_EXPERIMENT_ID", *lifecycle.HTTP_ENV})
PROJECT = Path(__file__).resolve().parent.parent  # on the arms' PYTHONPATH, wherever the job was started
EXEC_ENV = "AB_ZYGOTE_EXEC"  # "1": every arm execs a fresh interpreter after the fork (what a loaded driver forces)


def available() -> bool:
    """Forking arms needs Linux (PR_SET_PDEATHSIG and pidfds); elsewhere each arm is a fresh interpreter."""
    return sys.platform.startswith("linux") and hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")


def process_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` for an arm process (or the fork server): the project first on PYTHONPATH (`python -m lab.arm` imports
    from it, wherever it runs), and short OpenMP spins (`lifecycle.OPENMP_ENV`)."""
    env = dict(env) | {"PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), env.get("PYTHONPATH")]))}
    lifecycle.set_openmp_defaults(env)
    return env


_EARLY: list[Zygote] = []


def prestart() -> Zygote | None:
    """`python -m lab run`, first thing: start the server before the launcher's own imports (~2 s) and config,
    so that its imports (the job's critical path) start at once. `take_prestarted` hands it to lab/launch.py;
    unused, it dies with the launcher."""
    if available() and os.environ.get("AB_NO_STANDBY") != "1":
        _EARLY.append(Zygote.start(os.environ))
        return _EARLY[0]
    return None


def take_prestarted() -> Zygote | None:
    return _EARLY.pop() if _EARLY else None


def forkable(server_env: dict[str, str], env: dict[str, str]) -> bool:
    """Whether an arm that needs `env` may be forked from a server started with `server_env`: libraries read some
    variables when they are imported, so only those read later may differ."""
    keys = server_env.keys() | env.keys()
    return all(server_env.get(k) == env.get(k) for k in keys - LATE_ENV)


class Forked:
    """One forked arm, as the launcher sees it: the part of `subprocess.Popen` that lab/launch.py uses."""

    def __init__(self, zygote: Zygote, serial: int, pid: int, argv: Sequence[str]):
        self.zygote, self.serial, self.pid, self.args = zygote, serial, pid, ["lab.arm (forked)", *argv]

    @property
    def returncode(self) -> int | None:
        """Its exit code once the server has reported it (an arm may exit before the launcher takes its pid),
        or -SIGKILL where the server died before it did (the arm died with it)."""
        return self.zygote.exits.get(self.serial, -signal.SIGKILL if self.zygote.gone else None)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        with self.zygote.changed:
            if not self.zygote.changed.wait_for(lambda: self.returncode is not None, timeout):
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            self.zygote.signal(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The launcher's side of the fork server."""

    def __init__(self, proc: subprocess.Popen, report: int, base: dict[str, str], env: dict[str, str]):
        self.proc, self.base, self.env = proc, base, env  # the environment it was started from, and its own
        self.changed = threading.Condition()
        self.exits: dict[int, int] = {}  # fork serial -> exit code, as the server reports them
        self.forked = 0  # processes it has forked for this launcher (arms and calls)
        self._pids: list[int] = []  # fork answers, by serial (the n-th answer is the n-th fork)
        self._serial_of: dict[int, int] = {}  # pid -> serial of the child that holds it now (pids are recycled)
        self._forking = threading.Lock()  # one fork request in flight: answers come in order, one per request
        self._writing = threading.Lock()  # one message on the pipe at a time (a signal may go during a fork)
        self.gone = False  # the server's report pipe ended: it exited (or was killed), and its arms with it
        self._reader = threading.Thread(target=self._read, args=(report,), name="ablab-zygote", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, base: Mapping[str, str], command: Sequence[str] = ("-m", "lab.arm", "--standby")) -> Zygote:
        """Start the server from environment `base` (`command` ends in a call to `serve`, given `--report-fd N`);
        it imports while the launcher goes on. Its own session: a Ctrl-C at the terminal reaches only the
        launcher, which stops the arms itself."""
        base = dict(base)  # a copy: importing torch and Lightning later adds variables to the launcher's own
        env = process_env(base)
        read, write = os.pipe()
        try:
            proc = subprocess.Popen([sys.executable, *command, "--report-fd", str(write)], env=env,
                                    stdin=subprocess.PIPE, pass_fds=(write,), preexec_fn=lifecycle.die_with_parent,
                                    start_new_session=True)
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)
        return cls(proc, read, base, env)

    def fork(self, argv: Sequence[str], env: dict[str, str]) -> Forked | None:
        """Start one arm with `argv` and `env`; None when the server is gone (the caller starts a fresh one)."""
        return self._fork({"argv": list(argv), "env": env}, argv)

    def call(self, target: str, kwargs: dict[str, Any], env: dict[str, str]) -> Any:
        """`module:function(**kwargs)` in a process forked from the server, which has the imports the function
        needs; returns what it returned (JSON), raises the ValueError it raised (bad input, one line), or a
        RuntimeError where it crashed. None where the server is gone: the caller runs it in-process."""
        with tempfile.TemporaryDirectory(prefix="ablab-call-") as tmp:
            out = Path(tmp) / "result.json"
            proc = self._fork({"call": target, "kwargs": kwargs, "out": str(out), "env": env}, [target])
            if proc is None:
                return None
            try:
                code = proc.wait()
            except BaseException:  # Ctrl-C: the caller's job ends, and this call with it
                proc.kill()
                raise
            result = json.loads(out.read_text()) if out.is_file() else {"crash": f"exited with code {code}"}
        if "error" in result:
            raise ValueError(result["error"])
        if "crash" in result:
            raise RuntimeError(f"{target} failed in a forked process: {result['crash'].strip().splitlines()[-1]}")
        return result["ok"]

    def _fork(self, message: dict[str, Any], argv: Sequence[str]) -> Forked | None:
        with self._forking:
            if not self._send(message):
                return None
            return self._take_pid(argv)

    def _take_pid(self, argv: Sequence[str]) -> Forked | None:
        with self.changed:  # answered once the server's imports are done
            self.changed.wait_for(lambda: len(self._pids) > self.forked or self.gone)
            if len(self._pids) == self.forked:
                return None
            serial, self.forked = self.forked, self.forked + 1
            return Forked(self, serial, self._pids[serial], argv)

    def signal(self, pid: int, sig: int) -> None:
        if not self._send({"signal": pid, "sig": int(sig)}):
            self.kill()  # no channel left: only stopping the server stops its arms (they die with it)

    def close(self) -> None:
        """No more arms: the server exits once those it forked have."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()

    def kill(self) -> None:
        """Stop the server now; the arms it forked die with it."""
        self.close()
        self.proc.kill()
        self.proc.wait()

    def _send(self, message: dict) -> bool:
        try:
            with self._writing:
                self.proc.stdin.write((json.dumps(message) + "\n").encode())
                self.proc.stdin.flush()
            return True
        except (OSError, ValueError):  # it died, or the launcher already closed the channel
            return False

    def _read(self, report: int) -> None:
        with open(report, "rb") as stream:
            for line in stream:
                message = json.loads(line)
                with self.changed:
                    if "pid" in message:
                        self._serial_of[message["pid"]] = len(self._pids)
                        self._pids.append(message["pid"])
                    else:  # kept here: the arm may exit before the thread that forked it has taken its pid
                        self.exits[self._serial_of.pop(message["exit"])] = message["code"]
                    self.changed.notify_all()
        self.proc.wait()
        with self.changed:
            self.gone = True
            self.changed.notify_all()


# ----------------------------------------------------------------------------------------- the server's side

def serve(run: Callable[[list[str]], int], report_fd: int, warm: Sequence[str] = ()) -> int:
    """The server's loop, after the imports (and those of the modules named in `warm`, which the arms would
    import on first use): fork an arm per command on stdin, signal one on request, report each exit; return
    once stdin has ended and every arm has been reaped."""
    for name in warm:
        with contextlib.suppress(ImportError):  # an optional part missing here is the arm's to report
            importlib.import_module(name)
    report = os.fdopen(report_fd, "w", buffering=1)
    exec_instead = os.environ.get(EXEC_ENV) == "1" or cuda_driver_loaded()
    children: dict[int, int] = {}  # pidfd -> pid
    pidfds: dict[int, int] = {}  # pid -> pidfd
    stdin, pending, open_ = sys.stdin.fileno(), b"", True
    server = os.getpid()  # a child compares its parent with this, not with the parent it saw first
    while open_ or children:
        ready, _, _ = select.select(([stdin] if open_ else []) + list(children), [], [])
        for fd in ready:
            if fd != stdin:  # an arm exited
                pid = children.pop(fd)
                del pidfds[pid]
                os.close(fd)
                code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                report.write(json.dumps({"exit": pid, "code": code}) + "\n")
                continue
            chunk = os.read(stdin, 1 << 16)
            open_ = bool(chunk)
            *lines, pending = (pending + chunk).split(b"\n")
            for line in filter(None, lines):
                message = json.loads(line)
                if "signal" in message:
                    if message["signal"] in pidfds:
                        with contextlib.suppress(ProcessLookupError):
                            signal.pidfd_send_signal(pidfds[message["signal"]], message["sig"])
                    continue
                pid = os.fork()
                if pid == 0:
                    _child(run, message, report_fd, exec_instead, server)
                pidfds[pid] = os.pidfd_open(pid)
                children[pidfds[pid]] = pid
                report.write(json.dumps({"pid": pid}) + "\n")
    return 0


def _child(run: Callable[[list[str]], int], job: dict, report_fd: int, exec_instead: bool, server: int) -> None:
    """The forked arm (or `call`): detach from the server's channels, take the job's environment, run, and never
    return into the server's loop."""
    code = 1
    try:
        os.close(report_fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # the server's command pipe stays the server's
        os.close(null)
        lifecycle.die_with_parent()
        if os.getppid() != server:  # the server died before PR_SET_PDEATHSIG took
            os._exit(1)
        os.environ.clear()
        os.environ.update(job["env"])
        if "call" in job:
            if exec_instead:
                os.execv(sys.executable, [sys.executable, "-c", CALL_MAIN, json.dumps(job)])
            code = run_call(job)
            return
        argv = job["argv"]
        sys.argv = [sys.argv[0], *argv]
        if exec_instead:
            os.execv(sys.executable, [sys.executable, "-m", "lab.arm", *argv])
        code = run(argv)
    except SystemExit as err:  # argparse (--help, a bad flag)
        code = err.code if isinstance(err.code, int) else 0 if err.code is None else 1
    except BaseException:  # AB_DEBUG=1: the arm re-raises; show it as an arm process would
        traceback.print_exc()
    finally:
        lifecycle.exit_now(code)


CALL_MAIN = "import json, sys; from lab import zygote; sys.exit(zygote.run_call(json.loads(sys.argv[1])))"


def run_call(job: dict) -> int:
    """Run a `call` job; its outcome, as JSON, goes to the job's `out` file."""
    module, name = job["call"].split(":")
    try:
        result = {"ok": getattr(importlib.import_module(module), name)(**job["kwargs"])}
    except ValueError as err:  # bad input: the caller says it, one line
        result = {"error": str(err)}
    except Exception:
        result = {"crash": traceback.format_exc()}
    Path(job["out"]).write_text(json.dumps(result))
    return 0


def cuda_driver_loaded() -> bool:
    """Whether CUDA's driver library is mapped into this process: after a fork it cannot be used."""
    try:
        return "libcuda.so" in Path("/proc/self/maps").read_text()
    except OSError:
        return True
