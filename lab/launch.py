"""Place arms on devices, start one process per arm (all of them, or only those not reused), wait, and
collect their child run ids.

Placement:
- `parallel`: every arm at the same time on its own GPU (CUDA_VISIBLE_DEVICES narrowed to it);
- `lockstep`: arms share one device and take turns batch by batch (callbacks/lockstep.py), so they see the
  same clocks and temperature and their per-batch latencies pair up;
- `sequential`: one after the other on the same device.
`auto` picks parallel when there are at least as many GPUs as arms, lockstep otherwise.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient

from lab import lifecycle, runs
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


def visible_gpus(cfg: Config) -> tuple[str, ...]:
    if cfg.devices == "cpu":
        return ()
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
    gpus = visible_gpus(cfg) if gpus is None else gpus
    placement = cfg.placement
    if placement == "auto":
        placement = "parallel" if gpus and len(gpus) >= n_arms else "lockstep"
    if placement == "parallel" and gpus and len(gpus) < n_arms:
        raise ValueError(f"placement: parallel needs one GPU per arm ({n_arms}), found {len(gpus)}; "
                         "use placement=lockstep or sequential")
    cores = os.cpu_count() or 1
    if not gpus:
        threads = max(1, cores // n_arms) if placement == "parallel" else cores
        return Plan(placement, "cpu", (), threads)
    return Plan(placement, "cuda", gpus[:n_arms] if placement == "parallel" else gpus[:1], 0)


def arm_command(cfg_path: Path, index: int, parent_run_id: str, experiment_id: str, p: Plan,
                error_file: Path, lockstep: str | None, world: int) -> list[str]:
    """The command line of one arm process (lab/arm.py)."""
    cmd = [sys.executable, "-m", "lab.arm", "--config", str(cfg_path), "--index", str(index),
           "--parent-run-id", parent_run_id, "--experiment-id", experiment_id, "--device", p.device,
           "--threads", str(p.threads), "--error-file", str(error_file), "--world-size", str(world)]
    return cmd + (["--lockstep", lockstep] if lockstep else [])


def arm_env(p: Plan, index: int) -> dict[str, str]:
    """The environment of one arm process: this one's, without the parent's run, narrowed to its GPU."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env["MLFLOW_TRACKING_URI"] = runs.tracking_uri()
    env["AB_PLACEMENT"] = p.placement
    lifecycle.set_http_defaults(env)  # a dead tracking server fails an arm's call in seconds, not minutes
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                      env.get("PYTHONPATH")]))
    if p.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = p.gpus[index] if p.placement == "parallel" else p.gpus[0]
    return env


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGKILL when the launcher dies, however it dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _stop(procs, grace_s: float = 10.0) -> None:
    running = [p for p in procs if p.poll() is None]
    for proc in running:
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
    world = len(names)
    if indices != everything:
        p, world = subset_plan(p), 1
    server = None
    if p.placement == "lockstep":
        from callbacks.lockstep import LockstepServer  # torch: imported only when arms take turns

        server = LockstepServer(world_size=world)
    procs: dict[int, subprocess.Popen] = {}
    codes: dict[int, int] = {}
    with tempfile.TemporaryDirectory(prefix="ablab-arms-") as tmp:
        errors = {i: Path(tmp) / f"arm{i}.err" for i in indices}

        def start(i: int) -> subprocess.Popen:
            cmd = arm_command(cfg_path, i, parent_run_id, experiment_id, p, errors[i],
                              server.address if server else None, world)
            procs[i] = subprocess.Popen(cmd, env=arm_env(p, i), preexec_fn=_die_with_parent)
            return procs[i]

        done = False
        try:
            if p.placement == "sequential":
                for i in indices:
                    codes[i] = start(i).wait()
            else:
                for i in indices:
                    start(i)
                _wait_all(procs, codes, server)
            done = True
        finally:
            _stop(procs.values())  # interrupted (Ctrl-C, an exception): no arm outlives the launcher
            if server is not None:
                server.close()
            settle_children(experiment_id, parent_run_id, procs, interrupted=not done)
        messages = {i: errors[i].read_text().strip() if errors[i].exists() else "" for i in indices}
    by_index = runs.children_of(MlflowClient(), experiment_id, parent_run_id)
    return [ArmOutcome(i, names[i], by_index.get(i), codes[i],
                       messages[i] or exit_line(names[i], codes[i]))
            for i in indices]


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


def _wait_all(procs: dict[int, subprocess.Popen], codes: dict[int, int], server) -> None:
    """Poll the arms running at once until every one has exited; a dead arm gives up its lockstep turns."""
    while len(codes) < len(procs):
        for i, proc in procs.items():
            if i not in codes and proc.poll() is not None:
                codes[i] = proc.returncode
                if server is not None:
                    server.reap(i)  # a dead arm must not keep the others waiting for its turn
        time.sleep(0.2)
