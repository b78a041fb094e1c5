"""One arm = one MLflow child run: resolve the model, fine-tune (optional), test, log predictions.

The launcher starts each arm as its own process:

    python -m lab.arm --config resolved.yaml --index 0 --parent-run-id <id> --experiment-id <id>

Every arm builds the same seeded data module; only the model (and, with `preprocess=native`, its input
transform) differs. Whatever happens, the child run ends FINISHED or FAILED with a one-line `ab.error` tag.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from callbacks.gpu_telemetry import GPUTelemetry
from callbacks.lockstep import Lockstep
from lab import correctness, ddp, lifecycle, lineage, outage, runs, spool, zygote
from lab.config import Config, flat_params, load_config
from lab.data import ABDataModule, DatasetInfo, Preprocess, resolve_dataset, train_fingerprint, training_tags
from lab.models import ArmModule, ResolvedModel, model_spec, preprocess_for, resolve_model, save_model_dir

OOM_MIN_BATCH = 1
# What an arm's run imports on first use (the SQL tracking store, sklearn's datasets, git for the run's source
# tags, what MLflow's model logging and torch.export load): the fork server imports them once, not every arm
# (~1.2 CPU s each). Not `mlflow.pytorch` itself: importing it adds a handler to the root logger.
LATE_IMPORTS = ("mlflow.store.tracking.sqlalchemy_store", "sklearn.datasets", "git", "pytorch_lightning",
                "mlflow.pyfunc", "torch.export._trace", "mlflow.tracing.processor.otel")
DENSE_CONFUSION_MAX = 50  # classes up to which the arm's confusion matrix is dense JSON (else sparse Parquet)


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
    started: str = "fresh"  # or "forked": from the launcher's fork server, imports done before its job (tag)


def create_child_run(cfg: Config, ctx: ArmContext) -> str:
    """A child run of the parent; created with the client, so an inherited MLFLOW_RUN_ID cannot hijack it."""
    name, spec = cfg.arm_names[ctx.index], cfg.arm_specs[ctx.index]
    tags = {"mlflow.parentRunId": ctx.parent_run_id, "mlflow.runName": f"{name}: {spec}", "ab.role": "child",
            "ab.arm": name, "ab.arm_index": str(ctx.index), "ab.model": spec, **lifecycle.owner_tags()}
    return MlflowClient().create_run(ctx.experiment_id, tags=tags, run_name=f"{name}: {spec}").info.run_id


def make_trainer(cfg: Config, ctx: ArmContext, logger, callbacks: list, max_epochs: int, stage: str = "test"):
    """The Trainer of an arm's fit and test stages (benchmarks/overhead.py times the same one).

    With `devices_per_arm` > 1 it is Lightning DDP (gloo on the CPU); `batch_size` is per device, as in
    Lightning, so a fit's effective batch is devices_per_arm times larger (tag `ab.effective_batch_size`). The
    test keeps its own whole-batch shards (lab/ddp.py): no DistributedSampler, which pads by repeating samples.
    """
    ddp = cfg.devices_per_arm > 1
    return L.Trainer(
        accelerator="gpu" if ctx.device == "cuda" else "cpu", devices=cfg.devices_per_arm, precision=cfg.precision,
        strategy="ddp" if ddp else "auto", use_distributed_sampler=ddp and stage == "fit",
        max_epochs=max_epochs, logger=logger,
        callbacks=[*callbacks, *lifecycle.pause_callbacks(), TQDMProgressBar(process_position=ctx.index)],
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
        reload_dataloaders_every_n_epochs=1, deterministic=cfg.deterministic, log_every_n_steps=50,
    )


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


@dataclass(frozen=True)
class StageResult:
    """What the test stage left: its telemetry and the batch size it finished with."""

    telemetry: GPUTelemetry
    batch_size: int


def fit_and_test(cfg: Config, ctx: ArmContext, module, preprocess, logger, lockstep=None,
                 on_retry: Callable[[str], None] | None = None) -> StageResult:
    """Fine-tune (`cfg.epochs` > 0), then test; on CUDA out-of-memory halve the batch size and redo that stage.

    A fit that ran out of memory starts again from the initial weights and seed, so the arm still follows the
    one recipe from the one start (with a smaller batch); a fit that finished is never repeated because its
    test ran out. Memory held by the failed try (its traceback's tensors, the trainer) is freed before the
    retry. `on_retry` gets a one-line note for each retry. Needs no MLflow: `logger` is any Lightning logger.
    """
    gated = [lockstep] if lockstep is not None else []
    initial = {k: v.detach().clone() for k, v in module.state_dict().items()} if cfg.epochs > 0 else None
    fitted = cfg.epochs == 0
    batch_size = cfg.batch_size
    while True:
        arm_cfg = cfg if batch_size == cfg.batch_size else _with_batch(cfg, batch_size)
        stage = "test" if fitted else "fit"
        try:
            if not fitted:
                make_trainer(arm_cfg, ctx, logger, gated, cfg.epochs, "fit").fit(
                    module, ABDataModule(arm_cfg, preprocess, train_seed=cfg.arm_seed(ctx.index)))
                fitted, stage = True, "test"
            telemetry = GPUTelemetry(warmup_batches=cfg.warmup_batches, sync=cfg.telemetry_sync)
            make_trainer(arm_cfg, ctx, logger, [*gated, telemetry], 1).test(
                module, ddp.ShardedTestData(arm_cfg, preprocess), verbose=False)
            return StageResult(telemetry, batch_size)
        except Exception as err:  # only out-of-memory is retried, everything else re-raised
            if not _is_oom(err) or batch_size <= OOM_MIN_BATCH or cfg.devices_per_arm > 1:
                raise  # under DDP one rank's retry would leave the others waiting in a collective
        # Outside the except block the exception and its traceback are gone; the frames they held (activations,
        # the batch) and the failed trainer (optimizer state) become garbage once the module lets go of it.
        module.trainer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if stage == "fit":
            module.load_state_dict(initial)
            L.seed_everything(cfg.arm_seed(ctx.index), verbose=False)
        batch_size = max(OOM_MIN_BATCH, batch_size // 2)
        if on_retry is not None:
            on_retry(f"CUDA out of memory in {stage}; batch size halved to {batch_size}")


def run_arm(cfg: Config, ctx: ArmContext, run_id: str, box: spool.ArmSpool | None = None) -> None:
    """Fine-tune (epochs > 0) and test one arm inside an existing child run (rank 0 of a data-parallel arm).
    With the arm's spool `box`, its MLflow traffic rides out a lost server (lab/spool.py)."""
    client = spool.HoldingClient(box, cfg.outage_window_s) if box is not None else MlflowClient()
    if ctx.threads:  # the arm's share of the cores, split over its ranks
        torch.set_num_threads(ddp.threads_per_rank(ctx.threads, cfg.devices_per_arm))
    info = resolve_dataset(cfg)
    resolved, preprocess = _resolve(cfg, ctx, info)
    client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in flat_params(cfg).items() if k not in ("a", "b")],
                     tags=[RunTag(k, v) for k, v in {
                         "ab.dataset": cfg.data, "ab.dataset_fingerprint": info.fingerprint,
                         "ab.num_classes": str(info.num_classes), "ab.label_map": info.label_map_hash,
                         "ab.n_test": str(len(info.test)), "ab.preprocess": preprocess.describe(),
                         "ab.preprocess_mode": cfg.preprocess, "ab.model_identity": resolved.identity,
                         "ab.model_source": resolved.source, "ab.arch": resolved.arch,
                         "ab.precision": cfg.precision, "ab.placement": os.environ.get("AB_PLACEMENT", ""),
                         "ab.seed": str(cfg.arm_seed(ctx.index)), "ab.deterministic": str(cfg.deterministic).lower(),
                         "ab.arm_process": ctx.started,
                         **({"ab.pickle_loaded": "true"} if resolved.pickled else {}),
                         **training_tags(cfg, ctx.index, info),  # the reuse key of a fine-tune (lab/history.py)
                         **ddp.tags(cfg),
                     }.items()])
    if info.skipped:  # skip_bad_images=true: which files this arm never saw
        client.log_text(run_id, "\n".join(info.skipped) + "\n", "data/skipped_images.txt")
    test_set = log_splits(cfg, client, run_id, info)
    logger = lifecycle.arm_logger(runs.tracking_uri(), run_id,  # it must not end the run after `fit`
                                  client if box is not None else None)
    module = _module(cfg, resolved, info.num_classes)
    lockstep = _lockstep(cfg, ctx)

    def note_retry(message: str) -> None:
        client.set_tag(run_id, "ab.oom_retry", message)
        print(f"ablab: arm {cfg.arm_names[ctx.index]}: {message}", file=sys.stderr)

    result = fit_and_test(cfg, ctx, module, preprocess, logger, lockstep, note_retry)
    if lockstep is not None:
        lockstep.finish()
    log_results(client, run_id, module, result.batch_size, info.class_names, box)
    model_id = log_model(cfg, ctx, client, run_id, module, resolved, preprocess)
    link_metrics(client, run_id, model_id, test_set)


