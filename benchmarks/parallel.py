"""Wall time of an A/B job's test stage against the same arms run alone.

    python benchmarks/parallel.py              # CPU: lockstep vs the two arms alone, small fake-data job
    python benchmarks/parallel.py --smoke      # seconds of measuring (plus process start-up): checks the script
    python benchmarks/parallel.py --device cuda --a resnet50 --b efficientnet_b3 --image_size 224 \\
        --batch_size 256 --precision bf16-mixed --channels_last --data device --batches 30

Placement comes from `lab.launch.plan` as in a real job: `parallel` (each arm on its own GPU) when there
are at least two GPUs, else `lockstep` (the arms take turns on one device, callbacks/lockstep.py).
Goals: parallel <= 1.10 x the slower arm alone; lockstep <= 1.05 x the sum of the two alone.

Each arm is a process that builds its model and data once and then runs the arm's test stage
(`lab.arm.make_trainer(...).test()` with `ArmModule` and `GPUTelemetry`, plus `Lockstep` in the job) as
often as this script tells it, through a TCPStore. A run starts when every process in it is ready, so
process start-up, imports and model building are left out of every figure; what is timed is from that
common start to the last arm's end. After one untimed run of each arm alone, each round runs A alone,
B alone and the job, in a rotating order. No MLflow: the arms log nowhere (`logger=False`).
Each round's three runs follow one another closely, so the figure is the median over rounds of each
round's job / (sum, or max, of its two arms alone). Prints a table, then that as `ratio=<x>` last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch.distributed import TCPStore

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
from overhead import DeviceBatches  # noqa: E402 - benchmarks/overhead.py, beside this file

from lab.config import Config, build_config  # noqa: E402
from lab.launch import plan  # noqa: E402

GOALS = {"lockstep": 1.05, "parallel": 1.10}
STORE_TIMEOUT = timedelta(seconds=600)


def job_config(args: argparse.Namespace, placement: str) -> Config:
    return build_config({
        "a": args.a, "b": args.b, "data": "fake", "fake_samples": args.batches * args.batch_size,
        "test_fraction": 1.0, "image_size": args.image_size, "epochs": 0, "allow_random_head": True,
        "batch_size": args.batch_size, "precision": args.precision, "channels_last": args.channels_last,
        "warmup_batches": min(2, args.batches - 1), "placement": placement,
        "devices": "cpu" if args.device == "cpu" else "auto", "lockstep_timeout_s": 300.0,
    })


# ---- an arm's process ----------------------------------------------------------------------------


def worker(address: str, rank: int) -> None:
    """Build arm `rank` once, then run its test stage whenever the controller says so."""
    warnings.filterwarnings("ignore")
    from callbacks.gpu_telemetry import GPUTelemetry
    from callbacks.lockstep import Lockstep
    from lab.arm import ArmContext, make_trainer
    from lab.data import ABDataModule, resolve_dataset
    from lab.models import ArmModule, preprocess_for, resolve_model

    host, port = address.rsplit(":", 1)
    store = TCPStore(host, int(port), None, False, timeout=STORE_TIMEOUT, wait_for_workers=False)
    spec = json.loads(store.get("spec"))
    args = argparse.Namespace(**spec["args"])
    cfg = job_config(args, spec["placement"])
    device = "cuda" if spec["device"] == "cuda" else "cpu"
    ctx = ArmContext(index=rank, parent_run_id="", experiment_id="", device=device)
    # Synthetic batches on the device need no dataset (one of this size could take GBs of host memory).
    num_classes = cfg.fake_classes if args.data == "device" else resolve_dataset(cfg).num_classes
    torch.manual_seed(cfg.seed)
    resolved = resolve_model(cfg.arm_specs[rank], cfg, num_classes)
    module = ArmModule(resolved.module, num_classes, channels_last=cfg.channels_last, arch=resolved.arch)
    if cfg.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if args.data == "device":
        batches = DeviceBatches(cfg.batch_size, cfg.image_size, num_classes, args.batches, torch.device(device),
                                cfg.channels_last)
        data: dict[str, Any] = {"dataloaders": batches}
    else:
        data = {"datamodule": ABDataModule(cfg, preprocess_for(cfg, resolved.native))}
    if spec["cudnn_benchmark"]:
        torch.backends.cudnn.benchmark = True
    store.set(f"up/{rank}", "1")

    for seq in range(10_000):
        key = f"cmd/{rank}/{seq}"
        store.wait([key])
        cmd = json.loads(store.get(key))
        if cmd["op"] == "exit":
            return
        if cmd["threads"]:
            torch.set_num_threads(cmd["threads"])
        lockstep = Lockstep(cmd["lockstep"], rank, 2, timeout_s=cfg.lockstep_timeout_s) if cmd["lockstep"] else None
        telemetry = GPUTelemetry(warmup_batches=cfg.warmup_batches, sync=cfg.telemetry_sync)
        trainer = make_trainer(cfg, ctx, False, [c for c in (lockstep, telemetry) if c is not None], 1)
        store.add(f"ready/{cmd['run']}", 1)
        store.wait([f"go/{cmd['run']}"])
        start = time.time()
        trainer.test(module, verbose=False, **data)
        if lockstep is not None:
            lockstep.finish()
        end = time.time()
        store.set(f"done/{rank}/{seq}", json.dumps({
            "start": start, "end": end, "throughput_img_per_s": telemetry.summary.get("throughput_img_per_s"),
            "n_images": int(telemetry.batches["batch_size"].sum())}))


# ---- the controller ------------------------------------------------------------------------------


class Arms:
    """Two arm processes and the store that drives them."""

    def __init__(self, args: argparse.Namespace, placement: str, device: str, gpus: tuple[str, ...],
                 logdir: Path) -> None:
        self.store = TCPStore("127.0.0.1", 0, None, True, timeout=STORE_TIMEOUT, wait_for_workers=False)
        self.store.set("spec", json.dumps({"args": vars(args), "placement": placement, "device": device,
                                           "cudnn_benchmark": args.cudnn_benchmark}))
        self.seq = [0, 0]
        self.runs = 0
        self.logs = [logdir / f"arm{rank}.log" for rank in range(2)]
        self.procs = []
        for rank in range(2):
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
            if device == "cuda":
                env["CUDA_VISIBLE_DEVICES"] = gpus[rank] if placement == "parallel" else gpus[0]
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", f"127.0.0.1:{self.store.port}",
                   "--rank", str(rank)]
            with self.logs[rank].open("w") as log:
                self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        for rank in range(2):
            self._wait(f"up/{rank}")

    def _wait(self, key: str) -> None:
        deadline = time.monotonic() + STORE_TIMEOUT.total_seconds()
        while not self.store.check([key]):
            for rank, proc in enumerate(self.procs):
                if proc.poll() is not None:
                    tail = self.logs[rank].read_text()[-3000:]
                    raise RuntimeError(f"arm {rank} exited with code {proc.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {key} after {STORE_TIMEOUT}")
            time.sleep(0.05)

    def run(self, ranks: tuple[int, ...], threads: int, lockstep: bool) -> dict[str, Any]:
        """Run the test stage of `ranks` together (lockstep or not); seconds from the common start to the end."""
        server = None
        if lockstep:
            from callbacks.lockstep import LockstepServer

            server = LockstepServer(world_size=2)
        run = self.runs
        self.runs += 1
        keys = []
        for rank in ranks:
            key = f"cmd/{rank}/{self.seq[rank]}"
            self.store.set(key, json.dumps({"op": "test", "run": run, "threads": threads,
                                            "lockstep": server.address if server else None}))
            keys.append(f"done/{rank}/{self.seq[rank]}")
            self.seq[rank] += 1
        while int(self.store.add(f"ready/{run}", 0)) < len(ranks):
            self._wait_quietly()
        self.store.set(f"go/{run}", "1")
        for key in keys:
            self._wait(key)
        if server is not None:
            server.close()
        results = [json.loads(self.store.get(key)) for key in keys]
        wall = max(r["end"] for r in results) - min(r["start"] for r in results)
        return {"ranks": list(ranks), "wall_s": wall, "arms": results}

    def _wait_quietly(self) -> None:
        for rank, proc in enumerate(self.procs):
            if proc.poll() is not None:
                raise RuntimeError(f"arm {rank} exited with code {proc.returncode}:\n"
                                   f"{self.logs[rank].read_text()[-3000:]}")
        time.sleep(0.01)

    def close(self) -> None:
        for rank in range(2):
            self.store.set(f"cmd/{rank}/{self.seq[rank]}", json.dumps({"op": "exit"}))
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Alone, alone, job, for --rounds rounds; the job's placement as `lab.launch.plan` would choose it."""
    p = plan(job_config(args, args.placement), 2)
    placement = p.placement
    alone_threads = plan(job_config(args, "sequential"), 2).threads
    with tempfile.TemporaryDirectory(prefix="ablab-parallel-") as tmp:
        arms = Arms(args, placement, p.device, p.gpus, Path(tmp))
        try:
            arms.run((0,), alone_threads, False), arms.run((1,), alone_threads, False)  # untimed warm-up
            rounds = []
            for i in range(args.rounds):
                kinds = ["a", "b", "job"]
                kinds = kinds[i % 3:] + kinds[:i % 3]
                row: dict[str, Any] = {"round": i, "order": kinds}
                for kind in kinds:
                    if kind == "job":
                        row["job"] = arms.run((0, 1), p.threads, placement == "lockstep")
                    else:
                        row[kind] = arms.run((0 if kind == "a" else 1,), alone_threads, False)
                rounds.append(row)
        finally:
            arms.close()
    combine = sum if placement == "lockstep" else max
    for row in rounds:
        row["ratio"] = row["job"]["wall_s"] / combine([row["a"]["wall_s"], row["b"]["wall_s"]])
    med = {k: statistics.median(r[k]["wall_s"] for r in rounds) for k in ("a", "b", "job")}
    return {"placement": placement, "device": p.device, "gpus": list(p.gpus), "threads_job": p.threads,
            "threads_alone": alone_threads, "a": args.a, "b": args.b, "image_size": args.image_size,
            "batch_size": args.batch_size, "batches": args.batches, "precision": args.precision,
            "rounds": rounds, "median_s": med, "ratio_of_medians": med["job"] / combine([med["a"], med["b"]]),
            "ratio": statistics.median(r["ratio"] for r in rounds), "goal": GOALS[placement]}


