"""Teams and history: find past evaluations in every experiment you can read, and reuse them.

Every ablab child run records what makes an evaluation repeatable: the model identity (`ab.model_identity`:
timm name and flags, registry version, or file hash), the dataset fingerprint, the preprocessing and the
precision. `find_reusable` searches the tracking server (a local store or a shared `mlflow server`) for a
FINISHED child run with the same key; `python -m lab run` and `compare` then reuse its predictions instead of
evaluating again (`rerun=true` evaluates anyway), and the report names the run each reused arm came from.

The recipe is part of the key: an as-is evaluation (epochs=0) only matches another as-is one; a fine-tuned arm
(epochs>0) also needs every training key of RECIPE_KEYS equal, because its identity names the starting weights,
not the weights it was tested with (training is not bit-reproducible, so a reused fine-tune is one sample of
that recipe; `rerun=true` draws another).

The commands built on it (registered here, on the CLI and in MLproject):
    python -m lab compare --a <child run id> --b models:/clf@challenger     # lab/compare_runs.py
    python -m lab leaderboard --fingerprint sha256:...                       # lab/leaderboard.py
and the promotion gate (`promote_alias`) is lab/registry.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.config import Config, flat_params

# Training keys that, with the starting weights (identity), decide what a fine-tuned arm tested. The test set,
# class names and input pipeline are covered by the fingerprint and the preprocessing tag.
RECIPE_KEYS = ("epochs", "lr", "weight_decay", "batch_size", "augment", "seed", "data")
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


def expected_key(spec: str, cfg: Config, num_classes: int, fingerprint: str) -> EvalKey | None:
    """The key a child run of `spec` under `cfg` would record, computed without loading any weights.

    Built from the same pieces as lab.models: the timm identity string, a checkpoint file's hash, a registry
    version (`models:/name@alias` -> `models:/name/<version>`), and timm's data config for native
    preprocessing. None where that cannot be told cheaply (a `runs:/` model, a missing file, a registry alias
    that does not resolve, native preprocessing of a checkpoint that names its architecture only inside): the
    arm is then evaluated, and it reports whatever is wrong with the spec.
    """
    from types import SimpleNamespace

    from mlflow.exceptions import MlflowException
    from timm.models import get_pretrained_cfg

    from lab.arm import preprocess_for
    from lab.models import _file_sha256, _native_preprocess, _registry_identity, _split_checkpoint_spec, spec_kind

    kind, arch = spec_kind(spec), None
    if kind == "mlflow":
        try:
            identity = _registry_identity(spec)
        except MlflowException:
            return None
        if identity is None:
            return None
    elif kind == "checkpoint":
        arch, path = _split_checkpoint_spec(spec)
        if not path.is_file() or (cfg.preprocess == "native" and arch is None):
            return None
        identity = f"sha256:{_file_sha256(path)[:32]}"
    else:
        arch, identity = spec, f"timm:{spec}:pretrained={cfg.pretrained}:classes={num_classes}"
    native = None
    if cfg.preprocess == "native" and arch is not None and (pretrained := get_pretrained_cfg(arch)) is not None:
        # What timm.create_model attaches as `model.pretrained_cfg`, read the way the arm reads it.
        native = _native_preprocess(SimpleNamespace(pretrained_cfg=pretrained.to_dict()))
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
    from mlflow.exceptions import MlflowException

    from lab.data import resolve_dataset

    client, info = MlflowClient(), resolve_dataset(cfg)
    found = {}
    try:
        experiments = readable_experiment_ids(client)
        for i in indices if indices is not None else range(len(cfg.arm_specs)):
            key = expected_key(cfg.arm_specs[i], cfg, info.num_classes, info.fingerprint)
            if key is not None and (run := find_reusable(client, key, experiments)) is not None:
                found[i] = run
    except MlflowException as err:  # unreachable server, no permission: one line before any run exists
        raise ValueError(mlflow_error_line(err, "looking for finished evaluations to reuse")) from None
    for i, run in found.items():
        print(f"ablab: arm {cfg.arm_names[i]} ({cfg.arm_specs[i]}) reuses the predictions of run {run.info.run_id} "
              "(same model, test set, preprocessing, precision and recipe; rerun=true evaluates again)",
              file=sys.stderr)
    return found


def evaluate(cfg: Config, cfg_path: Path, parent_run_id: str, experiment_id: str, uri: str, p,
             indices: Sequence[int]) -> list:
    """Run the arms at `indices` as child runs of the parent; all of them: lab.launch.run_arms as planned.

    A subset (the others reused) runs one arm after the other on the plan's device: the reused arms were
    measured in another job, so there is no same-batch latency pairing to keep.
    """
    import subprocess

    from mlflow import MlflowClient

    # run_arms starts every arm; a subset is started here with the launcher's own command line and environment.
    from lab.launch import ArmOutcome, Plan, _arm_command, _arm_env, _die_with_parent, run_arms

    if not indices:
        return []
    if list(indices) == list(range(len(cfg.arm_specs))):
        return run_arms(cfg, cfg_path, parent_run_id, experiment_id, uri, p)
    seq = Plan("sequential", p.device, p.gpus[:1], (os.cpu_count() or 1) if p.device == "cpu" else 0)
    codes, errors = {}, {}
    with tempfile.TemporaryDirectory(prefix="ablab-arms-") as tmp:
        for i in indices:
            err_file = Path(tmp) / f"arm{i}.err"
            cmd = _arm_command(cfg_path, i, parent_run_id, experiment_id, seq, err_file, None, 1)
            codes[i] = subprocess.run(cmd, env=_arm_env(seq, i, uri), preexec_fn=_die_with_parent,
                                      check=False).returncode  # killed with us on Ctrl-C, like run_arms' arms
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


def mlflow_error_line(err: Exception, what: str) -> str:
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


def unique_names(names: list[str]) -> list[str]:
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


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
    compare.set_defaults(func=lambda args: _compare(args, overrides(args)))

    board = sub.add_parser("leaderboard", help="rank every finished evaluation on one test set, across experiments")
    board.add_argument("--fingerprint", default="", help="dataset fingerprint (sha256:...); default: computed "
                                                         "from --data/--seed/... as `run` would")
    add_config_options(board)
    board.set_defaults(func=lambda args: _leaderboard(args, overrides(args)))


def _compare(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from lab.compare_runs import cmd_compare

    return cmd_compare(args, overrides)


def _leaderboard(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from lab.leaderboard import cmd_leaderboard

    return cmd_leaderboard(args, overrides)
