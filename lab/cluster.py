"""`placement=ray`: every arm a Ray task, scheduled anywhere in a Ray cluster, that runs the same arm process
as on one machine (`python -m lab.arm ...`) and reports to the shared tracking server.

    python -m lab run --placement ray --ray_address local          # a Ray instance started here
    RAY_ADDRESS=ray://head:10001 python -m lab run --placement ray  # an existing cluster (KubeRay, SLURM)

The driver connects once in `connect` (from `launch.plan`, before the parent run exists, so that a tracking store
the workers cannot reach is refused as bad input), then `run_arms` submits one task per arm and collects each
outcome: the arm's exit code and error line, or "lost" when its worker or node died. Each task asks for
`devices_per_arm` GPUs on a GPU cluster, else `ray_cpus_per_arm` CPUs, and is never retried: a retried arm would
leave a second child run. Code and config travel in Ray's runtime environment only where the workers are on
other machines; a cluster on this machine already has the code on disk.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.entities import RunTag

from lab import lifecycle, runs
from lab.config import Config

ROOT = Path(__file__).resolve().parent.parent
# The arm's command line as the launcher builds it has these two slots; the worker fills them with its own paths.
CONFIG_SLOT, ERROR_SLOT = "{ablab-config}", "{ablab-error}"
# What never travels to a remote cluster with the code (.gitignore's outputs, environments, stores).
EXCLUDES = [".venv/", "venv/", ".git/", "mlruns/", "mlartifacts/", "*.db", "test-outputs/", "outputs/", ".cache/",
            "__pycache__/", ".pytest_cache/", ".ruff_cache/", "*.egg-info/", ".import_linter_cache/"]
# Variables the arm process needs from the driver (credentials, retries); the rest is the worker's own.
FORWARDED = ("MLFLOW_", "HF_HUB_OFFLINE", "AB_DEBUG", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
EXTRA_ENV = "AB_RAY_RUNTIME_ENV"  # JSON merged into the runtime env, e.g. {"pip": ["timm==1.0.15"]} or {"uv": [...]}
LOST = 1  # return code given to an arm whose worker or node died: it has no exit code


@dataclass(frozen=True)
class Connection:
    """What the driver learned from the cluster; kept until `run_arms` is done with it."""

    started_here: bool  # this job called ray.init (and so shuts it down)
    nodes: int
    remote: bool  # workers on other machines: the code travels in the runtime env
    gpus: float
    runtime_env: dict = field(default_factory=dict)  # what travels with each task (runtime_env())


_connection: Connection | None = None


@dataclass(frozen=True)
class ArmResult:
    """One arm's outcome as Ray reported it."""

    index: int
    run_id: str | None
    returncode: int
    error: str  # "" when the arm wrote none and exited normally or by a signal (the launcher words it)


def connect(cfg: Config) -> tuple[str, int]:
    """Connect to (or, with ray_address=local, start) the cluster and check that it can run this job;
    return the arms' device (cpu | cuda) and torch threads per arm. One-line ValueError when it cannot."""
    global _connection
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every arm's lines, not "[repeated 2x across cluster]"
    try:
        import ray
    except ImportError:
        raise ValueError("placement: ray needs Ray installed; run pip install -e \".[ray]\" (or pick another "
                         "placement)") from None
    started = not ray.is_initialized()
    if started:
        quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
        try:
            if cfg.ray_address == "local":
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
            else:
                address = os.environ.get("RAY_ADDRESS", "auto") if cfg.ray_address == "auto" else cfg.ray_address
                ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ValueError(f"ray_address: no Ray cluster at {cfg.ray_address} ({runs.one_line(err)[:160]}); start "
                             "one (ray start --head), set RAY_ADDRESS, or use ray_address=local") from None
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = {"127.0.0.1", ray.util.get_node_ip_address()}
    remote = cfg.ray_address.startswith("ray://") or any(n["NodeManagerAddress"] not in here for n in nodes)
    _connection = Connection(started, len(nodes), remote, float(ray.cluster_resources().get("GPU", 0)))
    try:
        env = runtime_env(remote, ray.get_runtime_context().runtime_env or {}, os.environ.get(EXTRA_ENV))
        _connection = replace(_connection, runtime_env=env)
        check_tracking(runs.tracking_uri(), _connection)
    except ValueError:
        disconnect()
        raise
    if cfg.devices != "cpu" and _connection.gpus >= cfg.devices_per_arm:
        return "cuda", 0
    # A fine-tune's float sums depend on the torch thread count: a local instance is this machine, so its arms use
    # the threads `sequential` would, and their weights and predictions are identical to it. On a cluster each
    # arm uses the CPUs it asked for.
    return "cpu", (os.cpu_count() or 1) if cfg.ray_address == "local" else cfg.ray_cpus_per_arm