def run_rank(cfg: Config, ctx: ArmContext) -> None:
    """A rank > 0 of a data-parallel arm: the same model and data, its share of fit and test, no MLflow (rank 0
    logs everything, the gathered predictions and telemetry included)."""
    if ctx.threads:  # the arm's share of the cores, split over its ranks
        torch.set_num_threads(ddp.threads_per_rank(ctx.threads, cfg.devices_per_arm))
    info = resolve_dataset(cfg)
    resolved, preprocess = _resolve(cfg, ctx, info)
    fit_and_test(cfg, ctx, _module(cfg, resolved, info.num_classes), preprocess, logger=False)


def _resolve(cfg: Config, ctx: ArmContext, info: DatasetInfo) -> tuple[ResolvedModel, Preprocess]:
    L.seed_everything(cfg.arm_seed(ctx.index), verbose=False)  # same initial weights for one architecture and seed
    resolved = resolve_model(cfg.arm_specs[ctx.index], cfg, info.num_classes)
    return resolved, preprocess_for(cfg, resolved.native)


def _module(cfg: Config, resolved: ResolvedModel, num_classes: int) -> ArmModule:
    module = ArmModule(resolved.module, num_classes, cfg.lr, cfg.weight_decay, cfg.epochs, cfg.channels_last,
                       resolved.arch)
    if cfg.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if cfg.compile:
        module.model = torch.compile(module.model)
    return module


