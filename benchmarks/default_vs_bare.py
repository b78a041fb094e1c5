"""How much slower is the default job (`python -m lab run`) than a bare PyTorch script doing the same work?

    python benchmarks/default_vs_bare.py               # 3 rounds, alternating which side goes first (~4 min)
    python benchmarks/default_vs_bare.py --rounds 1    # one round: bare, then the default job
    python benchmarks/default_vs_bare.py --bare        # the bare script alone, in this process

The bare script (`bare()` below) is what a person would write by hand: the same data (scikit-learn's digits, the
same seeded 70/30 split, resized to 32 px with the same normalisation), the same two timm models from the same
seed, the same 4 epochs of AdamW with a one-cycle schedule and the same batch size, then a test pass collecting
per-sample predictions; one model after the other in one process, no MLflow, no Lightning.
Both sides are timed as whole processes from start to exit: interpreter start and imports count, as they do for
a person waiting for the job. ablab runs with a temporary SQLite store (and artifacts) in a temporary folder.
Before the first round both sides' libraries are imported once, untimed: a cold page cache (after a reboot, or a
big install) added 10 s to whichever side went first.
Prints each round, then `default_vs_bare: bare_s=.. ablab_s=.. ratio=..` with the median of the rounds' own
ratios (each round pairs the two sides minutes apart; goal: ratio <= 1.3), how many rounds met the goal, and
`cpu_ratio`: the same for the CPU seconds of each side's processes, steadier where other jobs share the cores.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL = 1.3
# The default job's recipe (configs/default.yaml and lab/config.py's defaults).
A, B, SEED, EPOCHS, BATCH, IMAGE_SIZE, LR, WEIGHT_DECAY, TEST_FRACTION = (
    "resnet18", "mobilenetv3_small_100", 0, 4, 64, 32, 0.002, 0.05, 0.3)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def bare(models: tuple[str, ...] = (A, B), epochs: int = EPOCHS) -> dict[str, float]:
    """Fine-tune and test each model in turn, the plain PyTorch way; returns each model's test accuracy."""
    import numpy as np
    import timm
    import torch
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader, Dataset
    from torchvision.transforms import v2

    digits = load_digits()
    images = np.repeat(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int64)
    perm = np.random.default_rng(SEED).permutation(len(images))
    n_test = round(len(images) * TEST_FRACTION)
    train_ids, test_ids = np.sort(perm[n_test:]), np.sort(perm[:n_test])
    transform = v2.Compose([v2.Resize(IMAGE_SIZE, antialias=True), v2.CenterCrop(IMAGE_SIZE),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])

    class Digits(Dataset):
        def __init__(self, ids: np.ndarray) -> None:
            self.ids = ids

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int):
            j = self.ids[i]
            x = transform(torch.from_numpy(np.ascontiguousarray(images[j])).permute(2, 0, 1))
            return x, int(labels[j]), int(j)

    accuracies = {}
    for name in models:
        torch.manual_seed(SEED)
        model = timm.create_model(name, pretrained=False, num_classes=10)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        train = DataLoader(Digits(train_ids), batch_size=BATCH, shuffle=True,
                           generator=torch.Generator().manual_seed(SEED))
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=max(1, epochs * len(train)),
                                                       pct_start=0.15)
        model.train()
        for _ in range(epochs):
            for x, y, _ids in train:
                loss = torch.nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
        model.eval()
        outputs = []
        with torch.inference_mode():
            for x, y, ids in DataLoader(Digits(test_ids), batch_size=BATCH):
                outputs.append((ids, y, model(x).softmax(dim=-1)))
        ids, y, probs = (torch.cat(parts).numpy() for parts in zip(*outputs, strict=True))
        accuracies[name] = float((probs.argmax(1) == y).mean())
    return accuracies


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], env: dict[str, str], cwd: str) -> tuple[float, float]:
    """Wall seconds of one process, start to exit, and the CPU seconds of it and every process it waited for;
    its output is shown only if it fails."""
    start, cpu = time.perf_counter(), _children_cpu_s()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"default_vs_bare: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return seconds, _children_cpu_s() - cpu


def predictions_sha256(tracking_uri: str) -> dict[str, str]:
    """sha256 of each child run's predictions.parquet in the store (and, after its name, the kind of process
    that ran it: `forked` from the fork server, or `fresh`): a change meant to be faster must leave them
    byte-identical (same seed, same data order, same arithmetic)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`ab.role` = 'child'")
    digests = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            path = client.download_artifacts(run.info.run_id, "predictions/predictions.parquet", tmp)
            name = f"{run.data.tags['ab.model']} ({run.data.tags.get('ab.arm_process', '?')})"
            digests[name] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return digests


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="bare/ablab pairs, alternating which goes first")
    p.add_argument("--bare", action="store_true", help="run the bare script here and print the accuracies")
    args = p.parse_args(argv)
    if args.bare:
        print(" ".join(f"{name}={acc:.4f}" for name, acc in bare().items()))
        return 0
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # the digests' downloads, in this process
    rows: list[dict[str, tuple[float, float]]] = []
    warm = "import torch, torchvision, timm, lightning, mlflow, sklearn.datasets, pyarrow.parquet"
    subprocess.run([sys.executable, "-c", warm], check=True)  # the page cache, for both sides alike
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="ablab-default-vs-bare-") as tmp:
            env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
            env.pop("MLFLOW_RUN_ID", None)
            sides = {"bare": [sys.executable, str(Path(__file__).resolve()), "--bare"],
                     "ablab": [sys.executable, "-m", "lab", "run"]}
            order = list(sides) if i % 2 == 0 else list(sides)[::-1]
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
            row = {side: timed(sides[side], env, tmp) for side in order}
            digests = predictions_sha256(env["MLFLOW_TRACKING_URI"])
        rows.append(row)
        (bare_s, bare_cpu), (ablab_s, ablab_cpu) = row["bare"], row["ablab"]
        print(f"round {i}: bare_s={bare_s:.1f} ablab_s={ablab_s:.1f} ratio={ablab_s / bare_s:.3f} "
              f"(cpu: bare {bare_cpu:.1f} s, ablab {ablab_cpu:.1f} s, ratio {ablab_cpu / bare_cpu:.3f}; "
              f"first: {order[0]})", flush=True)
        print("  predictions sha256: " + ", ".join(f"{m} {d[:16]}" for m, d in sorted(digests.items())), flush=True)
    # On a busy machine the CPU seconds are the steadier figure; the goal is about the wall time a person waits.
    # Each round's ratio pairs the two sides as close in time as they can be; the medians of each side's times
    # (printed too) may pair a fast minute of one with a slow minute of the other.
    ratios = [r["ablab"][0] / r["bare"][0] for r in rows]
    cpu_ratio = statistics.median(r["ablab"][1] / r["bare"][1] for r in rows)
    bare_s, ablab_s = (statistics.median(r[side][0] for r in rows) for side in ("bare", "ablab"))
    met = sum(ratio <= GOAL for ratio in ratios)
    print(f"default_vs_bare: bare_s={bare_s:.1f} ablab_s={ablab_s:.1f} ratio={statistics.median(ratios):.3f} "
          f"(rounds {min(ratios):.3f}-{max(ratios):.3f}, {met} of {len(ratios)} <= {GOAL}) "
          f"cpu_ratio={cpu_ratio:.3f} (goal: ratio <= {GOAL})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
