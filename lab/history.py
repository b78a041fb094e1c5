"""Reuse: the key that makes two evaluations the same, and the finished child runs (in every experiment you can
read) that already evaluated an arm that way.

Every ablab child run records what makes an evaluation repeatable: the model identity (`ab.model_identity`:
timm name and flags, registry version, or file hash), the dataset fingerprint, the preprocessing, the
precision and whether it ran with deterministic kernels (`ab.deterministic`; a run older than that tag counts as
false). `find_reusable` searches the tracking server (a local store or a shared `mlflow server`) for a
FINISHED child run with the same key; `python -m lab run` and `compare` then reuse its predictions instead of
evaluating again (`rerun=true` evaluates anyway), and the report names the run each reused arm came from.

The recipe is part of the key: an as-is evaluation (epochs=0) only matches another as-is one; a fine-tuned arm
(epochs>0) also needs every training key of RECIPE_KEYS equal, because its identity names the starting weights,
not the weights it was tested with (training is not bit-reproducible, so a reused fine-tune is one sample of
that recipe; `rerun=true` draws another).

A registry version (`models:/name/<v>`) is also found in the fine-tuned child whose logged model became that
version (tag `ab.registered.<name>` = v, lab/registry.py): its predictions are those very weights, tested, so no
recipe needs to match, only the test set, preprocessing and precision.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities import Run, RunTag
from mlflow.exceptions import MlflowException

from lab import lifecycle, runs
from lab.compare import Arm
from lab.config import Config, flat_params
from lab.registry import REGISTRY_VERSION

# Training keys that, with the starting weights (identity), decide what a fine-tuned arm tested. The test set,
# class names and input pipeline are covered by the fingerprint and the preprocessing tag.
RECIPE_KEYS = ("epochs", "lr", "weight_decay", "batch_size", "augment", "seed", "data", "devices_per_arm")
# A param that runs before it existed did not log, with the value they ran with: a DDP fine-tune (another
# effective batch and order) is never reused for a one-process one, nor the reverse.
PARAM_BEFORE = {"devices_per_arm": "1"}


@dataclass(frozen=True)
class EvalKey:
    """What makes two evaluations the same; `recipe` holds (param, value) pairs that must also match."""

    identity: str
    fingerprint: str
    preprocess: str
    precision: str
    recipe: tuple[tuple[str, str], ...]
    # Fine-tunes: (tag, value) pairs the child must carry too (lab/data/keys.training_tags: the arm's seed,
    # determinism, the training split's contents, library versions).
    training: tuple[tuple[str, str], ...] = ()
    # Every arm: Trainer(deterministic=...) changes the kernels a test runs, so a run's predictions are reused
    # only by a job that asks for the same ("true"/"false", tag ab.deterministic; no tag = "false").
    deterministic: str = "false"


def recipe(cfg: Config) -> tuple[tuple[str, str], ...]:
    """The training params that must match: only `epochs` for an as-is evaluation, RECIPE_KEYS for a fine-tune."""
    params = flat_params(cfg)
    keys = ("epochs",) if cfg.epochs == 0 else RECIPE_KEYS
    return tuple((k, params[k]) for k in keys)


def expected_key(spec: str, cfg: Config, num_classes: int, fingerprint: str) -> EvalKey | None:
    """The key a child run of `spec` under `cfg` would record, computed without loading any weights.

    None where lab.models cannot tell the identity or the input pipeline cheaply (see `expected_identity` and
    `expected_preprocess`): the arm is then evaluated, and it reports whatever is wrong with the spec.
    """
    from lab import models  # torch: only `run` and `compare` of model specs get here

    preprocess = models.expected_preprocess(spec, cfg)
    identity = models.expected_identity(spec, cfg, num_classes) if preprocess is not None else None
    return make_key(cfg, identity, preprocess.describe() if preprocess is not None else None, fingerprint)


def make_key(cfg: Config, identity: str | None, preprocess: str | None, fingerprint: str) -> EvalKey | None:
    """The key of an arm that would record `identity` and `preprocess` (None where either is unknown)."""
    if identity is None or preprocess is None:
        return None
    return EvalKey(identity, fingerprint, preprocess, cfg.precision, recipe(cfg),
                   deterministic=str(cfg.deterministic).lower())


def _quoted(value: str) -> str | None:
    return f"'{value}'" if "'" not in value and "\\" not in value else None


def find_reusable(client, key: EvalKey, experiment_ids: Sequence[str] | None = None) -> Run | None:
    """The newest FINISHED child run that evaluated exactly `key`, else (for a registry version) the child that
    tested the weights registered as that version; or None."""
    # The store narrows by every tag it can compare (the rest is checked below); a missing deterministic tag
    # means false, which a search cannot express, so only "true" is narrowed there.
    narrow = [("dataset_fingerprint", key.fingerprint), ("model_identity", key.identity),
              ("precision", key.precision), *([("deterministic", "true")] if key.deterministic == "true" else [])]
    clauses = [f"tags.`ab.{tag}` = {q}" for tag, value in narrow if (q := _quoted(value))]
    for run in runs.search_children(client, " and ".join(clauses), experiment_ids):
        tags, params = run.data.tags, run.data.params
        if (tags.get("ab.model_identity") == key.identity and _same_test(tags, key)
                and all(params.get(k, PARAM_BEFORE.get(k)) == v for k, v in key.recipe)
                and all(tags.get(k) == v for k, v in key.training)
                and lifecycle.reusable(client, run)):
            return run
    registered = REGISTRY_VERSION.fullmatch(key.identity)
    if registered is None or _quoted(registered["name"] + registered["version"]) is None or "`" in key.identity:
        return None
    tag = f"ab.registered.{registered['name']}"
    query = f"tags.`{tag}` = '{registered['version']}'"
    return next((run for run in runs.search_children(client, query, experiment_ids)
                 if run.data.tags.get(tag) == registered["version"] and _same_test(run.data.tags, key)
                 and lifecycle.reusable(client, run)), None)


def _same_test(tags: dict[str, str], key: EvalKey) -> bool:
    return (tags.get("ab.dataset_fingerprint") == key.fingerprint and tags.get("ab.preprocess") == key.preprocess
            and tags.get("ab.precision") == key.precision
            and tags.get("ab.deterministic", "false") == key.deterministic)


def reusable_arms(cfg: Config, indices: Sequence[int] | None = None,
                  expected: dict[int, tuple[str | None, str | None]] | None = None) -> dict[int, Run]:
    """arm index -> the FINISHED child run that already evaluated it the same way (none with rerun=true).
    `expected`: each arm's identity and preprocess, told already (lab/models `probe`, without torch here)."""
    if cfg.rerun:
        return {}
    from lab.data import resolve_dataset, training_tags  # torch: only `run` and `compare` of model specs get here

    client, info = MlflowClient(), resolve_dataset(cfg)
    keys = {}
    try:
        for i in indices if indices is not None else range(len(cfg.arm_specs)):
            key = (expected_key(cfg.arm_specs[i], cfg, info.num_classes, info.fingerprint)  # may ask the registry
                   if expected is None else make_key(cfg, *expected.get(i, (None, None)), info.fingerprint))
            if key is not None:  # the training data, seed and libraries: a changed training image trains again
                keys[i] = dataclasses.replace(key, training=tuple(training_tags(cfg, i, info).items()))
        found, note = lookup(client, keys)
        if note:  # a crashed job's runs: never reused
            print(note, file=sys.stderr)
    except MlflowException as err:  # unreachable server, no permission: one line before any run exists
        raise ValueError(runs.mlflow_error_line(err, "looking for finished evaluations to reuse")) from None
    for i, run in found.items():
        print(f"ablab: arm {cfg.arm_names[i]} ({cfg.arm_specs[i]}) reuses the predictions of run {run.info.run_id} "
              f"(same {reuse_key_line(cfg.epochs > 0)}; rerun=true evaluates again)",
              file=sys.stderr)
    return found