def check_tracking(uri: str, conn: Connection) -> None:
    """A store on this machine's disk (sqlite:, file:, a path) cannot take the runs of arms on other nodes."""
    scheme = urlparse(uri).scheme
    if scheme not in ("sqlite", "file", "") or not (conn.nodes > 1 or conn.remote):
        return
    where = f"{conn.nodes} nodes" if conn.nodes > 1 else "workers on other machines"
    raise ValueError(f"tracking: {uri} is on this machine's disk, but the Ray cluster has {where}; start "
                     "`mlflow server --serve-artifacts` and set MLFLOW_TRACKING_URI=http://<host>:5000")


def disconnect() -> None:
    """Leave the cluster if this job joined it (a local instance started here stops with it)."""
    global _connection
    import ray

    if _connection is not None and _connection.started_here:
        ray.shutdown()
    _connection = None


def runtime_env(remote: bool, job_env: dict, extra: str | None) -> dict:
    """Code and config travel with the task only to workers on other machines, and not when the driver is a Ray
    job that already ships a working_dir; plus whatever AB_RAY_RUNTIME_ENV (`extra`) adds: pip, uv, env_vars."""
    env: dict = {"working_dir": str(ROOT), "excludes": EXCLUDES} if remote and "working_dir" not in job_env else {}
    if extra:
        try:
            added = json.loads(extra)
        except json.JSONDecodeError as err:
            raise ValueError(f"{EXTRA_ENV}: not JSON ({err.msg}); give e.g. '{{\"pip\": [\"timm\"]}}'") from None
        if not isinstance(added, dict):
            raise ValueError(f"{EXTRA_ENV}: expected a JSON object like '{{\"pip\": [\"timm\"]}}', got {extra!r}")
        env |= added
    return env


