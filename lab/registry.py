"""The promotion gate: after an A/B between registered models, move an alias (e.g. `champion`) to B's version
only when the verdict under the chosen rule says B wins; the parent run records what happened either way.

    python -m lab run --a models:/clf@champion --b models:/clf/7 --promote_alias champion
    python -m lab compare --a <child run id> --b models:/clf@challenger --promote_alias champion

B's version is read from its child run's `ab.model_identity` (`models:/name/<version>`), the version that was
actually evaluated, even if an alias moved while the job ran. Tags on the parent: `ab.promotion` = moved | kept,
`ab.promotion_alias` (`name@alias`), `ab.promotion_from` / `ab.promotion_to` (versions, `none` when the alias
did not exist), `ab.promotion_reason`.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from lab.compare import Arm

# Verdicts (lab.stats.decide) under which B replaces the alias holder: superiority and non-inferiority shown.
WINNING_VERDICTS = frozenset({"b_better", "b_non_inferior"})
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


def promote(client, parent_run_id: str, alias: str, summary: dict[str, Any], arms: list[Arm]) -> dict[str, str]:
    """Apply the gate: move `alias` on B's registered model to B's version, or keep it; tag the parent."""
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    b_version = registry_version(arms[-1]) if arms else None
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


def check_promotable(cfg) -> None:
    """At load: a promotion gate needs an A/B whose B is a registry URI (`run`; `compare` checks B's run)."""
    from lab.config import ConfigError

    if not cfg.promote_alias:
        return
    if len(cfg.arm_specs) != 2:
        raise ConfigError(f"promote_alias: the promotion gate needs exactly two arms (A, B); got {len(cfg.arm_specs)}")
    b = cfg.arm_specs[1]
    if not b.startswith("models:/") and not re.fullmatch(r"[0-9a-f]{32}", b):
        raise ConfigError(f"promote_alias: B must be a registered model (models:/name@alias or models:/name/<version>)"
                          f", got {b!r}")
