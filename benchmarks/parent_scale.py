"""Time the parent's comparison at ImageNet and Open Images scale, end to end, fetch included (issue 12).

    python benchmarks/parent_scale.py                        # n=50,000 x 1,000 classes, then n=1,000,000
    python benchmarks/parent_scale.py --sizes 50000x1000     # one size
    python benchmarks/parent_scale.py --evaluate             # also mlflow.models.evaluate on 50,000 x 1,000

For each size it builds a real SQLite tracking store in a temporary folder and two finished child runs through
the tracking API, as `lab/arm.py` logs them: the tags the guard reads, predictions/predictions.parquet with
top-5 columns (more than 100 classes: `top1..5_class`, `top1..5_prob`), telemetry/batches.parquet and
metrics/per_class_accuracy.json. Then it runs the real parent, `python -m lab compare --a <run> --b <run>`, in
a fresh process (imports, fetch, guard, statistics, report, logging) and measures its wall time and peak RSS
(`os.wait4`). One line per size:

    parent_scale: n=50000 classes=1000 wall_s=<s> peak_rss_mb=<MB> report_mb=<MB> cpu_s=<s>

(`cpu_s`, the process's own CPU time, is what to compare on a shared, loaded machine.) `--baseline <dir>` times
another checkout's parent on the same runs (the commit before issue 12, say, unpacked with
`git archive <commit> | tar -x -C <dir>`) and prints the ratio baseline / this.

`--evaluate` runs `mlflow.models.evaluate(model_type="classifier")` on arm A's predictions of the first size in a
fresh process, stopped at `--evaluate-timeout` seconds or `--evaluate-memory-gb` of RSS, and prints the ratio
(`evaluate_s / ablab_s`; a lower bound, `>=`, when evaluate did not finish). Evaluate scores one model; the
parent scores two and compares them, so the ratio understates ablab's lead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
ACCURACY = {"a": 0.76, "b": 0.78}  # top-1, errors independent: about 35% of images flip (a hard case)
TOP5 = 0.93


def predictions(n: int, k: int, labels: np.ndarray, accuracy: float, seed: int) -> pd.DataFrame:
    """The table `lab/models/module.py` writes past 100 classes: top-1 right with `accuracy`, label in the
    top 5 with probability TOP5, decreasing probabilities."""
    rng = np.random.default_rng(seed)
    top = rng.integers(0, k, (n, 5))
    right = rng.random(n) < accuracy
    top[:, 0] = np.where(right, labels, np.where(top[:, 0] == labels, (labels + 1) % k, top[:, 0]))
    in_top5 = ~right & (rng.random(n) < (TOP5 - accuracy) / (1 - accuracy))
    top[in_top5, 1 + rng.integers(0, 4, int(in_top5.sum()))] = labels[in_top5]
    probs = np.sort(rng.dirichlet(np.ones(6), n).astype(np.float32)[:, :5], axis=1)[:, ::-1]
    frame = {"sample_id": np.arange(n, dtype=np.int64), "label": labels, "pred": top[:, 0],
             "confidence": probs[:, 0]}  # fmt: skip
    frame |= {f"top{j + 1}_class": top[:, j] for j in range(5)}
    frame |= {f"top{j + 1}_prob": probs[:, j] for j in range(5)}
    return pd.DataFrame(frame)


def child_run(client, experiment_id: str, name: str, n: int, k: int, labels: np.ndarray, seed: int,
              tmp: Path) -> str:
    """One finished child run, as an arm leaves it."""
    from mlflow.entities import Metric, Param, RunTag

    class_names = [f"n{10000000 + c:08d}" for c in range(k)]  # WordNet-like ids
    label_map = hashlib.sha256(json.dumps(class_names).encode()).hexdigest()[:16]
    run = client.create_run(experiment_id, run_name=f"{name}: model_{name}", tags={
        "ab.role": "child", "ab.arm": name, "ab.model": f"model_{name}", "ab.dataset": "imagefolder:/data/val",
        "ab.dataset_fingerprint": f"sha256:{'0' * 64}", "ab.num_classes": str(k), "ab.label_map": label_map,
        "ab.n_test": str(n), "ab.preprocess": "size=224", "ab.precision": "bf16-mixed", "ab.device": "cuda:H100",
        "ab.placement": "parallel", "ab.seed": "0", "ab.batch_size_final": "256"})
    run_id = run.info.run_id
    frame = predictions(n, k, labels, ACCURACY[name], seed)
    right = frame["pred"].to_numpy() == labels
    per_class = np.bincount(labels, weights=right, minlength=k) / np.maximum(np.bincount(labels, minlength=k), 1)
    batches = pd.DataFrame({"batch_idx": np.arange(-(-n // 256)), "batch_size": 256,
                            "latency_ms": np.random.default_rng(seed).normal(40, 2, -(-n // 256)),
                            "warmup": np.arange(-(-n // 256)) < 5})  # fmt: skip
    folder = tmp / name
    for sub in ("predictions", "telemetry", "metrics"):
        (folder / sub).mkdir(parents=True)
    frame.to_parquet(folder / "predictions" / "predictions.parquet", index=False)
    batches.to_parquet(folder / "telemetry" / "batches.parquet", index=False)
    (folder / "metrics" / "per_class_accuracy.json").write_text(json.dumps(dict(zip(class_names, per_class.tolist(),
                                                                                    strict=True))))
    for sub in ("predictions", "telemetry", "metrics"):
        client.log_artifacts(run_id, str(folder / sub), sub)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric("test_accuracy", float(right.mean()), now, 0),
                                      Metric("latency_ms_p50", 40.0, now, 0)],
                     params=[Param(key, value) for key, value in {"data": "imagefolder:/data/val", "seed": "0",
                                                                   "epochs": "0"}.items()],
                     tags=[RunTag("ab.complete", "true")])
    client.set_terminated(run_id, "FINISHED")
    return run_id


def rss_gb(pid: int) -> float:
    """Resident memory of a running process, from /proc (0 where unreadable)."""
    try:
        line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0.0
    return int(line.split()[1]) / 2**20


def timed(command: list[str], env: dict[str, str], timeout: float, memory_gb: float | None = None,
          cwd: Path = ROOT) -> tuple[float, float, float, int | None, str]:
    """(wall s, CPU s, peak RSS MB, exit code or None when killed at the timeout or past `memory_gb` of RSS,
    stderr tail) of one fresh process; `os.wait4` reads that process's own CPU time and peak RSS."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
        killed = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if not killed and (time.perf_counter() - start > timeout or (memory_gb and rss_gb(proc.pid) > memory_gb)):
                proc.kill()  # a shared machine: never let the baseline take all its memory
                killed = True
            time.sleep(0.02)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        err.seek(0)
        tail = err.read().decode(errors="replace")[-2000:]
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, usage.ru_maxrss / 1024, None if killed else proc.returncode, tail


