"""How much slower is an arm's full test loop than a bare inference loop over the same model and data?

    python benchmarks/overhead.py              # CPU: resnet18 at 64 px, batch 64 x 16, 4 rounds (minutes)
    python benchmarks/overhead.py --smoke      # seconds: a tiny model, checks that the script works
    python benchmarks/overhead.py --device cuda --model resnet50 --image_size 224 --batch_size 256 \\
        --precision bf16-mixed --channels_last --data device --batches 60

Full: what `lab/arm.py` runs for its test stage, in this process: `make_trainer(...).test()` with
`ArmModule` (softmax, outputs kept on the device, predictions table, accuracy, per-class accuracy,
confusion matrix), `GPUTelemetry`, an `MLFlowLogger` to a temporary SQLite store, and the arm's
end-of-test logging (`predictions.parquet`, per-class metrics). Lockstep is left out: taking turns is
benchmarks/parallel.py's subject. Without MLflow installed (the GPU machine) Lightning's `CSVLogger`
stands in and the predictions are written to a local file instead.
Bare: the same `nn.Module` under `torch.inference_mode()` (and autocast for mixed precision) over the
same batches, synchronised once at the end.

`--data loader` (the CPU default) feeds both from the arm's own DataLoader (`ABDataModule`, fake images);
`--data device` (the GPU default) from one synthetic batch already on the device, as timm's benchmark.py
does, so that neither side waits for a host pipeline. After one untimed round of each, bare and full
alternate (ABBA) for --rounds rounds. Each full round is timed whole (Trainer built, test, results logged:
`call`) and over its batches alone (first batch start to last batch end: `loop`). Prints a table, then
the medians, and last `ratio=<median full-call img/s / median bare img/s>`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from callbacks.gpu_telemetry import GPUTelemetry
from lab.arm import ArmContext, log_results, make_trainer
from lab.config import Config, build_config
from lab.data import ABDataModule, resolve_dataset
from lab.models import ArmModule, preprocess_for, resolve_model

GOAL = 0.97


class Stopwatch(Callback):
    """Wall time of the test epoch's batches: epoch start to the last batch's end (device synchronised)."""

    def __init__(self) -> None:
        self.start = self.end = 0.0

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _sync(pl_module.device)
        self.start = time.perf_counter()

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _sync(pl_module.device)
        self.end = time.perf_counter()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DeviceBatches:
    """One synthetic (images, labels, ids) batch made on the device, yielded `n` times, as timm's benchmark
    feeds its model; one iterable, so that Lightning does not take a list for several DataLoaders."""

    def __init__(self, batch_size: int, image_size: int, classes: int, n: int, device: torch.device,
                 channels_last: bool) -> None:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=fmt)
        self.batch = (x, torch.randint(0, classes, (batch_size,), device=device),
                      torch.arange(batch_size, device=device))
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter([self.batch] * self.n)


@dataclasses.dataclass
class Bench:
    """One model, its data and the two ways of running it."""

    cfg: Config
    ctx: ArmContext
    module: ArmModule
    device: torch.device
    datamodule: ABDataModule | None  # --data loader
    batches: DeviceBatches | None  # --data device
    n_images: int
    tracking_uri: str | None
    workdir: Path
    class_names: tuple[str, ...]
    telemetry: GPUTelemetry | None = None  # the last full round's

    def data(self):
        if self.batches is not None:
            return self.batches
        self.datamodule.setup("test")
        return self.datamodule.test_dataloader()

    def bare(self) -> float:
        """Seconds for one pass of the bare loop (the model already on the device)."""
        model = self.module.model.to(self.device).eval()
        fmt = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(self.cfg.precision)
        autocast = torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        _sync(self.device)
        start = time.perf_counter()
        with torch.inference_mode(), autocast:
            for x, *_ in self.data():
                model(x.to(self.device, non_blocking=True).contiguous(memory_format=fmt))
        _sync(self.device)
        return time.perf_counter() - start

    def full(self) -> tuple[float, float]:
        """Seconds for the arm's whole test stage, and for its batches alone."""
        logger, client, run_id = self._logger()
        telemetry, watch = GPUTelemetry(warmup_batches=self.cfg.warmup_batches), Stopwatch()
        start = time.perf_counter()
        trainer = make_trainer(self.cfg, self.ctx, logger, [telemetry, watch], 1)
        if self.batches is not None:
            trainer.test(self.module, dataloaders=self.batches, verbose=False)
        else:
            trainer.test(self.module, datamodule=self.datamodule, verbose=False)
        if client is not None:
            log_results(client, run_id, self.module, self.cfg.batch_size, self.class_names)
        else:  # the same end-of-test work, written locally
            self.module.predictions.to_parquet(self.workdir / "predictions.parquet", index=False)
            self.module.per_class_accuracy(), self.module.confusion_matrix()
        call = time.perf_counter() - start
        assert len(self.module.predictions) == self.n_images
        self.telemetry = telemetry
        return call, watch.end - watch.start

    def _logger(self):
        if self.tracking_uri is None:
            from lightning.pytorch.loggers import CSVLogger

            return CSVLogger(str(self.workdir), name="overhead"), None, None
        from lightning.pytorch.loggers import MLFlowLogger
        from mlflow import MlflowClient

        client = MlflowClient(self.tracking_uri)
        experiment = client.get_experiment_by_name("overhead") or client.get_experiment(
            client.create_experiment("overhead", artifact_location=(self.workdir / "artifacts").as_uri()))
        run_id = client.create_run(experiment.experiment_id).info.run_id
        return MLFlowLogger(tracking_uri=self.tracking_uri, run_id=run_id, log_model=False), client, run_id


