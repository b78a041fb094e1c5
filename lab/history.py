"""Teams and history: find past evaluations on any experiment you can read, reuse them, compare them, rank them.

Every ablab child run records what makes an evaluation repeatable: the model identity (`ab.model_identity`:
timm name and flags, registry version, or file hash), the dataset fingerprint, the preprocessing and the
precision. This module searches every readable experiment of the tracking server for such runs:

    python -m lab compare --a <child run id> --b <child run id>          # two evaluations, any experiments
    python -m lab compare --a models:/clf@champion --b models:/clf/7     # registry versions: reused or evaluated
    python -m lab leaderboard --fingerprint sha256:...                   # or: --data digits --seed 0

Reuse (`run` and `compare`): an arm reuses a FINISHED child run's predictions when identity, fingerprint,
preprocessing, precision and recipe all match; `rerun=true` evaluates again. The recipe: an as-is evaluation
(epochs=0) only matches another as-is one; a fine-tuned arm (epochs>0) also needs every training key of
RECIPE_KEYS equal, because its identity names the starting weights, not the weights it was tested with.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.config import Config, arm_name, flat_params, load_config

RUN_ID = re.compile(r"[0-9a-f]{32}")
FINGERPRINT = re.compile(r"sha256:[0-9a-f]{8,64}")
# Training keys that, with the starting weights (identity), decide what a fine-tuned arm tested. The test set,
# class names and input pipeline are covered by the fingerprint and the preprocessing tag.
RECIPE_KEYS = ("epochs", "lr", "weight_decay", "batch_size", "augment", "seed", "data")
# Keys a `compare` takes from its first run-id arm, so a registry model is evaluated on that arm's test set.
DATASET_KEYS = ("data", "seed", "test_fraction", "fake_samples", "fake_classes", "image_size", "preprocess",
                "mean", "std", "precision")
SEARCH_CHUNK = 100  # experiment ids per search_runs call


@dataclass(frozen=True)
class EvalKey:
    """What makes two evaluations the same; `recipe` holds (param, value) pairs that must also match."""

    identity: str
    fingerprint: str
    preprocess: str
    precision: str
    recipe: tuple[tuple[str, str], ...]


def recipe(cfg: Config) -> tuple[tuple[str, str], ...]:
    params = flat_params(cfg)
    keys = ("epochs",) if cfg.epochs == 0 else RECIPE_KEYS
    return tuple((k, params[k]) for k in keys)


def expected_key(spec: str, cfg: Config, num_classes: int, fingerprint: str) -> EvalKey:
    """The key a child run of `spec` under `cfg` would record, computed without running it.

    A registry URI needs only the registry (`models:/name@alias` -> `models:/name/<version>`); any other spec
    is resolved the way the arm resolves it, so identity and native preprocessing agree with what it logs.
    """
    from lab.arm import preprocess_for
    from lab.models import _registry_identity, resolve_model

    identity, native = _registry_identity(spec), None
    if identity is None:
        resolved = resolve_model(spec, cfg, num_classes)
        identity, native = resolved.identity, resolved.native
    return EvalKey(identity, fingerprint, preprocess_for(cfg, native).describe(), cfg.precision, recipe(cfg))


def readable_experiment_ids(client) -> list[str]:
    """Every active experiment the current user can read (a server with auth lists only those)."""
    from mlflow.entities import ViewType

    ids, token = [], None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        ids += [e.experiment_id for e in page]
        token = page.token
        if not token:
            return ids


def search_children(client, filter_string: str = "", experiment_ids: Sequence[str] | None = None) -> list:
    """FINISHED ablab child runs matching `filter_string` in every readable experiment, newest first."""
    experiment_ids = list(experiment_ids) if experiment_ids is not None else readable_experiment_ids(client)
    query = " and ".join(filter(None, ["tags.`ab.role` = 'child'", "attributes.status = 'FINISHED'", filter_string]))
    runs = []
    for start in range(0, len(experiment_ids), SEARCH_CHUNK):
        token = None
        while True:
            page = client.search_runs(experiment_ids[start:start + SEARCH_CHUNK], query, max_results=1000,
                                      order_by=["attributes.start_time DESC"], page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                break
    return sorted(runs, key=lambda r: r.info.start_time, reverse=True)


def _quoted(value: str) -> str | None:
    return f"'{value}'" if "'" not in value and "\\" not in value else None


def find_reusable(client, key: EvalKey, experiment_ids: Sequence[str] | None = None):
    """The newest FINISHED child run that evaluated exactly `key`, or None."""
    clauses = [f"tags.`ab.{tag}` = {q}" for tag, value in (("dataset_fingerprint", key.fingerprint),
                                                            ("model_identity", key.identity))
               if (q := _quoted(value))]
    for run in search_children(client, " and ".join(clauses), experiment_ids):
        tags, params = run.data.tags, run.data.params
        if (tags.get("ab.model_identity") == key.identity and tags.get("ab.dataset_fingerprint") == key.fingerprint
                and tags.get("ab.preprocess") == key.preprocess and tags.get("ab.precision") == key.precision
                and all(params.get(k) == v for k, v in key.recipe)):
            return run
    return None


def reusable_arms(cfg: Config, indices: Sequence[int] | None = None) -> dict[int, Any]:
    """arm index -> the FINISHED child run that already evaluated it the same way (none with rerun=true)."""
    if cfg.rerun:
        return {}
    from mlflow import MlflowClient

    from lab.data import resolve_dataset

    client, info = MlflowClient(), resolve_dataset(cfg)
    experiments = readable_experiment_ids(client)
    found = {}
    for i in indices if indices is not None else range(len(cfg.arm_specs)):
        key = expected_key(cfg.arm_specs[i], cfg, info.num_classes, info.fingerprint)
        if (run := find_reusable(client, key, experiments)) is not None:
            found[i] = run
            print(f"ablab: arm {cfg.arm_names[i]} ({cfg.arm_specs[i]}) reuses the predictions of run "
                  f"{run.info.run_id} (same model, test set, preprocessing, precision and recipe; rerun=true "
                  "evaluates again)", file=sys.stderr)
    return found


def evaluate(cfg: Config, cfg_path: Path, parent_run_id: str, experiment_id: str, uri: str, p,
             indices: Sequence[int]) -> list:
    """Run the arms at `indices` as child runs of the parent; all of them: lab.launch.run_arms as planned.

    A subset (the others reused) runs one arm after the other on the plan's device: the reused arms were
    measured in another job, so there is no same-batch latency pairing to keep.
    """
    import subprocess

    from mlflow import MlflowClient

    from lab.launch import ArmOutcome, Plan, _arm_command, _arm_env, run_arms

    if list(indices) == list(range(len(cfg.arm_specs))):
        return run_arms(cfg, cfg_path, parent_run_id, experiment_id, uri, p)
    seq = Plan("sequential", p.device, p.gpus[:1], (os.cpu_count() or 1) if p.device == "cpu" else 0)
    codes, errors = {}, {}
    with tempfile.TemporaryDirectory(prefix="ablab-arms-") as tmp:
        for i in indices:
            err_file = Path(tmp) / f"arm{i}.err"
            cmd = _arm_command(cfg_path, i, parent_run_id, experiment_id, seq, err_file, None, 1)
            codes[i] = subprocess.run(cmd, env=_arm_env(seq, i, uri), check=False).returncode
            errors[i] = err_file.read_text().strip() if err_file.exists() else ""
    runs = MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`ab.role` = 'child'")
    by_index = {int(r.data.tags.get("ab.arm_index", -1)): r.info.run_id for r in runs}
    names = cfg.arm_names
    return [ArmOutcome(i, names[i], by_index.get(i), codes[i],
                       errors[i] or (f"arm {names[i]} exited with code {codes[i]}" if codes[i] else ""))
            for i in indices]


def mark_reused(client, parent_run_id: str, arms: list, reused: dict[int, Any]) -> None:
    """Reused arms say so in the report (Arm.extra) and on the parent (tag ab.reused.<arm> = run id)."""
    from mlflow.entities import RunTag

    tags = []
    for i, run in reused.items():
        arms[i].extra["reused_from"] = run.info.run_id
        tags.append(RunTag(f"ab.reused.{arms[i].name}", run.info.run_id))
    if tags:
        client.log_batch(parent_run_id, tags=tags)


# ------------------------------------------------------------------------------------------------ compare


def _mlflow_message(err: Exception, what: str) -> str:
    """One line for an MLflow/HTTP error about `what`: not found, permission denied, anything else."""
    code = getattr(err, "error_code", "")
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if code == "RESOURCE_DOES_NOT_EXIST":
        return f"{what} does not exist on {os.environ.get('MLFLOW_TRACKING_URI')}"
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        who = f"user {user!r}" if user else "this user (no MLFLOW_TRACKING_USERNAME)"
        return f"{what}: permission denied for {who}; ask its experiment's owner for READ permission"
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{what}: {text[:300]}"


def _child_run(client, run_id: str):
    """A FINISHED ablab child run by id; anything else raises ValueError with one line."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ValueError(_mlflow_message(err, f"run {run_id}")) from None
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