def children(n: int, k: int, tmp: Path) -> tuple[str, str, str]:
    """(tracking URI, run A, run B): a SQLite store with two child runs of n predictions over k classes."""
    import mlflow

    uri = f"sqlite:///{tmp}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("children", artifact_location=(tmp / "artifacts").as_uri())
    labels = np.random.default_rng(n).integers(0, k, n)
    return (uri, child_run(client, experiment_id, "a", n, k, labels, 1, tmp),
            child_run(client, experiment_id, "b", n, k, labels, 2, tmp))


def parent(uri: str, run_a: str, run_b: str, root: Path, tmp: Path) -> tuple[float, float, float, float]:
    """(wall s, CPU s, peak RSS MB, report.html MB) of `python -m lab compare` from the checkout `root`."""
    import mlflow

    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(root)}
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    experiment = f"parents-{root.name}-{time.time_ns()}"
    command = [sys.executable, "-m", "lab", "compare", "--a", run_a, "--b", run_b, "--experiment", experiment]
    wall, cpu, rss, code, err = timed(command, env, timeout=600, cwd=root)
    if code != 0:
        raise SystemExit(f"parent_scale: the parent failed (exit {code}):\n{err}")
    client = mlflow.MlflowClient(uri)
    parents = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    report = Path(client.download_artifacts(parents[0].info.run_id, "comparison/report.html", str(tmp)))
    return wall, cpu, rss, report.stat().st_size / 2**20


