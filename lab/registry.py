"""Registration and the promotion gate: register each arm's logged model as a version of one registered model
(at most once per model), and after an A/B move an alias (e.g. `champion`) to B's version only when the verdict
under the chosen rule says B wins; the parent run records what happened either way.

    python -m lab run --a models:/clf@champion --b models:/clf/7 --promote_alias champion
    python -m lab compare --a <child run id> --b models:/clf@challenger --promote_alias champion
    python -m lab run --a mobilenetv3_small_100 --b resnet18 --register clf --promote_alias champion

`register_arms` tags the parent `ab.registered.<arm>` (`name/version`, or why none) and each registered child
`ab.registered.<name>` = version, which is how a later `compare` of `models:/name@champion` finds (lab/history.py)
the evaluation that produced that version.

B's version is the one `register_arms` gave its logged model, else read from its child run's `ab.model_identity`
(`models:/name/<version>`), the version that was actually evaluated, even if an alias moved while the job ran.
Tags on the parent: `ab.promotion` = moved | kept, `ab.promotion_alias` (`name@alias`), `ab.promotion_from` /
`ab.promotion_to` (versions, `none` when the alias did not exist), `ab.promotion_reason`. Whether a config may
promote at all (two arms, B registered or `register` set) is checked when it loads (lab/config.py).
"""

from __future__ import annotations

import re
import sys
from typing import Any

from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException

from lab.compare import Arm

# Verdicts (lab.stats.decide) under which B replaces the alias holder: superiority and non-inferiority shown.
WINNING_VERDICTS = frozenset({"b_better", "b_non_inferior"})
EVALUATED_AS_VERSION = "evaluated as this version"
REGISTRY_VERSION = re.compile(r"models:/(?P<name>[^/@]+)/(?P<version>\d+)")


def registry_version(arm: Arm) -> tuple[str, str] | None:
    """(registered model name, version) that an arm evaluated, or None when it is not a registry version."""
    m = REGISTRY_VERSION.fullmatch(arm.tags.get("ab.model_identity", ""))
    return (m["name"], m["version"]) if m else None


def decide_promotion(verdict: str, n_arms: int, b_version: tuple[str, str] | None,
                     current: str | None) -> tuple[bool, str]:
    """(move the alias?, why) from the verdict and where the alias points now; pure, for tests."""
    if n_arms != 2:
        return False, f"promotion needs exactly two arms (A, B); got {n_arms}"
    if b_version is None:
        return False, "B is not a registered model version (models:/name/<version> or models:/name@alias)"
    if verdict not in WINNING_VERDICTS:
        return False, f"verdict {verdict}: B did not win under the chosen rule"
    if current == b_version[1]:
        return False, f"verdict {verdict}, and the alias already points to B's version {current}"
    return True, f"verdict {verdict}"


def find_version(client, name: str, model_id: str) -> str | None:
    """The version of `name` already registered from the logged model `model_id`, or None."""
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.model_id == model_id or version.source == f"models:/{model_id}":
            return str(version.version)
    return None


def register_arm(client, name: str, arm: Arm) -> tuple[str | None, str]:
    """(version, how) for one arm: its own version when it evaluated `name`'s registry version, the version
    already registered from its logged model, or a new one; (None, why) when it logged no weights."""
    own = registry_version(arm)
    if own is not None and own[0] == name:
        return own[1], EVALUATED_AS_VERSION
    model_id, fmt = arm.tags.get("ab.logged_model"), arm.tags.get("ab.logged_model_format", "")
    if not model_id or fmt not in ("pt2", "safetensors", "mlflow"):  # "mlflow": another registry's model, as is
        return None, "no weights logged (scored as it is, or log_model=false)" if model_id else "no logged model"
    if (found := find_version(client, name, model_id)) is not None:
        return found, "registered before"
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, f"models:/{model_id}", run_id=arm.run_id, model_id=model_id)
    return str(version.version), "registered now"


def register_arms(client, parent_run_id: str, name: str, arms: list[Arm]) -> dict[int, tuple[str, str]]:
    """Register every arm's logged model as a version of `name` (at most once per model); arm index ->
    (name, version) for those that have one. Tags the parent and each registered child."""
    versions, tags = {}, []
    for i, arm in enumerate(arms):
        version, how = register_arm(client, name, arm)
        tags.append(RunTag(f"ab.registered.{arm.name}", f"{name}/{version}" if version else f"none: {how}"))
        if version is not None:
            versions[i] = (name, version)
        if version is not None and how != EVALUATED_AS_VERSION:  # its identity already names the version
            client.set_tag(arm.run_id, f"ab.registered.{name}", version)
        where = f"models:/{name}/{version}" if version else "not registered"
        print(f"ablab: arm {arm.name}: {where} ({how})", file=sys.stderr)
    client.log_batch(parent_run_id, tags=[RunTag("ab.register", name), *tags])
    return versions


def promote(client, parent_run_id: str, alias: str, summary: dict[str, Any], arms: list[Arm],
            b_version: tuple[str, str] | None = None) -> dict[str, str]:
    """Apply the gate: move `alias` on B's registered model to B's version (`b_version` when registration gave
    it one, else the registry version B evaluated), or keep it; tag the parent."""
    b_version = b_version or (registry_version(arms[-1]) if arms else None)
    current = None
    if b_version is not None:
        try:
            current = str(client.get_model_version_by_alias(b_version[0], alias).version)  # int on some stores
        except MlflowException:  # the alias does not exist yet: the first winner creates it
            current = None
    move, reason = decide_promotion(summary["verdict"], len(arms), b_version, current)
    if move:
        client.set_registered_model_alias(b_version[0], alias, b_version[1])
    target = b_version[1] if move else current
    tags = {"ab.promotion": "moved" if move else "kept",
            "ab.promotion_alias": f"{b_version[0]}@{alias}" if b_version else alias,
            "ab.promotion_from": str(current or "none"), "ab.promotion_to": str(target or "none"),
            "ab.promotion_reason": reason}
    client.log_batch(parent_run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    where = tags["ab.promotion_alias"]
    print(f"ablab: promotion {tags['ab.promotion']}: {where} {tags['ab.promotion_from']} -> {tags['ab.promotion_to']}"
          f" ({reason})", file=sys.stderr)
    return tags