def log_splits(cfg: Config, client, run_id: str, info: DatasetInfo):
    """The test split (and, for a fine-tune, the training split) as the run's MLflow dataset inputs; returns the
    test dataset."""
    test = lineage.split_dataset(cfg, info.fingerprint, len(info.test), info.class_names)
    splits = {"test": test}
    if cfg.epochs > 0:  # the same training fingerprint as the reuse key's `ab.train_fingerprint`
        splits["train"] = lineage.split_dataset(cfg, train_fingerprint(info), len(info.train), info.class_names)
    lineage.log_datasets(client, run_id, splits)
    return test


def log_model(cfg: Config, ctx: ArmContext, client, run_id: str, module: ArmModule, resolved: ResolvedModel,
              preprocess: Preprocess) -> str:
    """The arm's model as an MLflow logged model: fine-tuned weights (pt2, or safetensors where export fails),
    else a link to where the weights live (the registry version's model, or an external model naming the timm
    name or checkpoint). Tags the run with `ab.logged_model` (model id) and `ab.logged_model_format`."""
    spec = cfg.arm_specs[ctx.index]
    tags = {"ablab.model": spec, "ablab.identity": resolved.identity[: runs.MAX_TAG], "ablab.arch": resolved.arch,
            "ablab.preprocess": preprocess.describe()}
    source_id = lineage.source_model_id(client, spec, resolved.identity) if resolved.source == "mlflow" else None
    if cfg.epochs > 0 and cfg.log_model:
        net = getattr(module.model, "_orig_mod", module.model)  # torch.compile's wrapper holds the module
        net = (copy.deepcopy(net).cpu() if ctx.device == "cuda" else net).eval()
        example = torch.zeros(2, 3, preprocess.input_size, preprocess.input_size)
        recipe = model_spec(resolved.arch, module.num_classes, preprocess, cfg)

        def write(folder: Path, record) -> str:
            return save_model_dir(net, recipe, example, folder, record)

        model_id, fmt = lineage.log_stored_model(client, run_id, ctx.experiment_id, write, tags)
        fmt = fmt.split(" ", 1)[0]
    elif source_id is not None and cfg.epochs == 0:
        model_id, fmt = source_id, "mlflow"
        lineage.link_input_model(client, run_id, model_id)
    else:
        why = "log_model=false" if cfg.epochs > 0 else "scored as it is"
        tags |= {"ablab.pretrained": str(cfg.pretrained).lower(), "ablab.weights": f"not logged ({why})"}
        model_id, fmt = lineage.link_external_model(client, run_id, ctx.experiment_id, resolved.arch, tags), "external"
    client.log_batch(run_id, tags=[RunTag("ab.logged_model", model_id), RunTag("ab.logged_model_format", fmt)])
    return model_id