def _unique(names: list[str]) -> list[str]:
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


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
        cfg = load_config(cli.config_path(args.config), {**overrides, "epochs": overrides.get("epochs", "0")})
        import mlflow

        from lab.compare import check_comparable, fetch_arms
        from lab.data import resolve_dataset
        from lab.models import preflight
        from lab.registry import check_promotable

        client = mlflow.MlflowClient()
        refs = list(cfg.arm_specs)
        runs = {i: _child_run(client, ref) for i, ref in enumerate(refs) if RUN_ID.fullmatch(ref)}
        cfg = _compare_config(args, overrides, runs)
        check_promotable(cfg)
        todo = [i for i in range(len(refs)) if i not in runs]
        for i in todo:
            preflight(refs[i], cfg)
        reused = reusable_arms(cfg, todo) if todo else {}
        runs |= reused
        todo = [i for i in todo if i not in runs]
        names = list(cfg.arm_names) if not cfg.arms else _unique(
            [arm_name(runs[i].data.tags.get("ab.model", refs[i])) if i in runs else arm_name(refs[i])
             for i in range(len(refs))])
        known = {i: arm for i, arm in zip(sorted(runs), fetch_arms(client, [runs[i].info.run_id for i in sorted(runs)],
                                                                   [names[i] for i in sorted(runs)]), strict=True)}
        if len(known) > 1:
            check_comparable(list(known.values()))
        if todo:
            resolve_dataset(cfg)
    except ValueError as err:  # ConfigError, ComparisonError, ModelError, DataError, unreadable runs
        return cli.fail(str(err), cli.EXIT_BAD_INPUT)
    except Exception as err:  # MlflowException, connection errors: one line, no trace
        if os.environ.get("AB_DEBUG"):
            raise
        return cli.fail(_mlflow_message(err, "tracking server"), cli.EXIT_BAD_INPUT)
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
        mlflow.log_params(flat_params(cfg))
        sources = {names[i]: arm.run_id for i, arm in known.items()}
        mlflow.set_tags({"ab.role": "parent", "ab.kind": "compare", "ab.arms": ",".join(names),
                         "ab.compared_runs": ",".join(sources.values())})
        mlflow.log_text(cfg.to_yaml(), "config.yaml")
        with tempfile.TemporaryDirectory(prefix="ablab-") as tmp:
            if todo:
                cfg_path = Path(tmp) / "config.yaml"
                cfg_path.write_text(cfg.to_yaml())
                print(f"ablab: evaluating {', '.join(cfg.arm_specs[i] for i in todo)} (no finished evaluation "
                      f"to reuse); parent run {run_id}", file=sys.stderr)
                outcomes = evaluate(cfg, cfg_path, run_id, experiment_id, cli.tracking_uri(), plan(cfg, len(todo)),
                                    todo)
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

    tags, lines = [], []
    for arm in arms:
        experiment = client.get_run(arm.run_id).info.experiment_id
        tags.append(RunTag(f"ab.source.{arm.name}", f"{experiment}/{arm.run_id}"))
        lines.append(f"- {arm.name}: [{arm.spec}](#/experiments/{experiment}/runs/{arm.run_id})"
                     + (f" (reused from {arm.extra['reused_from']})" if arm.extra.get("reused_from") else ""))
    note = f"**{summary['sentence']}**\n\nCompared runs:\n" + "\n".join(lines)
    tags.append(RunTag("mlflow.note.content", note + "\n\nSee artifacts: comparison/report.html"))
    client.log_batch(run_id, tags=tags)


