"""Wall time of a 4-arm job under `placement=ray` on a two-node local Ray cluster, against the same arms under
`placement=sequential` on this machine, both measured here in the same run.

    python benchmarks/ray_arms.py                       # 4 arms, fake data, no training: prints ratio=<ray/seq>
    python benchmarks/ray_arms.py --epochs 1 --rounds 2 # with a short fine-tune, median over two rounds
    python benchmarks/ray_arms.py --smoke               # 2 arms, tiny data: checks the script end to end
    python benchmarks/ray_arms.py --ddp                 # devices_per_arm=2 against one process (see ddp_vs_single)

What is timed is a whole `python -m lab run` (driver start, arms, comparison, report) against one real
`mlflow server` (SQLite-backed, artifacts proxied): a multi-node cluster needs one. The cluster is started
before the clock (a real one is already up) with the machine's cores split between its two nodes; each
arm task asks for one CPU, so two arms run at once, one per node, where `sequential` runs one arm at a time
with every core. Rounds alternate the order of the two jobs; the ratio is the median of ray / sequential.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
sys.path.insert(0, str(ROOT / "tests"))
from mlflow_servers import start_server  # noqa: E402 - tests/mlflow_servers.py: a real `mlflow server`

ARMS4 = "resnet10t,mobilenetv3_small_100,mobilenetv3_small_050,lcnet_050"


def job_args(args: argparse.Namespace) -> list[str]:
    arms = ",".join(args.arms.split(",")[:2]) if args.smoke else args.arms
    return ["--arms", arms, "--data", "fake", "--fake_samples", str(96 if args.smoke else args.fake_samples),
            "--image_size", "32", "--epochs", str(args.epochs), "--allow_random_head", "true",
            "--batch_size", "32", "--warmup_batches", "1", "--n_resamples", "1000", "--rerun", "true",
            "--log_model", "false"]


def timed_job(uri: str, experiment: str, extra: list[str], common: list[str], cwd: Path) -> float:
    """Seconds of one `python -m lab run`; raises with its last lines when it fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lab", "run", *common, "--experiment", experiment, *extra],
                          env=env, cwd=cwd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{experiment} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def ray_vs_sequential(args: argparse.Namespace) -> float:
    """Median over rounds of (4 arms as Ray tasks on two nodes) / (the same arms one after the other)."""
    from ray.cluster_utils import Cluster

    cores = os.cpu_count() or 2
    per_node = max(1, cores // 2)
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": per_node, "include_dashboard": False})
    nodes.add_node(num_cpus=per_node)
    nodes.wait_for_nodes()
    with tempfile.TemporaryDirectory(prefix="ablab-bench-ray-") as tmp:
        server = start_server(Path(tmp) / "server", f"sqlite:///{tmp}/mlflow.db")
        try:
            common = job_args(args)
            jobs = {"ray": ["--placement", "ray", "--ray_address", nodes.address],
                    "sequential": ["--placement", "sequential"]}
            ratios = []
            for r in range(args.rounds):
                order = list(jobs) if r % 2 == 0 else list(jobs)[::-1]
                seconds = {name: timed_job(server.uri, f"{name}-{r}", jobs[name], common, Path(tmp))
                           for name in order}
                ratios.append(seconds["ray"] / seconds["sequential"])
                print(f"round {r}: ray {seconds['ray']:.1f} s, sequential {seconds['sequential']:.1f} s, "
                      f"ratio {ratios[-1]:.2f}  ({per_node} CPU per node, 2 nodes, {cores} cores)", flush=True)
        finally:
            server.stop()
            nodes.shutdown()
    return statistics.median(ratios)


def ddp_vs_single(args: argparse.Namespace) -> float:
    """One arm with devices_per_arm=2 against the same arm in one process: benchmarks/ddp_arm.py's figure
    (its defaults; run that script for its options and table)."""
    import ddp_arm  # benchmarks/ddp_arm.py, beside this file

    return ddp_arm.ddp_vs_single(ddp_arm.parse(["--smoke"] if args.smoke else []))["ratio"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=ARMS4)
    parser.add_argument("--epochs", type=int, default=0)
    parser.add_argument("--fake_samples", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="two arms, tiny data, one round")
    parser.add_argument("--ddp", action="store_true", help="devices_per_arm=2 against one process instead")
    args = parser.parse_args()
    if args.smoke:
        args.rounds = 1
    ratio = ddp_vs_single(args) if args.ddp else ray_vs_sequential(args)
    print(f"ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
