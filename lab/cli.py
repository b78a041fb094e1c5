"""Command line: `python -m lab run|compare|leaderboard ...`, one to one with the MLproject entry points.

    python -m lab run                                   # the default A/B job (configs/default.yaml)
    python -m lab run --a resnet50 --b efficientnet_b3 --data cifar10 --pretrained true --epochs 0
    python -m lab run --arms resnet18,resnet34,mobilenetv3_large_100
    python -m lab run --help                            # every parameter

Every config key is an option; the YAML given by --config is read first and options win. Bad input ends with
one line on stderr and exit code 2 before any run exists; a failure after the parent run started marks it
FAILED with the reason in tag `ab.error`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from lab.config import FIELDS, Config, ConfigError, flat_params, load_config

DEFAULT_CONFIG = "configs/default.yaml"
EXIT_BAD_INPUT = 2
EXIT_FAILED = 1

HELP = {
    "a": "model A (the baseline): timm name, MLflow model URI, or checkpoint",
    "b": "model B (the challenger)",
    "arms": "comma-separated model specs for an A/B/n run (wins over a/b); the first is the baseline",
    "data": "digits | fake | cifar10 | cifar100 | imagefolder:<path>",
    "epochs": "fine-tune epochs with one seeded recipe for every arm (0 = evaluate as is)",
    "preprocess": "shared: one input size/normalisation for all; native: each timm model's own",
    "placement": "auto | parallel (one GPU per arm) | lockstep (take turns per batch) | sequential",
    "devices": "auto | cpu | GPU indices such as 0,1",
    "rule": "superiority | non_inferiority | equivalence",
    "margin": "non-inferiority/equivalence margin as an accuracy fraction (0.005 = half a point)",
    "alpha": "significance level of the verdict",
}


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the embedded SQLite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"experiment YAML (default {DEFAULT_CONFIG})")
    for f in FIELDS:
        default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        parser.add_argument(
            f"--{f.name}",
            default=None,
            metavar="VALUE",
            help=f"{HELP.get(f.name, f.name.replace('_', ' '))} (default: {default})",
        )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in FIELDS if getattr(args, f.name) is not None}


def config_path(arg: str) -> Path:
    """A config path as given, else relative to the project (so `configs/...` works from any directory)."""
    given = Path(arg).expanduser()
    shipped = Path(__file__).resolve().parent.parent / arg
    return given if given.is_file() or given.is_absolute() or not shipped.is_file() else shipped


def fail(message: str, code: int) -> int:
    print(f"ablab: error: {message}", file=sys.stderr)
    return code


def _preflight(cfg: Config) -> None:
    """Everything that can be checked before a run exists: models, dataset (downloaded once, here)."""
    from lab.data import resolve_dataset
    from lab.launch import plan
    from lab.models import preflight

    for spec in cfg.arm_specs:
        preflight(spec, cfg)
    resolve_dataset(cfg)
    plan(cfg, len(cfg.arm_specs))


def start_parent_run(cfg: Config, run_name: str):
    """The run `mlflow run` created (MLFLOW_RUN_ID), else a new run in experiment `cfg.experiment`."""
    import mlflow

    if os.environ.get("MLFLOW_RUN_ID"):
        return mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"])
    mlflow.set_experiment(cfg.experiment)
    return mlflow.start_run(run_name=run_name)


def end_failed(run_id: str, message: str, status: str = "FAILED") -> None:
    """Record why, and end the active parent run (else MLflow's exit hook would mark it FINISHED)."""
    import mlflow

    mlflow.MlflowClient().set_tag(run_id, "ab.error", message[:5000])
    mlflow.end_run(status)


def cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(config_path(args.config), _overrides(args))
    except ConfigError as err:
        return fail(str(err), EXIT_BAD_INPUT)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri()
    try:
        _preflight(cfg)
        from lab import history, registry

        registry.check_promotable(cfg)
        reused = history.reusable_arms(cfg)  # arm index -> finished child run that evaluated it the same way
    except ValueError as err:  # ConfigError, DataError, ModelError: all one-line messages
        return fail(str(err), EXIT_BAD_INPUT)

    import mlflow

    from lab.compare import analyse, fetch_arms, log_comparison
    from lab.launch import plan

    p = plan(cfg, len(cfg.arm_specs))
    run = start_parent_run(cfg, " vs ".join(cfg.arm_specs))
    run_id, experiment_id = run.info.run_id, run.info.experiment_id
    try:
        # Prefixed: `mlflow run` has already logged the raw -P values ("" = from the YAML) under the plain names.
        mlflow.log_params({f"config.{k}": v for k, v in flat_params(cfg).items()})
        mlflow.set_tags(
            {
                "ab.role": "parent",
                "ab.placement": p.placement,
                "ab.device_kind": p.device,
                "ab.arms": ",".join(cfg.arm_names),
            }
        )
        mlflow.log_text(cfg.to_yaml(), "config.yaml")
        with tempfile.TemporaryDirectory(prefix="ablab-") as tmp:
            cfg_path = Path(tmp) / "config.yaml"
            cfg_path.write_text(cfg.to_yaml())
            print(
                f"ablab: {len(cfg.arm_specs)} arms ({', '.join(cfg.arm_specs)}) on {p.device}, "
                f"placement={p.placement}; parent run {run_id}",
                file=sys.stderr,
            )
            todo = [i for i in range(len(cfg.arm_specs)) if i not in reused]
            outcomes = history.evaluate(cfg, cfg_path, run_id, experiment_id, tracking_uri(), p, todo)
            failed = [o for o in outcomes if o.returncode != 0 or o.run_id is None]
            if failed:
                message = "; ".join(o.error or f"arm {o.name} failed" for o in failed)
                end_failed(run_id, message)
                return fail(message, EXIT_FAILED)
            client = mlflow.MlflowClient()
            run_ids = {o.index: o.run_id for o in outcomes} | {i: r.info.run_id for i, r in reused.items()}
            arms = fetch_arms(client, [run_ids[i] for i in range(len(cfg.arm_specs))], list(cfg.arm_names))
            history.mark_reused(client, run_id, arms, reused)
            from lab.data import resolve_dataset

            summary = analyse(cfg, arms, resolve_dataset(cfg).class_names)
            log_comparison(client, run_id, cfg, summary, Path(tmp) / "comparison")
            if cfg.promote_alias:
                registry.promote(client, run_id, cfg.promote_alias, summary, arms)
    except KeyboardInterrupt:
        end_failed(run_id, "interrupted", "KILLED")
        return fail("interrupted", 130)
    except Exception as err:
        from lab.arm import one_line

        end_failed(run_id, one_line(err))
        if os.environ.get("AB_DEBUG"):
            raise
        return fail(one_line(err), EXIT_FAILED)
    mlflow.end_run("FINISHED")
    print(summary["sentence"])
    print(
        f"ablab: verdict {summary['verdict']}; report: comparison/report.html in run {run_id} "
        f"(mlflow ui --backend-store-uri {tracking_uri()}, then #/experiments/{experiment_id}/runs/{run_id})",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lab", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an A/B(/n) experiment: one child run per arm, a parent comparison")
    _add_config_options(run)
    run.set_defaults(func=cmd_run)
    from lab import history

    history.add_commands(sub, _add_config_options, _overrides)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
