"""One arm = one MLflow child run: resolve the model, fine-tune (optional), test, log predictions.

The launcher starts each arm as its own process:

    python -m lab.arm --config resolved.yaml --index 0 --parent-run-id <id> --experiment-id <id>

Every arm builds the same seeded data module; only the model (and, with `preprocess=native`, its input
transform) differs. Whatever happens, the child run ends FINISHED or FAILED with a one-line `ab.error` tag.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.config import Config, flat_params, load_config

OOM_MIN_BATCH = 1


@dataclass(frozen=True)
class ArmContext:
    """Where an arm runs and whom it reports to; set by the launcher."""

    index: int
    parent_run_id: str
    experiment_id: str
    device: str = "cpu"  # "cpu" or "cuda" (the launcher narrows CUDA_VISIBLE_DEVICES to one GPU)
    lockstep: str | None = None  # host:port of the lockstep server
    world_size: int = 1
    threads: int = 0


def preprocess_for(cfg: Config, native) -> Preprocess:  # noqa: F821 - imported lazily (torch)
    from lab.data import Preprocess

    if cfg.preprocess == "native" and native is not None:
        return native
    return Preprocess(input_size=cfg.image_size, mean=cfg.mean, std=cfg.std)


def create_child_run(cfg: Config, ctx: ArmContext) -> str:
    """A child run of the parent; created with the client, so an inherited MLFLOW_RUN_ID cannot hijack it."""
    from mlflow import MlflowClient

    name, spec = cfg.arm_names[ctx.index], cfg.arm_specs[ctx.index]
    tags = {"mlflow.parentRunId": ctx.parent_run_id, "mlflow.runName": f"{name}: {spec}", "ab.role": "child",
            "ab.arm": name, "ab.arm_index": str(ctx.index), "ab.model": spec}
    return MlflowClient().create_run(ctx.experiment_id, tags=tags, run_name=f"{name}: {spec}").info.run_id


def make_trainer(cfg: Config, ctx: ArmContext, logger, callbacks: list, max_epochs: int):
    """The Trainer of an arm's fit and test stages (benchmarks/overhead.py times the same one)."""
    import lightning as L
    from lightning.pytorch.callbacks import TQDMProgressBar

    return L.Trainer(
        accelerator="gpu" if ctx.device == "cuda" else "cpu", devices=1, precision=cfg.precision,
        max_epochs=max_epochs, logger=logger, callbacks=[*callbacks, TQDMProgressBar(process_position=ctx.index)],
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
        reload_dataloaders_every_n_epochs=1, deterministic=False, log_every_n_steps=50,
    )


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


@dataclass(frozen=True)
class StageResult:
    """What the test stage left: its telemetry and the batch size it finished with."""

    telemetry: Any  # callbacks.gpu_telemetry.GPUTelemetry
    batch_size: int


