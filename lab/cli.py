"""Command line: `python -m lab run|compare|leaderboard|plan ...`, one to one with the MLproject entry points.

    python -m lab run                                   # the default A/B job (configs/default.yaml)
    python -m lab run --a resnet50 --b efficientnet_b3 --data cifar10 --pretrained true --epochs 0
    python -m lab run --arms resnet18,resnet34,mobilenetv3_large_100
    python -m lab run --help                            # every parameter
    python -m lab plan --acc 0.95 --disagreement 0.04 --mde 0.01   # the test-set size to aim for
    python -m lab resume ~/.cache/ablab/spool/<parent run id>      # finish a job that lost its tracking server

Every config key is an option; the YAML given by --config is read first and options win. Bad input ends with
one line on stderr and exit code 2 before any run exists; a failure after the parent run started marks it
FAILED with the reason in tag `ab.error`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Any

import numpy as np

from lab import compare_runs, doctor, experiment, leaderboard, lifecycle, report, runs, stats
from lab.config import FIELDS, config_path, load_config

DEFAULT_CONFIG = "configs/default.yaml"
EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

HELP = {
    "a": "model A (the baseline): timm name, MLflow model URI, or checkpoint",
    "b": "model B (the challenger)",
    "arms": "comma-separated model specs for an A/B/n run (wins over a/b); the first is the baseline",
    "data": "digits | fake | cifar10 | cifar100 | imagefolder:<path>",
    "epochs": "fine-tune epochs with one seeded recipe for every arm (0 = evaluate as is)",
    "preprocess": "shared: one input size/normalisation for all; native: each timm model's own",
    "placement": "auto | parallel (one GPU per arm) | lockstep (take turns per batch) | sequential | ray (arms as "
                 "tasks on a Ray cluster)",
    "ray_address": "placement=ray: auto ($RAY_ADDRESS or a running cluster) | ray://host:10001 | local (start one)",
    "devices": "auto | cpu | GPU indices such as 0,1",
    "rule": "superiority | non_inferiority | equivalence | bayes",
    "margin": "non-inferiority/equivalence margin (bayes: practical equivalence) as a fraction (0.005 = half a point)",
    "alpha": "significance level of the verdict",
    "experiment": "MLflow experiment of the parent run; empty: $MLFLOW_EXPERIMENT_ID or $MLFLOW_EXPERIMENT_NAME, "
                  "else ablab",
    "log_model": "log fine-tuned weights as an MLflow model (false: only a link to the model's source)",
    "register": "registered model name: register every arm's logged model as a version of it (with promote_alias: "
                "the gate moves the alias to B's version on a significant win)",
    "metric": "accuracy | balanced_accuracy | macro_f1 | top5_accuracy: what the verdict compares",
    "group_by": "none | subfolder (imagefolder: <class>/<group>/img.png): test images in correlated groups",
    "groups": "CSV mapping file (or sample_id) to group; whole groups are resampled",
}
# `compare` takes run ids as well as model specs; these replace the whole help line of the option.
COMPARE_HELP = {
    "a": "arm A (the baseline): a child run id, or a model spec (models:/name@alias, models:/name/3, timm name) "
         "whose finished evaluation is reused, or evaluated here when there is none",
    "b": "arm B: a child run id or a model spec, as for --a",
    "arms": "comma-separated run ids or model specs for an A/B/n comparison (wins over a/b)",
    "experiment": "experiment of the new comparison run (default: $MLFLOW_EXPERIMENT_ID or "
                  "$MLFLOW_EXPERIMENT_NAME, else ablab)",
    "epochs": "fine-tune epochs for arms that must be evaluated (default here: 0 = as they are)",
    "promote_alias": "registry alias (e.g. champion) to move to B's version when the verdict says B wins",
}


def _add_config_options(parser: argparse.ArgumentParser, replaced: dict[str, str] | None = None) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"experiment YAML (default {DEFAULT_CONFIG})")
    for f in FIELDS:
        default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        text = f"{HELP.get(f.name, f.name.replace('_', ' '))} (default: {default})"
        parser.add_argument(f"--{f.name}", default=None, metavar="VALUE", help=(replaced or {}).get(f.name, text))


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys given on the command line; "" (MLproject's default) means not given."""
    return {f.name: v for f in FIELDS if (v := getattr(args, f.name)) not in (None, "")}


def cmd_run(args: argparse.Namespace) -> None:
    experiment.run(load_config(config_path(args.config), _overrides(args)))


def cmd_compare(args: argparse.Namespace) -> None:
    compare_runs.compare(config_path(args.config), _overrides(args))


def cmd_leaderboard(args: argparse.Namespace) -> None:
    leaderboard.leaderboard(load_config(config_path(args.config), _overrides(args)), args.fingerprint)


def cmd_resume(args: argparse.Namespace) -> None:
    experiment.resume(args.dir)