# ------------------------------------------------------------------------------------------------ leaderboard


def cmd_leaderboard(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """`python -m lab leaderboard`: every FINISHED evaluation on one test set, ranked, logged as a table."""
    from lab import cli

    os.environ["MLFLOW_TRACKING_URI"] = cli.tracking_uri()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per fetched run is noise
    try:
        cfg = load_config(cli.config_path(args.config), overrides)
        fingerprint = args.fingerprint
        if fingerprint and not FINGERPRINT.fullmatch(fingerprint):
            raise ValueError(f"fingerprint: {fingerprint!r} is not a dataset fingerprint (sha256:<32 hex digits>, "
                             "tag ab.dataset_fingerprint of a child run)")
        if not fingerprint:
            from lab.data import resolve_dataset

            fingerprint = resolve_dataset(cfg).fingerprint
        import mlflow

        from lab.compare import fetch_arms

        client = mlflow.MlflowClient()
        runs = search_children(client, f"tags.`ab.dataset_fingerprint` = '{fingerprint}'")
        if not runs:
            raise ValueError(f"no FINISHED ablab evaluation on dataset fingerprint {fingerprint} in any "
                             "experiment you can read")
        arms = fetch_arms(client, [r.info.run_id for r in runs], _unique([r.info.run_id[:8] for r in runs]))
    except ValueError as err:
        return cli.fail(str(err), cli.EXIT_BAD_INPUT)
    except Exception as err:  # MlflowException, connection errors: one line, no trace
        if os.environ.get("AB_DEBUG"):
            raise
        return cli.fail(_mlflow_message(err, "tracking server"), cli.EXIT_BAD_INPUT)
    return _log_leaderboard(cfg, fingerprint, arms, runs)


def _log_leaderboard(cfg: Config, fingerprint: str, arms: list, runs: list) -> int:
    import mlflow

    from lab import cli
    from lab.arm import one_line
    from lab.leaderboard import format_table, leaderboard_table

    client = mlflow.MlflowClient()
    experiment_names: dict[str, str] = {}
    for r in runs:
        eid = r.info.experiment_id
        if eid not in experiment_names:
            experiment_names[eid] = client.get_experiment(eid).name
    context = {r.info.run_id: {"experiment": experiment_names[r.info.experiment_id],
                               "epochs": r.data.params.get("epochs", "")} for r in runs}
    table = leaderboard_table(arms, context, alpha=cfg.alpha, method=cfg.mcnemar_method)
    run = cli.start_parent_run(cfg, f"leaderboard {fingerprint.removeprefix('sha256:')[:12]}")
    try:
        mlflow.set_tags({"ab.role": "leaderboard", "ab.dataset_fingerprint": fingerprint,
                         "ab.leaderboard_best": table.iloc[0]["model"], "ab.leaderboard_size": str(len(table))})
        mlflow.log_params({"fingerprint": fingerprint, "alpha": cfg.alpha, "mcnemar_method": cfg.mcnemar_method})
        mlflow.log_table(table, "leaderboard.json")
        text = format_table(table)
        mlflow.log_text(text + "\n", "leaderboard.txt")
    except Exception as err:  # never leave the run RUNNING
        cli.end_failed(run.info.run_id, one_line(err))
        return cli.fail(one_line(err), cli.EXIT_FAILED)
    mlflow.end_run("FINISHED")
    print(text)
    print(f"ablab: {len(table)} evaluations on {fingerprint}; table leaderboard.json in run {run.info.run_id}",
          file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------------ CLI

COMPARE_HELP = {
    "a": "arm A (the baseline): a child run id, or a model spec (models:/name@alias, models:/name/3, timm name) "
         "whose finished evaluation is reused, or evaluated here when there is none",
    "b": "arm B: a child run id or a model spec, as for --a",
    "arms": "comma-separated run ids or model specs for an A/B/n comparison (wins over a/b)",
    "experiment": "experiment of the new comparison run (default: ablab)",
    "epochs": "fine-tune epochs for arms that must be evaluated (default here: 0 = as they are)",
    "promote_alias": "registry alias (e.g. champion) to move to B's version when the verdict says B wins",
}


def add_commands(sub: argparse._SubParsersAction, add_config_options: Callable, overrides: Callable) -> None:
    """Register `compare` and `leaderboard` on the CLI; options mirror the MLproject entry points."""
    compare = sub.add_parser("compare", help="compare existing evaluations (run ids or registered models) in a "
                                             "new parent run")
    add_config_options(compare)
    for action in compare._actions:
        action.help = COMPARE_HELP.get(action.dest, action.help)
    compare.set_defaults(func=lambda args: cmd_compare(args, overrides(args)))

    board = sub.add_parser("leaderboard", help="rank every finished evaluation on one test set, across experiments")
    board.add_argument("--fingerprint", default="", help="dataset fingerprint (sha256:...); default: computed "
                                                         "from --data/--seed/... as `run` would")
    add_config_options(board)
    board.set_defaults(func=lambda args: cmd_leaderboard(args, overrides(args)))