def fit_and_test(cfg: Config, ctx: ArmContext, module, preprocess, logger, lockstep=None,
                 on_retry: Callable[[str], None] | None = None) -> StageResult:
    """Fine-tune (`cfg.epochs` > 0), then test; on CUDA out-of-memory halve the batch size and redo that stage.

    A fit that ran out of memory starts again from the initial weights and seed, so the arm still follows the
    one recipe from the one start (with a smaller batch); a fit that finished is never repeated because its
    test ran out. Memory held by the failed try (its traceback's tensors, the trainer) is freed before the
    retry. `on_retry` gets a one-line note for each retry. Needs no MLflow: `logger` is any Lightning logger.
    """
    import gc

    import lightning as L
    import torch

    from callbacks.gpu_telemetry import GPUTelemetry
    from lab.data import ABDataModule

    gated = [lockstep] if lockstep is not None else []
    initial = {k: v.detach().clone() for k, v in module.state_dict().items()} if cfg.epochs > 0 else None
    fitted = cfg.epochs == 0
    batch_size = cfg.batch_size
    while True:
        arm_cfg = cfg if batch_size == cfg.batch_size else _with_batch(cfg, batch_size)
        stage = "test" if fitted else "fit"
        try:
            if not fitted:
                make_trainer(arm_cfg, ctx, logger, gated, cfg.epochs).fit(module, ABDataModule(arm_cfg, preprocess))
                fitted, stage = True, "test"
            telemetry = GPUTelemetry(warmup_batches=cfg.warmup_batches, sync=cfg.telemetry_sync)
            make_trainer(arm_cfg, ctx, logger, [*gated, telemetry], 1).test(
                module, ABDataModule(arm_cfg, preprocess), verbose=False)
            return StageResult(telemetry, batch_size)
        except Exception as err:  # only out-of-memory is retried, everything else re-raised
            if not _is_oom(err) or batch_size <= OOM_MIN_BATCH:
                raise
        # Outside the except block the exception and its traceback are gone; the frames they held (activations,
        # the batch) and the failed trainer (optimizer state) become garbage once the module lets go of it.
        module.trainer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if stage == "fit":
            module.load_state_dict(initial)
            L.seed_everything(cfg.seed, verbose=False)
        batch_size = max(OOM_MIN_BATCH, batch_size // 2)
        if on_retry is not None:
            on_retry(f"CUDA out of memory in {stage}; batch size halved to {batch_size}")


def run_arm(cfg: Config, ctx: ArmContext, run_id: str) -> None:
    """Fine-tune (epochs > 0) and test one arm inside an existing child run."""
    import lightning as L
    import torch
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

    from lab.data import resolve_dataset
    from lab.models import ArmModule, resolve_model

    client = MlflowClient()
    if ctx.threads:
        torch.set_num_threads(ctx.threads)
    spec = cfg.arm_specs[ctx.index]
    info = resolve_dataset(cfg)
    L.seed_everything(cfg.seed, verbose=False)  # same initial weights for the same architecture
    resolved = resolve_model(spec, cfg, info.num_classes)
    preprocess = preprocess_for(cfg, resolved.native)
    client.log_batch(run_id, params=[_param(k, v) for k, v in flat_params(cfg).items() if k not in ("a", "b")],
                     tags=[_tag(k, v) for k, v in {
                         "ab.dataset": cfg.data, "ab.dataset_fingerprint": info.fingerprint,
                         "ab.num_classes": str(info.num_classes), "ab.label_map": info.label_map_hash,
                         "ab.n_test": str(len(info.test)), "ab.preprocess": preprocess.describe(),
                         "ab.preprocess_mode": cfg.preprocess, "ab.model_identity": resolved.identity,
                         "ab.model_source": resolved.source, "ab.arch": resolved.arch,
                         "ab.precision": cfg.precision, "ab.placement": os.environ.get("AB_PLACEMENT", ""),
                     }.items()])
    tracking_uri = os.environ["MLFLOW_TRACKING_URI"]
    logger = MLFlowLogger(tracking_uri=tracking_uri, run_id=run_id, log_model=False)
    module = ArmModule(resolved.module, info.num_classes, cfg.lr, cfg.weight_decay, cfg.epochs,
                       cfg.channels_last, resolved.arch)
    if cfg.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if cfg.compile:
        module.model = torch.compile(module.model)
    lockstep = _lockstep(cfg, ctx)

    def note_retry(message: str) -> None:
        client.set_tag(run_id, "ab.oom_retry", message)
        print(f"ablab: arm {cfg.arm_names[ctx.index]}: {message}", file=sys.stderr)

    result = fit_and_test(cfg, ctx, module, preprocess, logger, lockstep, note_retry)
    if lockstep is not None:
        lockstep.finish()
    _log_results(client, run_id, module, result.telemetry, result.batch_size, info.class_names)


def _with_batch(cfg: Config, batch_size: int) -> Config:
    import dataclasses

    return dataclasses.replace(cfg, batch_size=batch_size)


def _lockstep(cfg: Config, ctx: ArmContext):
    if not ctx.lockstep:
        return None
    from callbacks.lockstep import Lockstep

    return Lockstep(ctx.lockstep, ctx.index, ctx.world_size, timeout_s=cfg.lockstep_timeout_s,
                    order_log=os.environ.get("AB_LOCKSTEP_ORDER_LOG") or None)


def _param(key: str, value: str):
    from mlflow.entities import Param

    return Param(key, value[:6000])


def _tag(key: str, value: str):
    from mlflow.entities import RunTag

    return RunTag(key, value)


def _log_results(client, run_id: str, module, telemetry, batch_size: int, class_names) -> None:
    """predictions.parquet, per-class accuracy and confusion matrix as artifacts; one log_batch of metrics."""
    import time

    from mlflow.entities import Metric

    assert module.predictions is not None, "test loop produced no predictions"
    per_class = module.per_class_accuracy()
    now = int(time.time() * 1000)
    metrics = [Metric(f"test_accuracy_class.{i}", v, now, 0) for i, v in enumerate(per_class[:200])]
    client.log_batch(run_id, metrics=metrics,
                     tags=[_tag("ab.batch_size_final", str(batch_size))])
    with tempfile.TemporaryDirectory() as tmp:
        pred_path = Path(tmp) / "predictions.parquet"
        module.predictions.to_parquet(pred_path, index=False)
        client.log_artifact(run_id, str(pred_path), "predictions")
        extra = Path(tmp) / "metrics"
        extra.mkdir()
        (extra / "per_class_accuracy.json").write_text(json.dumps(dict(zip(class_names, per_class, strict=True))))
        (extra / "confusion_matrix.json").write_text(json.dumps(
            {"classes": list(class_names), "matrix": module.confusion_matrix()}))
        client.log_artifacts(run_id, str(extra), "metrics")


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if isinstance(err, ValueError) else f"{type(err).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.arm", description="Run one arm as an MLflow child run.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--parent-run-id", required=True)
    parser.add_argument("--experiment-id", required=True)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--lockstep", default=None)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--error-file", default=None)
    args = parser.parse_args(argv)
    os.environ.pop("MLFLOW_RUN_ID", None)  # never resume the parent's run
    warnings.filterwarnings("ignore", module="lightning")
    cfg = load_config(args.config)
    ctx = ArmContext(args.index, args.parent_run_id, args.experiment_id, args.device, args.lockstep,
                     args.world_size, args.threads)
    from mlflow import MlflowClient

    run_id = create_child_run(cfg, ctx)
    try:
        run_arm(cfg, ctx, run_id)
    except BaseException as err:
        message = f"arm {cfg.arm_names[ctx.index]} ({cfg.arm_specs[ctx.index]}): {one_line(err)}"
        if args.error_file:
            Path(args.error_file).write_text(message)
        client = MlflowClient()
        client.set_tag(run_id, "ab.error", message[:5000])
        client.set_terminated(run_id, "FAILED" if not isinstance(err, KeyboardInterrupt) else "KILLED")
        print(f"ablab: error: {message}", file=sys.stderr)
        if os.environ.get("AB_DEBUG"):
            raise
        return 1
    MlflowClient().set_terminated(run_id, "FINISHED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
