"""Place arms on devices, start one process per arm (all of them, or only those not reused), wait, and
collect their child run ids.

Placement:
- `parallel`: every arm at the same time on its own GPU (CUDA_VISIBLE_DEVICES narrowed to it);
- `lockstep`: arms share one device and take turns batch by batch (callbacks/lockstep.py), so they see the
  same clocks and temperature and their per-batch latencies pair up;
- `sequential`: one after the other on the same device.
`auto` picks parallel when there are at least as many GPUs as arms, lockstep otherwise.

Start and end cost seconds per arm, kept off the job's critical path: `standby` starts the arm processes before
preflight (they import torch, Lightning, timm and MLflow meanwhile, then wait for their command line), and an arm
counts as done once its run is complete (its done file), its interpreter's exit reaped in the background.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient

from lab import lifecycle, outage, runs, zygote
from lab.config import Config


@dataclass(frozen=True)
class Plan:
    placement: str
    device: str  # cpu | cuda
    gpus: tuple[str, ...]  # one per arm (parallel), or the shared one
    threads: int  # torch threads per arm process on the CPU, 0 = torch's default


@dataclass(frozen=True)
class ArmOutcome:
    index: int
    name: str
    run_id: str | None
    returncode: int
    error: str


def visible_gpus(cfg: Config, count: int | None = None) -> tuple[str, ...]:
    """The GPUs the arms may use, of the `count` CUDA devices visible (None: ask torch here)."""
    if cfg.devices == "cpu":
        return ()
    if count is None:
        import torch  # only here: the CLI's light paths (help, bad input, compare of run ids) never load torch

        count = torch.cuda.device_count()
    if cfg.devices == "auto":
        return tuple(str(i) for i in range(count))
    wanted = tuple(p.strip() for p in cfg.devices.split(","))
    missing = [g for g in wanted if int(g) >= count]
    if missing:
        raise ValueError(f"devices: GPU {', '.join(missing)} not present ({count} visible); use devices=auto or cpu")
    return wanted


def plan(cfg: Config, n_arms: int, gpus: tuple[str, ...] | None = None) -> Plan:
    if cfg.placement == "ray":  # the cluster decides the devices; joined here, before any run exists
        from lab import cluster  # Ray: imported only for this placement

        device, threads = cluster.connect(cfg)
        return Plan("ray", device, (), threads)
    gpus = visible_gpus(cfg) if gpus is None else gpus
    placement, k = cfg.placement, cfg.devices_per_arm  # k > 1: an arm is k DDP processes, one GPU each
    if placement == "auto":
        placement = "parallel" if gpus and len(gpus) >= n_arms * k else "lockstep" if k == 1 else "sequential"
    if placement == "parallel" and gpus and len(gpus) < n_arms * k:
        per_arm = f"one GPU per arm ({n_arms})" if k == 1 else f"{k} GPUs per arm ({n_arms * k} for {n_arms} arms)"
        raise ValueError(f"placement: parallel needs {per_arm}, found {len(gpus)}; use placement="
                         + ("lockstep or sequential" if k == 1 else "sequential or fewer devices_per_arm"))
    if gpus and len(gpus) < k:
        raise ValueError(f"devices_per_arm: {k} needs {k} GPUs, found {len(gpus)}; use devices_per_arm={len(gpus)}")
    cores = os.cpu_count() or 1
    if not gpus:  # threads per arm; its k ranks share them (lab/ddp.py)
        threads = max(1, cores // n_arms) if placement == "parallel" else cores
        return Plan(placement, "cpu", (), threads)
    groups = tuple(",".join(gpus[i:i + k]) for i in range(0, len(gpus) - k + 1, k))  # CUDA_VISIBLE_DEVICES of an arm
    return Plan(placement, "cuda", groups[:n_arms] if placement == "parallel" else groups[:1], 0)


def prepare(cfg: Config) -> None:
    """Import now what `run_arms` will need, while the launcher waits for the arms' fork server anyway: the
    lockstep server runs on torch (~1.5 s of imports, else between the parent run and the arms' start)."""
    if cfg.placement in ("auto", "lockstep") and cfg.devices_per_arm == 1:
        import callbacks.turns  # noqa: F401


def arm_command(cfg_path: Path, index: int, parent_run_id: str, experiment_id: str, p: Plan,
                error_file: Path, lockstep: str | None, world: int, done_file: Path | None = None) -> list[str]:
    """The command line of one arm process (lab/arm.py)."""
    cmd = [sys.executable, "-m", "lab.arm", "--config", str(cfg_path), "--index", str(index),
           "--parent-run-id", parent_run_id, "--experiment-id", experiment_id, "--device", p.device,
           "--threads", str(p.threads), "--error-file", str(error_file), "--world-size", str(world)]
    return cmd + (["--lockstep", lockstep] if lockstep else []) + (["--done-file", str(done_file)] if done_file else [])


def job_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a process the job starts: this one's (or `base`), without the parent's run, with the
    tracking store resolved and MLflow's HTTP limits."""
    base = os.environ if base is None else base
    env = {k: v for k, v in base.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env["MLFLOW_TRACKING_URI"] = runs.tracking_uri()
    lifecycle.set_http_defaults(env)  # a dead tracking server fails an arm's call in seconds, not minutes
    return zygote.process_env(env)


def arm_env(p: Plan, index: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of one arm process: `job_env`, placed, narrowed to its GPU."""
    env = job_env(base)
    env["AB_PLACEMENT"] = p.placement
    if p.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = p.gpus[index] if p.placement == "parallel" else p.gpus[0]
    return env


def _stop(procs, grace_s: float = 10.0, complete: Sequence[subprocess.Popen] = ()) -> None:
    """SIGTERM, then SIGKILL after `grace_s`; an arm whose run is `complete` (only tearing down) gets SIGKILL at
    once: it has nothing left to save, and a SIGTERM would interrupt its interpreter's exit noisily."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        if proc in complete:
            proc.kill()
        else:
            proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in running:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def subset_plan(p: Plan) -> Plan:
    """Some arms only (the others reused): one after the other on the plan's first device. The reused arms
    were measured in another job, so there is no same-batch latency pairing to keep."""
    return Plan("sequential", p.device, p.gpus[:1], (os.cpu_count() or 1) if p.device == "cpu" else 0)


def run_arms(cfg: Config, cfg_path: Path, parent_run_id: str, experiment_id: str, p: Plan,
             indices: Sequence[int] | None = None) -> list[ArmOutcome]:
    """Start the arms at `indices` (default: all, placed as `p` says) as child runs of the parent and wait for
    all of them; a failed arm never stops the others. A subset runs as `subset_plan(p)`."""
    names = cfg.arm_names
    everything = list(range(len(names)))
    indices = everything if indices is None else list(indices)
    if not indices:
        return []
    if p.placement == "ray":  # one Ray task per arm, anywhere in the cluster (lab/cluster.py)
        from lab import cluster

        slots = Path(cluster.CONFIG_SLOT), Path(cluster.ERROR_SLOT)
        argv = {i: arm_command(slots[0], i, parent_run_id, experiment_id, p, slots[1], None, 1)[1:] for i in indices}
        results = cluster.run_arms(cfg, parent_run_id, experiment_id, p.device, argv, indices)
        return [ArmOutcome(r.index, names[r.index], r.run_id, r.returncode,
                           r.error or exit_line(names[r.index], r.returncode)) for r in results]
    world = len(names)
    if indices != everything:
        p, world = subset_plan(p), 1
    server = None
    if p.placement == "lockstep":
        from callbacks.turns import LockstepServer  # torch: imported only when arms take turns

        server = LockstepServer(world_size=world)
    procs: dict[int, subprocess.Popen] = {}
    codes: dict[int, int] = {}
    with tempfile.TemporaryDirectory(prefix="ablab-arms-") as tmp:
        errors = {i: Path(tmp) / f"arm{i}.err" for i in indices}
        dones = {i: Path(tmp) / f"arm{i}.done" for i in indices}  # written by an arm once its run is complete

        def start(i: int) -> subprocess.Popen:
            cmd = arm_command(cfg_path, i, parent_run_id, experiment_id, p, errors[i],
                              server.address if server else None, world, dones[i])
            procs[i] = _go(i, p, cmd[3:]) or subprocess.Popen(cmd, env=arm_env(p, i),
                                                              preexec_fn=lifecycle.die_with_parent)
            return procs[i]

        done = False
        try:
            if p.placement == "sequential":  # the next arm starts once this one is gone (its device memory freed)
                for i in indices:
                    _wait_all({i: start(i)}, codes, server, dones if i == indices[-1] else None)
            else:
                for i in indices:
                    start(i)
                _wait_all(procs, codes, server, dones)
            done = True
        finally:
            complete = [proc for i, proc in procs.items() if proc.poll() is None and dones[i].exists()]
            if done:  # only their interpreters' exit is left: reaped while the parent fetches and compares
                reap_in_background(complete)
            # Interrupted (Ctrl-C, an exception): no arm outlives the launcher.
            _stop([proc for proc in procs.values() if not (done and proc in complete)], complete=complete)
            if server is not None:
                server.close()
            if lifecycle.EXIT_SERVER_LOST in codes.values():  # an arm waited out the window: calls fail at once now
                outage.mark_unreachable(time.time(), note=False)
            settle_children(experiment_id, parent_run_id, procs, interrupted=not done)
        messages = {i: errors[i].read_text().strip() if errors[i].exists() else "" for i in indices}
    by_index = runs.children_of(MlflowClient(), experiment_id, parent_run_id)
    return [ArmOutcome(i, names[i], by_index.get(i), codes[i],
                       messages[i] or exit_line(names[i], codes[i]) + server_death(procs[i], codes[i]))
            for i in indices]


def server_death(proc, code: int) -> str:
    """Why a forked arm was killed, where its fork server died first (the arms die with it)."""
    server = getattr(proc, "zygote", None)
    if code >= 0 or server is None or not server.gone or server.proc.returncode in (None, 0):
        return ""
    how = server.proc.returncode
    return f" (its fork server, pid {server.proc.pid}, {'killed by signal ' + str(-how) if how < 0 else 'exited'})"


def exit_line(name: str, code: int) -> str:
    """Why an arm that wrote no error line failed ("" for none): killed by a signal, or its exit code."""
    if code < 0:
        return f"arm {name} killed by signal {-code}"
    return f"arm {name} exited with code {code}" if code else ""


def settle_children(experiment_id: str, parent_run_id: str, procs: dict[int, subprocess.Popen],
                    interrupted: bool) -> None:
    """Every arm process has exited: a child run one left RUNNING (killed by a signal, or stopped with the job)
    is ended with the reason. Best effort: where the server is gone, `python -m lab doctor --fix` closes it."""
    try:
        client = MlflowClient()
        for i, run_id in runs.children_of(client, experiment_id, parent_run_id).items():
            if i in procs:
                lifecycle.settle_arm(client, run_id, procs[i].returncode, interrupted)
    except Exception:
        pass


def _wait_all(procs: dict[int, subprocess.Popen], codes: dict[int, int], server,
              dones: dict[int, Path] | None = None) -> None:
    """Poll the arms running at once until every one has exited or completed its run (its `dones` marker: what
    is left is the interpreter's exit, about 2 s off the critical path); a dead arm gives up its lockstep turns."""
    dones = dones or {}
    while not codes.keys() >= procs.keys():
        for i, proc in procs.items():
            if i in codes:
                continue
            if proc.poll() is not None:
                codes[i] = proc.returncode
            elif i in dones and dones[i].exists():
                codes[i] = 0
            else:
                continue
            if server is not None:
                server.reap(i)  # a dead arm must not keep the others waiting for its turn
        if not codes.keys() >= procs.keys():
            time.sleep(0.05)


_TEARING_DOWN: list[subprocess.Popen] = []
_REAP_AT_EXIT = threading.Event()  # set once _reap_all is registered with atexit


def reap_in_background(procs: Sequence[subprocess.Popen], grace_s: float = 10.0) -> None:
    """Arm processes whose runs are complete but which are still exiting: a daemon thread waits for each (no
    zombie), and the launcher's exit waits `grace_s` at most for them, then kills what is left (no arm left
    behind; PR_SET_PDEATHSIG would kill them anyway)."""
    if procs and not _REAP_AT_EXIT.is_set():
        _REAP_AT_EXIT.set()
        atexit.register(_reap_all, grace_s)
    _TEARING_DOWN[:] = [proc for proc in _TEARING_DOWN if proc.returncode is None]
    for proc in procs:
        _TEARING_DOWN.append(proc)
        threading.Thread(target=proc.wait, name=f"ablab-reap-{proc.pid}", daemon=True).start()


def _reap_all(grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    while _TEARING_DOWN:
        proc = _TEARING_DOWN.pop()
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------- standby arms
# An arm process spends seconds importing torch, Lightning, timm and MLflow before its first batch. `standby`
# starts a fork server (lab/zygote.py) before preflight and the parent run, so those imports overlap the
# launcher's own work and are done once for every arm: each arm is then forked from it.

_ZYGOTE: list[zygote.Zygote] = []


@contextlib.contextmanager
def standby(cfg: Config, n_arms: int) -> Iterator[zygote.Zygote | None]:
    """The fork server that `run_arms` forks the arms from: the one `python -m lab run` started first thing
    (zygote.prestart), else one started now. At the end of the block it is told that no arm follows (it exits
    once its arms have), or killed at once where it forked none (bad input, reused arms, a failed parent): it
    holds no run and prints nothing. Not for Ray (the cluster runs the arms), off Linux, or with AB_NO_STANDBY=1.
    Yields the server, or None."""
    early = zygote.take_prestarted()
    if cfg.placement == "ray" or os.environ.get("AB_NO_STANDBY") == "1" or not zygote.available():
        if early is not None:
            early.kill()
        yield None
        return
    # The arms' environment is derived from the one the server started from: importing torch and Lightning for
    # preflight adds variables of their own (KMP_INIT_AT_FORK, TORCHINDUCTOR_CACHE_DIR...) and MLflow drops one.
    _ZYGOTE[:] = [early or zygote.Zygote.start(os.environ)]
    try:
        yield _ZYGOTE[0]
    finally:
        discard_standby()


def _go(index: int, p: Plan, argv: list[str]) -> subprocess.Popen | zygote.Forked | None:
    """Fork arm `index` with its command line from the server; None when there is none, or it cannot serve this
    arm's environment (a subset of arms runs sequentially, placed differently), or it died: the caller starts a
    fresh process."""
    if not _ZYGOTE:
        return None
    env = arm_env(p, index, _ZYGOTE[0].base)
    if not zygote.forkable(_ZYGOTE[0].env, env):
        return None
    return _ZYGOTE[0].fork(argv, env)


def discard_standby() -> None:
    """No arm follows: a server that forked some exits once they have (reaped in the background, like them);
    one that forked none is killed now (it is only importing or waiting: no run, no output)."""
    while _ZYGOTE:
        server = _ZYGOTE.pop()
        if server.forked:
            server.close()
            reap_in_background([server.proc])
        else:
            server.kill()
