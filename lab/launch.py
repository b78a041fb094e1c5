"""Place arms on devices, start one process per arm, wait, and collect their child run ids.

Placement:
- `parallel`: every arm at the same time on its own GPU (CUDA_VISIBLE_DEVICES narrowed to it);
- `lockstep`: arms share one device and take turns batch by batch (callbacks/lockstep.py), so they see the
  same clocks and temperature and their per-batch latencies pair up;
- `sequential`: one after the other on the same device.
`auto` picks parallel when there are at least as many GPUs as arms, lockstep otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

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
    import torch

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


def _arm_command(cfg_path: Path, index: int, parent_run_id: str, experiment_id: str, p: Plan,
                 error_file: Path, lockstep: str | None, world: int) -> list[str]:
    cmd = [sys.executable, "-m", "lab.arm", "--config", str(cfg_path), "--index", str(index),
           "--parent-run-id", parent_run_id, "--experiment-id", experiment_id, "--device", p.device,
           "--threads", str(p.threads), "--error-file", str(error_file), "--world-size", str(world)]
    return cmd + (["--lockstep", lockstep] if lockstep else [])


def _arm_env(p: Plan, index: int, tracking_uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["AB_PLACEMENT"] = p.placement
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                      env.get("PYTHONPATH")]))
    if p.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = p.gpus[index] if p.placement == "parallel" else p.gpus[0]
    return env


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGKILL when the launcher dies, however it dies."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

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


def run_arms(cfg: Config, cfg_path: Path, parent_run_id: str, experiment_id: str, tracking_uri: str,
             p: Plan) -> list[ArmOutcome]:
    """Start the arms as `p` says and wait for all of them; a failed arm never stops the others."""
    from mlflow import MlflowClient

    names = cfg.arm_names
    n = len(names)
    tmp = Path(tempfile.mkdtemp(prefix="ablab-arms-"))
    errors = [tmp / f"arm{i}.err" for i in range(n)]
    server = None
    if p.placement == "lockstep":
        from callbacks.lockstep import LockstepServer

        server = LockstepServer(world_size=n)

    def start(i: int) -> subprocess.Popen:
        address = server.address if server else None
        cmd = _arm_command(cfg_path, i, parent_run_id, experiment_id, p, errors[i], address, n)
        procs[i] = subprocess.Popen(cmd, env=_arm_env(p, i, tracking_uri), preexec_fn=_die_with_parent)
        return procs[i]

    procs: dict[int, subprocess.Popen] = {}
    codes: dict[int, int] = {}
    try:
        if p.placement == "sequential":
            for i in range(n):
                codes[i] = start(i).wait()
        else:
            for i in range(n):
                start(i)
            while len(codes) < n:
                for i, proc in procs.items():
                    if i not in codes and proc.poll() is not None:
                        codes[i] = proc.returncode
                        if server is not None:
                            server.reap(i)  # a dead arm must not keep the others waiting for its turn
                time.sleep(0.2)
    finally:
        _stop(procs.values())  # interrupted (Ctrl-C, an exception): no arm outlives the launcher
        if server is not None:
            server.close()

    runs = MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`ab.role` = 'child'")
    by_index = {int(r.data.tags.get("ab.arm_index", -1)): r.info.run_id for r in runs}
    outcomes = []
    for i, name in enumerate(names):
        err = errors[i].read_text().strip() if errors[i].exists() else ""
        if codes[i] != 0 and not err:
            err = f"arm {name} exited with code {codes[i]}"
        outcomes.append(ArmOutcome(i, name, by_index.get(i), codes[i], err))
    return outcomes