def past_disagreement(fingerprint: str) -> tuple[float, float, str]:
    """(disagreement, median accuracy, where from): the mean share of test images on which two past evaluations
    of different models on this dataset differ in correctness, over every pair of them. Reads each evaluation's
    packed correctness bits, as `leaderboard` does, never its predictions file."""
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per fetched run is noise
    with runs.reading_runs():
        # One evaluation per model: a model evaluated twice agrees with itself and says nothing of disagreement.
        found, bits = leaderboard.finished_evaluations(MlflowClient(), fingerprint, one_per_model=True)
    if len(found) < 2:
        raise ValueError(f"plan: need finished evaluations of at least two models on {fingerprint} to measure "
                         f"their disagreement; found {len(found)}")
    correct = np.stack([bits[r.info.run_id].correct for r in found], axis=1)
    pairs = list(itertools.combinations(range(correct.shape[1]), 2))
    share = float(np.mean([np.mean(correct[:, i] != correct[:, j]) for i, j in pairs]))
    source = (f"{len(pairs)} pair{'' if len(pairs) == 1 else 's'} of {len(found)} evaluated models on {fingerprint} "
              f"({correct.shape[0]:,} images)")
    return share, float(np.median(correct.mean(axis=0))), source


def cmd_plan(args: argparse.Namespace) -> None:
    """The test-set size at 80% and 90% power for the paired exact test; "" (MLproject's default) = not given."""
    given = {}
    for key in ("acc", "disagreement", "mde", "alpha"):
        if (value := getattr(args, key)) not in (None, ""):
            try:
                given[key] = float(value)
            except ValueError:
                raise ValueError(f"plan: --{key} expects a number, got {value!r}") from None
    source = "given"
    if args.fingerprint:
        if "disagreement" in given:
            raise ValueError("plan: give --disagreement or --fingerprint (which measures it), not both")
        given["disagreement"], acc, source = past_disagreement(args.fingerprint)
        given.setdefault("acc", acc)
    missing = [k for k in ("acc", "disagreement", "mde") if k not in given]
    if missing:
        raise ValueError(f"plan: --{' and --'.join(missing)} needed (or --fingerprint for acc and disagreement)")
    print("\n".join(report.plan_lines(stats.plan(**given), source)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lab", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an A/B(/n) experiment: one child run per arm, a parent comparison")
    _add_config_options(run)
    run.set_defaults(func=cmd_run)
    compare = sub.add_parser("compare", help="compare existing evaluations (run ids or registered models) in a "
                                             "new parent run")
    _add_config_options(compare, COMPARE_HELP)
    compare.set_defaults(func=cmd_compare)
    board = sub.add_parser("leaderboard", help="rank every finished evaluation on one test set, across experiments")
    board.add_argument("--fingerprint", default="", help="dataset fingerprint (sha256:...); default: computed "
                                                         "from --data/--seed/... as `run` would")
    _add_config_options(board)
    board.set_defaults(func=cmd_leaderboard)
    plan = sub.add_parser("plan", help="test-set size needed to detect a difference (paired exact McNemar test)")
    for name, text in [("acc", "accuracy of the baseline A, e.g. 0.95"),
                       ("disagreement", "share of test images on which A and B differ in correctness, e.g. 0.04"),
                       ("mde", "smallest accuracy gain of B to detect, e.g. 0.01 (one point)"),
                       ("alpha", "two-sided significance level (default 0.05)"),
                       ("fingerprint", "dataset fingerprint (sha256:...): measure disagreement (and acc) on past "
                                       "evaluations of that test set")]:  # fmt: skip
        plan.add_argument(f"--{name}", default="", metavar="VALUE", help=text)
    plan.set_defaults(func=cmd_plan)
    check = sub.add_parser("doctor", help="find ablab runs left RUNNING by a process that is gone; --fix ends them")
    check.add_argument("--fix", action="store_true", help="end each stale run FAILED (ab.error: stale: process gone)")
    check.add_argument("--experiment", default="", help="only this experiment (default: every readable one)")
    check.set_defaults(func=lambda args: doctor.doctor(args.experiment, fix=args.fix))
    resume = sub.add_parser("resume", help="finish a job that lost its tracking server, from the spool folder its "
                                           "last line named (once the server is back)")
    resume.add_argument("dir", help="the job's spool folder (<data_dir>/spool/<parent run id>)")
    resume.set_defaults(func=cmd_resume)
    return parser


def fail(message: str, code: int) -> int:
    print(f"ablab: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Parse, run the command, and map its exceptions to one line on stderr and an exit code."""
    args = build_parser().parse_args(argv)
    runs.export_tracking_uri()
    lifecycle.set_http_defaults()  # bounded retries: a dead tracking server fails a call in seconds, not minutes
    previous = lifecycle.raise_on_signals()  # SIGTERM and SIGHUP end the runs as Ctrl-C does
    try:
        args.func(args)
    except runs.RunFailed as err:  # the parent run exists and has been ended FAILED or KILLED
        if err.interrupted:
            return fail("interrupted", lifecycle.interrupted_exit_code())
        if os.environ.get("AB_DEBUG"):
            raise
        return fail(str(err), EXIT_FAILED)
    except ValueError as err:  # before any run: ConfigError, ModelError, DataError, ComparisonError, unreadable runs
        lifecycle.end_outer_run(str(err))  # under `mlflow run` its run exists already
        return fail(str(err), EXIT_BAD_INPUT)
    except KeyboardInterrupt:  # before the parent run exists
        lifecycle.end_outer_run("interrupted")
        return fail("interrupted", lifecycle.interrupted_exit_code())
    finally:
        lifecycle.restore_signals(previous)
    return 0