EVALUATE = """
import sys, mlflow, pandas as pd
frame = pd.read_parquet(sys.argv[1], columns=["label", "pred"])
mlflow.set_tracking_uri(sys.argv[2])
with mlflow.start_run():
    mlflow.models.evaluate(data=frame, targets="label", predictions="pred", model_type="classifier")
"""


def evaluate(path: Path, tmp: Path, timeout: float, memory_gb: float) -> tuple[float, float, float, int | None]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/evaluate.db"}
    command = [sys.executable, "-c", EVALUATE, str(path), env["MLFLOW_TRACKING_URI"]]
    wall, cpu, rss, code, _ = timed(command, env, timeout, memory_gb)
    return wall, cpu, rss, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="50000x1000,1000000x1000", help="comma-separated <n>x<classes>")
    parser.add_argument("--evaluate", action="store_true", help="also time mlflow.models.evaluate (first size)")
    parser.add_argument("--evaluate-timeout", type=float, default=120.0)
    parser.add_argument("--evaluate-memory-gb", type=float, default=6.0, help="RSS at which evaluate is stopped")
    parser.add_argument("--baseline", type=Path, help="another ablab checkout (an older commit) timed on the same runs")
    args = parser.parse_args()
    first: tuple[float, float, Path, Path] | None = None
    with tempfile.TemporaryDirectory(prefix="parent_scale-") as root:
        for i, size in enumerate(args.sizes.split(",")):
            n, k = (int(v) for v in size.lower().split("x"))
            tmp = Path(root) / f"{n}x{k}"
            tmp.mkdir()
            uri, run_a, run_b = children(n, k, tmp)
            wall, cpu, rss, report_mb = parent(uri, run_a, run_b, ROOT, tmp)
            path = tmp / "a" / "predictions" / "predictions.parquet"
            print(f"parent_scale: n={n} classes={k} wall_s={wall:.2f} peak_rss_mb={rss:.0f} "
                  f"report_mb={report_mb:.2f} cpu_s={cpu:.2f}", flush=True)
            if args.baseline:
                old = parent(uri, run_a, run_b, args.baseline.resolve(), tmp)
                print(f"parent_scale_baseline: n={n} classes={k} wall_s={old[0]:.2f} peak_rss_mb={old[2]:.0f} "
                      f"report_mb={old[3]:.2f} cpu_s={old[1]:.2f}; ratio={old[0] / wall:.2f} (baseline / this, wall), "
                      f"cpu ratio={old[1] / cpu:.2f}", flush=True)
            if i == 0:
                first = (wall, cpu, path, tmp)
        if args.evaluate and first is not None:
            wall, cpu, path, tmp = first
            seconds, cpu_evaluate, rss, code = evaluate(path, tmp, args.evaluate_timeout, args.evaluate_memory_gb)
            how = ("finished" if code == 0 else f"failed (exit {code})" if code is not None
                   else f"stopped at the {args.evaluate_timeout:g} s / {args.evaluate_memory_gb:g} GB cap")
            bound = "" if code == 0 else ">="
            print(f"evaluate: mlflow.models.evaluate(model_type='classifier') {how} after {seconds:.1f} s "
                  f"(cpu_s={cpu_evaluate:.1f}), peak_rss_mb={rss:.0f}; ratio={bound}{seconds / wall:.1f} "
                  f"(evaluate_s / ablab_s), cpu ratio={bound}{cpu_evaluate / cpu:.1f}")


if __name__ == "__main__":
    main()