def build(args: argparse.Namespace, workdir: Path) -> Bench:
    device = torch.device(args.device)
    n_images = args.batches * args.batch_size
    cfg = build_config({
        "a": args.model, "b": "resnet10t" if args.model != "resnet10t" else "resnet18", "data": "fake",
        "fake_samples": n_images, "fake_classes": args.classes, "test_fraction": 1.0, "image_size": args.image_size,
        "epochs": 0, "allow_random_head": True, "batch_size": args.batch_size, "precision": args.precision,
        "channels_last": args.channels_last, "warmup_batches": min(5, args.batches - 1), "num_workers": 0,
    })
    ctx = ArmContext(index=0, parent_run_id="", experiment_id="", device=device.type)
    torch.manual_seed(0)
    resolved = resolve_model(args.model, cfg, args.classes)
    module = ArmModule(resolved.module, args.classes, channels_last=args.channels_last, arch=args.model)
    if args.channels_last:
        module = module.to(memory_format=torch.channels_last)
    datamodule = batches = None
    if args.data == "device":  # no images on the host at all (a fake dataset of this size could take GBs)
        batches = DeviceBatches(args.batch_size, args.image_size, args.classes, args.batches, device,
                                args.channels_last)
        class_names = tuple(f"class_{i}" for i in range(args.classes))
    else:
        datamodule = ABDataModule(cfg, preprocess_for(cfg, None))
        class_names = resolve_dataset(cfg).class_names
    tracking_uri = None
    if not args.no_mlflow:
        try:
            import mlflow  # noqa: F401 - only whether it is there
        except ImportError:
            print("overhead: mlflow is not installed; logging to Lightning's CSVLogger instead", file=sys.stderr)
        else:
            tracking_uri = f"sqlite:///{workdir}/mlflow.db"
    return Bench(cfg, ctx, module, device, datamodule, batches, n_images, tracking_uri, workdir, class_names)