def driver_env() -> dict[str, str]:
    """What the arm process gets from the driver: the tracking server, its credentials, bounded retries."""
    env = {k: v for k, v in os.environ.items()
           if k.startswith(FORWARDED) and k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env["MLFLOW_TRACKING_URI"] = runs.tracking_uri()
    env["AB_PLACEMENT"] = "ray"
    lifecycle.set_http_defaults(env)
    lifecycle.set_openmp_defaults(env)  # the arm's process imports torch after this: the worker's default spins
    return env


def arm_task(index: int, argv: list[str], config_yaml: str, env: dict[str, str], cwd: str | None) -> dict:
    """Runs on a Ray worker: the arm process with the config written here; its exit code, error line, and
    where it ran. A cancelled task (Ctrl-C on the driver) stops the arm with SIGTERM: it ends its run KILLED."""
    import ray

    with tempfile.TemporaryDirectory(prefix="ablab-arm-") as tmp:
        cfg_path, err_path = Path(tmp) / "config.yaml", Path(tmp) / "arm.err"
        cfg_path.write_text(config_yaml)
        slots = {CONFIG_SLOT: str(cfg_path), ERROR_SLOT: str(err_path)}
        cmd = [sys.executable, *(slots.get(a, a) for a in argv)]
        # Not Ray's OMP_NUM_THREADS (the task's CPUs): the arm sets its threads as on one machine (--threads).
        proc_env = {k: v for k, v in os.environ.items()
                    if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "OMP_NUM_THREADS")}
        proc_env |= env
        # ROOT as this module was imported on the worker: its own copy of the code (a working_dir, or on disk).
        proc_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), proc_env.get("PYTHONPATH")]))
        proc = subprocess.Popen(cmd, env=proc_env, cwd=cwd if cwd and os.path.isdir(cwd) else None,
                                preexec_fn=lifecycle.die_with_parent)
        try:
            code = proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        error = err_path.read_text().strip() if err_path.exists() else ""
    node = {"ab.ray_node_id": ray.get_runtime_context().get_node_id(), "ab.ray_node_ip": ray.util.get_node_ip_address(),
            "ab.ray_gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()) or "none", "ab.node": socket.gethostname()}
    return {"index": index, "returncode": code, "error": error, "node": node}


def run_arms(cfg: Config, parent_run_id: str, experiment_id: str, device: str, argv: dict[int, list[str]],
             indices: Sequence[int]) -> list[ArmResult]:
    """One task per arm at `indices` (argv: each arm's command line after the interpreter, with the two slots);
    wait for all. A lost worker fails that arm only; Ctrl-C cancels every task and ends their runs KILLED."""
    import ray

    if _connection is None:
        connect(cfg)
    cpus = cfg.ray_cpus_per_arm * (1 if device == "cuda" else cfg.devices_per_arm)  # CPU DDP: a process per device
    resources = {"num_cpus": cpus, **({"num_gpus": cfg.devices_per_arm} if device == "cuda" else {})}
    conn = _connection
    task = ray.remote(arm_task).options(max_retries=0, runtime_env=conn.runtime_env or None, **resources)
    cwd = None if conn.remote else os.getcwd()  # a cluster on this machine: the arm starts where the driver did
    env, yaml = driver_env(), cfg.to_yaml()
    refs = {task.remote(i, argv[i], yaml, env, cwd): i for i in indices}
    results: dict[int, dict] = {}
    lost: dict[int, str] = {}
    try:
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in done:
                try:
                    results[refs[ref]] = ray.get(ref)
                except Exception as err:  # the worker or its node died, or the task itself failed
                    lost[refs[ref]] = lost_line(cfg.arm_names[refs[ref]], err)
    except BaseException:  # Ctrl-C, SIGTERM: no task outlives the driver, no run is left RUNNING
        cancel(list(refs))
        settle(experiment_id, parent_run_id, results, {i: "interrupted" for i in indices if i not in results},
               interrupted=True)
        raise
    finally:
        disconnect()
    return settle(experiment_id, parent_run_id, results, lost)


def lost_line(name: str, err: BaseException) -> str:
    """Why an arm has no exit code: its worker or node died, or the task failed before the arm ran."""
    from ray import exceptions as rex

    if isinstance(err, rex.NodeDiedError):
        return f"arm {name} lost: node died"
    if isinstance(err, (rex.WorkerCrashedError, rex.OwnerDiedError, rex.LocalRayletDiedError)):
        return f"arm {name} lost: worker died"
    if isinstance(err, rex.TaskCancelledError):
        return f"arm {name} lost: task cancelled"
    cause = getattr(err, "cause", None) or err
    return f"arm {name} lost: {runs.one_line(cause)[:200]}"


def cancel(refs: list, grace_s: float = 15.0) -> None:
    """Cancel every task: first as a KeyboardInterrupt in the task (the arm ends its run KILLED), then by force."""
    import ray

    for ref in refs:
        ray.cancel(ref, force=False)
    deadline = time.monotonic() + grace_s
    pending = list(refs)
    while pending and time.monotonic() < deadline:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
    for ref in pending:
        ray.cancel(ref, force=True)


def settle(experiment_id: str, parent_run_id: str, results: dict[int, dict], lost: dict[int, str],
           interrupted: bool = False) -> list[ArmResult]:
    """Every task has ended: tag each child with where it ran, and end a child left RUNNING with the reason
    (its worker lost, killed by a signal, or interrupted with the job). Best effort where the server is gone:
    `python -m lab doctor --fix` ends what is left."""
    client = MlflowClient()
    try:
        children = runs.children_of(client, experiment_id, parent_run_id)
    except Exception:
        children = {}
    out: list[ArmResult] = []
    for i in sorted(set(results) | set(lost)):
        run_id, line = children.get(i), lost.get(i, "")
        try:
            if run_id is not None and i in results:
                client.log_batch(run_id, tags=[RunTag(k, v) for k, v in results[i]["node"].items()])
                lifecycle.settle_arm(client, run_id, results[i]["returncode"], interrupted)
            elif run_id is not None and interrupted:
                lifecycle.settle_arm(client, run_id, None, True)
            elif run_id is not None:
                host = client.get_run(run_id).data.tags.get(lifecycle.HOST_TAG)
                line = f"{line} (node {host})" if host else line
                if client.get_run(run_id).info.status == "RUNNING":
                    lifecycle.end_run(client, run_id, line, "FAILED")
        except Exception:
            pass
        if i in results:
            out.append(ArmResult(i, run_id, results[i]["returncode"], results[i]["error"]))
        else:
            out.append(ArmResult(i, run_id, LOST, line))
    return out