def print_result(result: dict[str, Any]) -> None:
    combine = "a + b" if result["placement"] == "lockstep" else "max(a, b)"
    print(f"{result['a']} (a) vs {result['b']} (b) on {result['device']}, placement={result['placement']}, "
          f"{result['image_size']} px, batch {result['batch_size']} x {result['batches']} per arm, "
          f"precision {result['precision']}, threads alone/job {result['threads_alone']}/{result['threads_job']}")
    print(f"{'round':>5} {'a alone s':>10} {'b alone s':>10} {'job s':>8} {'job/(' + combine + ')':>16}")
    for r in result["rounds"]:
        print(f"{r['round']:>5} {r['a']['wall_s']:10.3f} {r['b']['wall_s']:10.3f} {r['job']['wall_s']:8.3f} "
              f"{r['ratio']:16.4f}")
    med = result["median_s"]
    print(f"{'median':>5} {med['a']:10.3f} {med['b']:10.3f} {med['job']:8.3f} {result['ratio']:16.4f}")
    print(f"median of the rounds' job / ({combine}): {result['ratio']:.4f} (goal <= {result['goal']}); "
          f"of the medians: {result['ratio_of_medians']:.4f}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", default="resnet10t")
    p.add_argument("--b", default="mobilenetv3_small_100")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--placement", default="auto", choices=["auto", "lockstep", "parallel"])
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--batches", type=int, default=12, help="test batches per arm and run")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--precision", default="32", choices=["32", "16-mixed", "bf16-mixed"])
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--data", choices=["loader", "device"], default=None,
                   help="loader: the arm's DataLoader (CPU default); device: one batch on the device (GPU default)")
    p.add_argument("--cudnn_benchmark", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny and quick: checks that the script works")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        worker(args.worker, args.rank)
        return 0
    if args.smoke:
        args.image_size, args.batch_size, args.batches, args.rounds = 32, 16, 3, 1
    args.data = args.data or ("device" if args.device == "cuda" else "loader")
    result = measure(args)
    print_result(result)
    print(f"ratio={result['ratio']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