def link_metrics(client, run_id: str, model_id: str, test_set) -> None:
    """Accuracy, latency, throughput and memory linked to the arm's logged model and the test dataset."""
    metrics = client.get_run(run_id).data.metrics
    linked = {k: metrics[k] for k in lineage.LINKED_METRICS if k in metrics}
    lineage.log_linked_metrics(client, run_id, linked, model_id, test_set)


def _with_batch(cfg: Config, batch_size: int) -> Config:
    return dataclasses.replace(cfg, batch_size=batch_size)


def _lockstep(cfg: Config, ctx: ArmContext):
    if not ctx.lockstep:
        return None
    return Lockstep(ctx.lockstep, ctx.index, ctx.world_size, timeout_s=cfg.lockstep_timeout_s,
                    order_log=os.environ.get("AB_LOCKSTEP_ORDER_LOG") or None)


def log_results(client, run_id: str, module: ArmModule, batch_size: int, class_names,
                box: spool.ArmSpool | None = None) -> None:
    """predictions.parquet, per-class accuracy and confusion matrix as artifacts, and one batch of metrics: all
    written to the arm's spool folder first, then uploaded (waiting out a lost server, lab/spool.py)."""
    if box is None:  # outside an arm process: a spool folder for this upload only
        with spool.temporary(run_id) as temporary:
            return log_results(client, run_id, module, batch_size, class_names, temporary)
    assert module.predictions is not None, "test loop produced no predictions"
    per_class = module.per_class_accuracy()
    now = int(time.time() * 1000)
    box.add([Metric(f"test_accuracy_class.{i}", v, now, 0) for i, v in enumerate(per_class[:200])],
            tags=[RunTag("ab.batch_size_final", str(batch_size))])
    predictions, extra = box.files / "predictions", box.files / "metrics"
    predictions.mkdir(exist_ok=True)
    extra.mkdir(exist_ok=True)
    module.predictions.to_parquet(predictions / "predictions.parquet", index=False)
    # The same correctness in ~n/8 bytes: what `leaderboard` reads over thousands of runs (lab/correctness.py).
    correctness.write(module.predictions, predictions)
    (extra / "per_class_accuracy.json").write_text(runs.strict_json(dict(zip(class_names, per_class, strict=True))))
    if len(class_names) <= DENSE_CONFUSION_MAX:
        (extra / "confusion_matrix.json").write_text(runs.strict_json(
            {"classes": list(class_names), "matrix": module.confusion_matrix()}))
    else:  # a dense k x k JSON is 4 MB at 1,000 classes and 400 MB at 10,000: the non-zero cells, long form
        cells = module.predictions.groupby(["label", "pred"]).size().rename("count").reset_index()
        cells.to_parquet(extra / "confusion.parquet", index=False)
    box.results_written()
    box.upload(client)


