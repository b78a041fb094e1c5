"""`python -m lab compare`: compare evaluations that already exist -- child runs from any experiment you can
read, or registered models whose finished evaluation is found (lab/history.py) or run here -- in a new parent.

    python -m lab compare --a <child run id> --b <child run id> --experiment team-c
    python -m lab compare --a models:/clf@champion --b models:/clf/7 --data digits --promote_alias champion
    mlflow run . -e compare --env-manager local -P a=<run id> -P b=<run id>

This module turns the inputs into arms (lab/experiment.py's Job); the new parent holds the full report and links
every run it used: tags `ab.source.<arm>` = `<experiment id>/<run id>`, `ab.compared_runs`, `ab.reused.<arm>`,
and a note with links. Nothing is created when an input is wrong: unreadable, unfinished, not an ablab
evaluation, or runs that did not score the same test set end with one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from lab import experiment, history, launch, runs
from lab.compare import check_comparable, fetch_arms
from lab.config import RUN_ID, Config, arm_name, load_config, unique_names

# Keys taken from the first run-id arm (unless given), so a model evaluated here scores that arm's test set.
DATASET_KEYS = ("data", "seed", "test_fraction", "fake_samples", "fake_classes", "image_size", "preprocess",
                "mean", "std", "precision")


def child_run(client, run_id: str) -> Run:
    """A FINISHED ablab child run by id; anything else raises ValueError with one line."""
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ValueError(runs.mlflow_error_line(err, f"run {run_id}")) from None
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


def compare_config(path: Path, overrides: dict[str, Any], given: dict[int, Run]) -> Config:
    """YAML, then the dataset keys of the first run-id arm, then the command line; epochs=0 unless given."""
    values = dict(overrides)
    values.setdefault("epochs", "0")  # registry models are evaluated as they are
    if given:
        params = given[min(given)].data.params
        for key in DATASET_KEYS:
            if key not in overrides and params.get(key, "") != "":
                values[key] = params[key]
    return load_config(path, values)


def compare(path: Path, overrides: dict[str, Any]) -> experiment.Outcome:
    """`python -m lab compare`: a new parent run comparing existing evaluations (or evaluating what has none)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per fetched run is noise
    with runs.reading_runs():
        job = _job(path, overrides)
    outcome = experiment.conduct(job)
    print(outcome.summary["sentence"])
    print(f"ablab: verdict {outcome.summary['verdict']}; report: comparison/report.html in run {outcome.run_id} "
          f"(#/experiments/{outcome.experiment_id}/runs/{outcome.run_id})", file=sys.stderr)
    return outcome


def _job(path: Path, overrides: dict[str, Any]) -> experiment.Job:
    """Resolve every input before a run exists: run ids to finished child runs, model specs to a finished
    evaluation to reuse or to arms evaluated here; and check that the runs we have already agree."""
    refs = list(compare_config(path, overrides, {}).arm_specs)
    client = MlflowClient()
    given = {i: child_run(client, ref) for i, ref in enumerate(refs) if RUN_ID.fullmatch(ref)}
    cfg = compare_config(path, overrides, given)
    specs = [i for i in range(len(refs)) if i not in given]
    # Model specs: checked now, then a finished evaluation to reuse, else evaluated in the parent.
    probe = experiment.preflight(cfg, specs) if specs else None
    reused = history.reusable_arms(cfg, specs, probe.expected) if probe else {}
    found = given | reused
    todo = [i for i in specs if i not in found]
    names = list(cfg.arm_names) if not cfg.arms else unique_names(
        [arm_name(found[i].data.tags.get("ab.model", refs[i])) if i in found else arm_name(refs[i])
         for i in range(len(refs))])
    order = sorted(found)
    known = dict(zip(order, fetch_arms(client, [found[i].info.run_id for i in order], [names[i] for i in order]),
                     strict=True))
    experiment.add_params(client, list(known.values()))
    if len(known) > 1:  # before evaluating anything: the runs we have must already agree
        check_comparable(list(known.values()))
    announce = f"ablab: evaluating {', '.join(cfg.arm_specs[i] for i in todo)} (no finished evaluation to reuse)"
    # The parent is named by what was asked: a model spec as given, a run id by the model its run evaluated.
    models = [given[i].data.tags.get("ab.model") or refs[i] if i in given else refs[i] for i in range(len(refs))]
    return experiment.Job(cfg, names, runs.run_name(models),
                          {"ab.role": "parent", "ab.kind": "compare", "ab.arms": ",".join(names)},
                          launch.plan(cfg, len(todo), launch.visible_gpus(cfg, probe.cuda_devices)) if todo else None,
                          reused, known,
                          announce=announce if todo else "", link_sources=True)