def measure(args: argparse.Namespace, references: Callable[[Bench], dict[str, Callable[[], float]]] | None = None
            ) -> dict[str, Any]:
    """Alternate the bare loop (and any other `references`: mode -> seconds for the same images) with the full
    one, round by round; returns the rounds, median img/s of each mode and the last round's telemetry."""
    with tempfile.TemporaryDirectory(prefix="ablab-overhead-") as tmp:
        bench = build(args, Path(tmp))
        modes = {"bare": bench.bare, **(references(bench) if references else {}), "full": bench.full}
        for run in modes.values():  # untimed: kernel selection, cudnn autotuning, MLflow's tables
            run()
        rows = []
        for i in range(args.rounds):
            names = list(modes)[::-1] if i % 2 else list(modes)
            for mode in names:
                seconds = modes[mode]()
                call, loop = seconds if isinstance(seconds, tuple) else (seconds, None)
                rows.append({"round": i, "mode": mode, "call_s": call, "loop_s": loop})
        n, telemetry = bench.n_images, bench.telemetry
        logger = "mlflow" if bench.tracking_uri else "csv"
    img_per_s = {m: statistics.median(n / r["call_s"] for r in rows if r["mode"] == m) for m in modes}
    full = [r for r in rows if r["mode"] == "full"]
    loop = statistics.median(n / r["loop_s"] for r in full)
    return {"model": args.model, "device": args.device, "image_size": args.image_size,
            "batch_size": args.batch_size, "batches": args.batches, "precision": args.precision,
            "channels_last": args.channels_last, "data": args.data, "logger": logger, "rounds": rows,
            "img_per_s": img_per_s, "full_loop_img_per_s": loop,
            "full_fixed_s": statistics.median(r["call_s"] - r["loop_s"] for r in full),
            "ratio": img_per_s["full"] / img_per_s["bare"], "loop_ratio": loop / img_per_s["bare"],
            "telemetry": telemetry.summary, "telemetry_tags": telemetry.tags}


def print_result(result: dict[str, Any]) -> None:
    n = result["batches"] * result["batch_size"]
    print(f"{result['model']} on {result['device']}, {result['image_size']} px, batch {result['batch_size']} x "
          f"{result['batches']}, precision {result['precision']}, channels_last={result['channels_last']}, "
          f"data={result['data']}, logger={result['logger']}")
    print(f"{'round':>5} {'mode':<5} {'call s':>8} {'img/s':>9} {'loop s':>8} {'loop img/s':>11}")
    for r in result["rounds"]:
        loop = f"{r['loop_s']:8.3f} {n / r['loop_s']:11.1f}" if r["loop_s"] is not None else ""
        print(f"{r['round']:>5} {r['mode']:<5} {r['call_s']:8.3f} {n / r['call_s']:9.1f} {loop}")
    medians = ", ".join(f"{mode} {v:.1f}" for mode, v in result["img_per_s"].items())
    print(f"median img/s: {medians} (full, batches alone: {result['full_loop_img_per_s']:.1f}; "
          f"fixed cost per test {result['full_fixed_s']:.3f} s)")
    print(f"full/bare: {result['ratio']:.4f} whole call, {result['loop_ratio']:.4f} batches alone "
          f"(goal >= {GOAL})")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", help="timm name, random weights (default resnet18)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--batches", type=int, default=16, help="test batches per round")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds of each loop (after one untimed)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--precision", default="32", choices=["32", "16-mixed", "bf16-mixed"])
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--data", choices=["loader", "device"], default=None,
                   help="loader: the arm's DataLoader (CPU default); device: one batch on the device (GPU default)")
    p.add_argument("--no_mlflow", action="store_true", help="log to Lightning's CSVLogger even if MLflow is there")
    p.add_argument("--smoke", action="store_true", help="a tiny, fast configuration that checks the script")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.smoke:
        args.model, args.image_size, args.batch_size, args.batches, args.rounds = "resnet10t", 32, 16, 4, 2
    args.data = args.data or ("device" if args.device == "cuda" else "loader")
    warnings.filterwarnings("ignore")
    result = measure(args)
    print_result(result)
    print(f"ratio={result['ratio']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