def main(argv: list[str] | None = None, started: str = "fresh") -> int:
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
    parser.add_argument("--done-file", default=None, help="written once the child run is complete")
    args = parser.parse_args(argv)
    os.environ.pop("MLFLOW_RUN_ID", None)  # never resume the parent's run
    warnings.filterwarnings("ignore", module="lightning")
    cfg = load_config(args.config)
    ctx = ArmContext(args.index, args.parent_run_id, args.experiment_id, args.device, args.lockstep,
                     args.world_size, args.threads, started)
    if ddp.rank() > 0:  # another rank of a data-parallel arm: rank 0 owns the run
        return ddp.run_as_rank(lambda: run_rank(cfg, ctx))
    lifecycle.raise_on_signals()  # the launcher stops arms with SIGTERM: end the run KILLED, "interrupted"
    lifecycle.quiet_interrupts()
    try:  # a lost server is waited for (outage_window_s)
        run_id = outage.patient(MlflowClient(), cfg.outage_window_s).call(create_child_run, cfg, ctx)
    except outage.ServerLost as err:  # no run: the launcher says so, once
        return _server_lost(cfg, ctx, spool.ArmSpool.for_arm(cfg, ctx.parent_run_id, ctx.index, ""), err,
                            args.error_file)
    except Exception as err:  # no run to end: one line for the launcher
        reason = outage.unreachable_line(time.time()) if outage.unreachable(err) else runs.one_line(err)
        message = f"arm {cfg.arm_names[ctx.index]} ({cfg.arm_specs[ctx.index]}): {reason}"
        if args.error_file:
            Path(args.error_file).write_text(message)
        print(f"ablab: error: {message}", file=sys.stderr)
        return 1
    lifecycle.start_heartbeat(MlflowClient(), run_id)
    box = spool.ArmSpool.for_arm(cfg, ctx.parent_run_id, ctx.index, run_id)
    client = spool.HoldingClient(box, cfg.outage_window_s)
    ranks = None
    try:
        if cfg.devices_per_arm > 1:  # before the first Trainer: Lightning then joins these ranks, launches none
            ranks = ddp.Ranks(cfg.devices_per_arm, sys.argv[1:] if argv is None else argv, run_id,
                              ddp.threads_per_rank(ctx.threads, cfg.devices_per_arm),
                              ddp.ending_run(run_id, f"arm {cfg.arm_names[ctx.index]} ({cfg.arm_specs[ctx.index]})",
                                             args.error_file))
        run_arm(cfg, ctx, run_id, box)
        if ranks is not None and (line := ranks.join()):
            raise RuntimeError(line)
        box.upload(client)  # what the logged model's calls kept, were the server away again after the results
        lifecycle.verify_predictions(client, run_id)  # FINISHED only with every prediction uploaded
        lifecycle.complete(client, run_id)
        box.remove()
    except BaseException as err:
        # Interrupted, what follows (a broken lockstep connection, a broken pipe) is noise: say "interrupted".
        interrupted = isinstance(err, KeyboardInterrupt) or lifecycle.received_signal() is not None
        rank_line = ranks.abort(interrupted) if ranks else None  # a failed rank says why; rank 0 may see a socket close
        if isinstance(err, outage.ServerLost) and not interrupted:
            return _server_lost(cfg, ctx, box, err, args.error_file)
        box.remove()  # the run ends here, with the reason: nothing to resume
        reason = "interrupted" if interrupted else rank_line or (
            outage.unreachable_line(time.time()) if outage.unreachable(err) else runs.one_line(err))
        message = f"arm {cfg.arm_names[ctx.index]} ({cfg.arm_specs[ctx.index]}): {reason}"
        if args.error_file:
            Path(args.error_file).write_text(message)
        lifecycle.end_run(MlflowClient(), run_id, reason if interrupted else message,
                          "KILLED" if interrupted else "FAILED")
        if not interrupted:  # the launcher says "interrupted" once for the job
            print(f"ablab: error: {message}", file=sys.stderr)
        if os.environ.get("AB_DEBUG"):
            raise
        if interrupted:  # the run is ended: skip the teardown, which can block in the lockstep store's destructor
            sys.stderr.flush()
            os._exit(1)
        return 1
    if args.done_file:  # the run is complete: the launcher moves on while this process exits
        Path(args.done_file).write_text(run_id)
    return 0


def _server_lost(cfg: Config, ctx: ArmContext, box: spool.ArmSpool, err: outage.ServerLost,
                 error_file: str | None) -> int:
    """The server stayed away past outage_window_s: the results wait in the spool and the run stays RUNNING
    (`python -m lab resume` finishes it); no line here, the launcher prints one for the job."""
    box.mark_lost(err.since)
    if error_file:
        Path(error_file).write_text(f"arm {cfg.arm_names[ctx.index]} ({cfg.arm_specs[ctx.index]}): {err}; "
                                    f"results kept in {box.folder}")
    return lifecycle.EXIT_SERVER_LOST


if __name__ == "__main__":
    gc.freeze()  # the imports' objects stay out of the collector's full passes over the training loop
    if sys.argv[1:3] == ["--standby", "--report-fd"]:  # the fork server of lab/launch.py's `standby`
        lifecycle.exit_now(zygote.serve(lambda argv: main(argv, started="forked"), int(sys.argv[3]), LATE_IMPORTS))
    code = main()
    if code == 0 and ddp.rank() == 0:  # complete and uploaded: skip seconds of teardown on the parent's cores
        lifecycle.exit_now(code)
    sys.exit(code)
