"""`python -m lab compare`: compare evaluations that already exist -- child runs from any experiment you can
read, or registered models whose finished evaluation is found (lab/history.py) or run here -- in a new parent.

    python -m lab compare --a <child run id> --b <child run id> --experiment team-c
    python -m lab compare --a models:/clf@champion --b models:/clf/7 --data digits --promote_alias champion
    mlflow run . -e compare --env-manager local -P a=<run id> -P b=<run id>

The new parent holds the full report (lab.compare.analyse + log_comparison) and links every run it used:
tags `ab.source.<arm>` = `<experiment id>/<run id>`, `ab.compared_runs`, `ab.reused.<arm>`, and a note with
links. Nothing is created when an input is wrong: unreadable, unfinished, not an ablab evaluation, or runs that
did not score the same test set end with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from lab import history
from lab.config import Config, arm_name, flat_params, load_config
from lab.history import mark_reused, mlflow_error_line, reusable_arms, unique_names

RUN_ID = re.compile(r"[0-9a-f]{32}")
# Keys taken from the first run-id arm (unless given), so a model evaluated here scores that arm's test set.
DATASET_KEYS = ("data", "seed", "test_fraction", "fake_samples", "fake_classes", "image_size", "preprocess",
                "mean", "std", "precision")


def _child_run(client, run_id: str):
    """A FINISHED ablab child run by id; anything else raises ValueError with one line."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ValueError(mlflow_error_line(err, f"run {run_id}")) from None
    tags = run.data.tags
    if tags.get("ab.role") == "parent":
        children = ", ".join(f"{k.removeprefix('ab.child.')}={v}" for k, v in tags.items()
                             if k.startswith("ab.child."))
        raise ValueError(f"run {run_id} is an ablab parent (a comparison); pass its child runs: {children}")
    if tags.get("ab.role") != "child":
        raise ValueError(f"run {run_id} is not an ablab evaluation (no tag ab.role=child)")
    if run.info.status != "FINISHED":
        raise ValueError(f"run {run_id} is {run.info.status}, not FINISHED; compare finished evaluations")
    return run


def _compare_config(args: argparse.Namespace, overrides: dict[str, Any], runs: dict[int, Any]) -> Config:
    """YAML, then the dataset keys of the first run-id arm, then the command line; epochs=0 unless given."""
    from lab.cli import config_path

    values = dict(overrides)
    values.setdefault("epochs", "0")  # registry models are evaluated as they are
    if runs:
        params = runs[min(runs)].data.params
        for key in DATASET_KEYS:
            if key not in overrides and params.get(key, "") != "":
                values[key] = params[key]
    return load_config(config_path(args.config), values)


