"""One arm over `devices_per_arm=2` DDP ranks against the same arm in one process.

    python benchmarks/ddp_arm.py                 # CPU: two gloo ranks, each with half the cores, vs one process
    python benchmarks/ddp_arm.py --smoke         # a few batches: checks the script
    python benchmarks/ddp_arm.py --device cuda --a resnet50 --image_size 224 --batch_size 256 --images 20000

Each run is a real arm (`python -m lab.arm`, as the launcher starts it) under a parent run in a throwaway
SQLite store, so what is timed is everything an arm does: start-up, model, test, the gather and the logging.
The arm's own `throughput_img_per_s` (summed over ranks under DDP) is read back from its run: it leaves out
start-up. Rounds alternate the order. Prints a table, then `ratio=<ddp wall / single wall>` last.
`ddp_vs_single()` is what `benchmarks/ray_arms.py` (placement=ray) calls for the same figure.

On the CPU the ranks share the cores the single process has (threads split, as a job does), so ~1.0 is the
best to expect on an idle machine; on a loaded one a process with several OpenMP threads suffers most from the
contention, which flatters DDP (`--threads 1` gives each its one thread instead). The goal (ratio <= 0.6 with two
GPUs, on a test stage long enough to hide start-up) needs a box with two GPUs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from lab.config import build_config  # noqa: E402


def arm_config(args: argparse.Namespace, devices_per_arm: int) -> dict[str, Any]:
    return {"a": args.a, "b": "mobilenetv3_small_100", "data": "fake", "fake_samples": args.images,
            "fake_classes": 10, "test_fraction": 1.0, "image_size": args.image_size, "epochs": 0,
            "allow_random_head": True, "batch_size": args.batch_size, "warmup_batches": 2, "log_model": False,
            "devices_per_arm": devices_per_arm, "devices": "cpu" if args.device == "cpu" else "auto"}


def run_arm(folder: Path, values: dict[str, Any], device: str, threads: int, name: str) -> tuple[float, float]:
    """One arm end to end: (wall seconds, the run's throughput_img_per_s)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(name)
    parent = client.create_run(experiment_id, tags={"ab.role": "parent"}).info.run_id
    cfg_path = folder / f"{name}.yaml"
    cfg_path.write_text(build_config(values).to_yaml())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_RUN", "MLFLOW_EXPERIMENT"))}
    env |= {"MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "lab.arm", "--config", str(cfg_path), "--index", "0", "--parent-run-id", parent,
           "--experiment-id", experiment_id, "--device", device, "--threads", str(threads)]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    (run,) = client.search_runs([experiment_id], "tags.ab.role = 'child'")
    if run.info.status != "FINISHED":
        raise RuntimeError(f"{name}: the arm ended {run.info.status}: {run.data.tags.get('ab.error', '')}")
    return wall, run.data.metrics.get("throughput_img_per_s", float("nan"))


def ddp_vs_single(args: argparse.Namespace, devices_per_arm: int = 2) -> dict[str, float]:
    """Median wall time and throughput of the arm in one process and over `devices_per_arm` ranks."""
    threads = args.threads or (os.cpu_count() or 1) if args.device == "cpu" else 0
    walls: dict[str, list[float]] = {"single": [], "ddp": []}
    speeds: dict[str, list[float]] = {"single": [], "ddp": []}
    with tempfile.TemporaryDirectory(prefix="ablab-ddp-bench-") as tmp:
        for r in range(args.rounds):
            order = ("single", "ddp") if r % 2 == 0 else ("ddp", "single")
            for kind in order:
                values = arm_config(args, devices_per_arm if kind == "ddp" else 1)
                wall, speed = run_arm(Path(tmp), values, args.device, threads, f"{kind}-{r}")
                walls[kind].append(wall)
                speeds[kind].append(speed)
    out = {f"{kind}_wall_s": statistics.median(v) for kind, v in walls.items()}
    out |= {f"{kind}_img_per_s": statistics.median(v) for kind, v in speeds.items()}
    out["ratio"] = out["ddp_wall_s"] / out["single_wall_s"]
    out["throughput_ratio"] = out["ddp_img_per_s"] / out["single_img_per_s"]
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--a", default="resnet18")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of the arm on the CPU, split over its ranks (default: every core)")
    parser.add_argument("--smoke", action="store_true", help="a few small batches, one round")
    args = parser.parse_args(argv)
    if args.smoke:
        args.a, args.images, args.image_size, args.batch_size, args.rounds = "resnet10t", 96, 16, 16, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    result = ddp_vs_single(args)
    print(f"{'':8} {'wall_s':>8} {'img_per_s':>10}")
    for kind in ("single", "ddp"):
        print(f"{kind:8} {result[f'{kind}_wall_s']:8.2f} {result[f'{kind}_img_per_s']:10.1f}")
    print(f"throughput_ratio={result['throughput_ratio']:.3f}")
    print(f"ratio={result['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