def lookup(client, keys: dict[int, EvalKey]) -> tuple[dict[int, Run], str]:
    """The tracking-store side of `reusable_arms` (what benchmarks/history_scale.py times): arm index -> the run
    to reuse, and the note about stale runs ("" when none)."""
    experiments = runs.readable_experiment_ids(client)
    found = {i: run for i, key in keys.items() if (run := find_reusable(client, key, experiments)) is not None}
    fingerprints = {key.fingerprint for key in keys.values()}
    return found, lifecycle.stale_note(client, experiments, next(iter(fingerprints)) if len(fingerprints) == 1 else "")


def reuse_key_line(fine_tune: bool) -> str:
    """What a reused arm matched on, in words (the console line and the parent's `ab.reuse_key.<arm>` tag)."""
    if not fine_tune:
        return "model, test set, preprocessing, precision, deterministic and epochs=0"
    return ("model, test set, preprocessing, precision, recipe (" + ", ".join(RECIPE_KEYS) + "), seed of the arm, "
            "deterministic, training-split contents and torch/torchvision/timm/lightning versions")


def mark_reused(client, parent_run_id: str, arms: list[Arm], reused: dict[int, Run]) -> None:
    """Reused arms say so in the report (Arm.extra) and on the parent (tags ab.reused.<arm> = run id, and
    ab.reuse_key.<arm> = what matched)."""
    tags = []
    for i, run in reused.items():
        arms[i].extra["reused_from"] = run.info.run_id
        tags.append(RunTag(f"ab.reused.{arms[i].name}", run.info.run_id))
        fine_tune = run.data.params.get("epochs", "0") != "0"
        tags.append(RunTag(f"ab.reuse_key.{arms[i].name}", reuse_key_line(fine_tune)))
    if tags:
        client.log_batch(parent_run_id, tags=tags)