def cmd_compare(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """`python -m lab compare`: a new parent run comparing existing evaluations (or evaluating what has none)."""
    from lab import cli

    os.environ["MLFLOW_TRACKING_URI"] = cli.tracking_uri()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per fetched run is noise
    try:
        refs = list(_compare_config(args, overrides, {}).arm_specs)
        import mlflow

        from lab.compare import check_comparable, fetch_arms
        from lab.registry import check_promotable

        client = mlflow.MlflowClient()
        runs = {i: _child_run(client, ref) for i, ref in enumerate(refs) if RUN_ID.fullmatch(ref)}
        cfg = _compare_config(args, overrides, runs)
        check_promotable(cfg)
        todo = [i for i in range(len(refs)) if i not in runs]
        if todo:  # model specs: a finished evaluation to reuse, else checked now and evaluated in the parent
            from lab.data import resolve_dataset
            from lab.models import preflight

            for i in todo:
                preflight(refs[i], cfg)
            resolve_dataset(cfg)
        reused = reusable_arms(cfg, todo) if todo else {}
        runs |= reused
        todo = [i for i in todo if i not in runs]
        names = list(cfg.arm_names) if not cfg.arms else unique_names(
            [arm_name(runs[i].data.tags.get("ab.model", refs[i])) if i in runs else arm_name(refs[i])
             for i in range(len(refs))])
        order = sorted(runs)
        known = dict(zip(order, fetch_arms(client, [runs[i].info.run_id for i in order], [names[i] for i in order]),
                         strict=True))
        if len(known) > 1:  # before evaluating anything: the runs we have must already agree
            check_comparable(list(known.values()))
    except ValueError as err:  # ConfigError, ComparisonError, ModelError, DataError, unreadable runs
        return cli.fail(str(err), cli.EXIT_BAD_INPUT)
    except Exception as err:  # MlflowException, connection errors: one line, no trace
        if os.environ.get("AB_DEBUG"):
            raise
        return cli.fail(mlflow_error_line(err, "tracking server"), cli.EXIT_BAD_INPUT)
    return _compare_in_parent(cfg, names, known, reused, todo)


def _compare_in_parent(cfg: Config, names: list[str], known: dict[int, Any], reused: dict[int, Any],
                       todo: list[int]) -> int:
    import mlflow

    from lab import cli
    from lab.arm import one_line
    from lab.compare import analyse, fetch_arms, log_comparison
    from lab.launch import plan
    from lab.registry import promote

    client = mlflow.MlflowClient()
    run = cli.start_parent_run(cfg, "compare: " + " vs ".join(names))
    run_id, experiment_id = run.info.run_id, run.info.experiment_id
    try:
        # Prefixed as in `run`: `mlflow run -e compare` has already logged the raw -P values under the plain names.
        mlflow.log_params({f"config.{k}": v for k, v in flat_params(cfg).items()})
        mlflow.set_tags({"ab.role": "parent", "ab.kind": "compare", "ab.arms": ",".join(names)})
        mlflow.log_text(cfg.to_yaml(), "config.yaml")
        with tempfile.TemporaryDirectory(prefix="ablab-") as tmp:
            if todo:
                cfg_path = Path(tmp) / "config.yaml"
                cfg_path.write_text(cfg.to_yaml())
                print(f"ablab: evaluating {', '.join(cfg.arm_specs[i] for i in todo)} (no finished evaluation "
                      f"to reuse); parent run {run_id}", file=sys.stderr)
                # through the module, so tests can stand in for the arm processes
                outcomes = history.evaluate(cfg, cfg_path, run_id, experiment_id, cli.tracking_uri(),
                                            plan(cfg, len(todo)), todo)
                failed = [o for o in outcomes if o.returncode != 0 or o.run_id is None]
                if failed:
                    raise RuntimeError("; ".join(o.error or f"arm {o.name} failed" for o in failed))
                fetched = fetch_arms(client, [o.run_id for o in outcomes], [names[o.index] for o in outcomes])
                known |= {o.index: arm for o, arm in zip(outcomes, fetched, strict=True)}
            arms = [known[i] for i in range(len(names))]
            mark_reused(client, run_id, arms, reused)
            summary = analyse(cfg, arms, _class_names(cfg, arms))
            log_comparison(client, run_id, cfg, summary, Path(tmp) / "comparison")
            _link_sources(client, run_id, summary, arms)
            if cfg.promote_alias:
                promote(client, run_id, cfg.promote_alias, summary, arms)
    except KeyboardInterrupt:
        cli.end_failed(run_id, "interrupted", "KILLED")
        return cli.fail("interrupted", 130)
    except Exception as err:  # the parent is never left RUNNING
        cli.end_failed(run_id, one_line(err))
        if os.environ.get("AB_DEBUG"):
            raise
        return cli.fail(one_line(err), cli.EXIT_FAILED)
    mlflow.end_run("FINISHED")
    print(summary["sentence"])
    print(f"ablab: verdict {summary['verdict']}; report: comparison/report.html in run {run_id} "
          f"(#/experiments/{experiment_id}/runs/{run_id})", file=sys.stderr)
    return 0


def _class_names(cfg: Config, arms: list) -> tuple[str, ...] | None:
    """The dataset's class names when it resolves here to the arms' very test set; else None (indices)."""
    from lab.data import resolve_dataset

    try:
        info = resolve_dataset(cfg)
    except Exception:  # names are a nicety; a dataset absent on this machine is fine
        return None
    return info.class_names if info.fingerprint == arms[0].tags.get("ab.dataset_fingerprint") else None


def _link_sources(client, run_id: str, summary: dict[str, Any], arms: list) -> None:
    """Tags and a note linking every compared run (experiment and run id) from the new parent."""
    from mlflow.entities import RunTag

    tags, lines = [RunTag("ab.compared_runs", ",".join(arm.run_id for arm in arms))], []
    for arm in arms:
        experiment = client.get_run(arm.run_id).info.experiment_id
        tags.append(RunTag(f"ab.source.{arm.name}", f"{experiment}/{arm.run_id}"))
        lines.append(f"- {arm.name}: [{arm.spec}](#/experiments/{experiment}/runs/{arm.run_id})")
    note = f"**{summary['sentence']}**\n\nCompared runs:\n" + "\n".join(lines)
    tags.append(RunTag("mlflow.note.content", note + "\n\nSee artifacts: comparison/report.html"))
    client.log_batch(run_id, tags=tags)
