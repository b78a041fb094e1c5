"""lab/registry.py: the promotion gate, alone (decide_promotion) and against a SQLite model registry (promote).

The gate at work inside `compare` is in tests/test_compare_runs.py; which configs may promote at all is a config
rule (tests/test_config.py).
"""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from history_fakes import make_arm, predictions

from lab.registry import decide_promotion, promote, register_arms, registry_version

LABELS = np.arange(30) % 3


@pytest.mark.parametrize(("verdict", "arms", "b", "current", "moved"), [
    ("b_better", 2, ("clf", "2"), "1", True),
    ("b_non_inferior", 2, ("clf", "2"), None, True),
    ("b_better", 2, ("clf", "2"), "2", False),
    ("a_better", 2, ("clf", "2"), "1", False),
    ("no_significant_difference", 2, ("clf", "2"), "1", False),
    ("non_inferiority_not_shown", 2, ("clf", "2"), "1", False),
    ("equivalent", 2, ("clf", "2"), "1", False),
    ("b_better", 2, None, "1", False),
    ("b_best", 3, ("clf", "2"), "1", False),
])
def test_promotion_gate_moves_only_on_a_win(verdict, arms, b, current, moved) -> None:
    assert decide_promotion(verdict, arms, b, current)[0] is moved


def registry_arm(name: str, identity: str):
    return make_arm(name, predictions(LABELS, LABELS > 0), **{"ab.model_identity": identity})


def test_registry_version_is_read_from_the_identity_the_arm_evaluated() -> None:
    assert registry_version(registry_arm("b", "models:/clf/7")) == ("clf", "7")
    assert registry_version(registry_arm("b", "timm:resnet18:pretrained=True:classes=3")) is None


def test_promote_moves_the_alias_or_keeps_it_and_tags_the_parent(tracking: str, capsys) -> None:
    client = mlflow.MlflowClient()
    client.create_registered_model("clf")
    for _ in range(2):
        client.create_model_version("clf", source="file:///models/clf")
    parent = client.create_run(client.create_experiment("e")).info.run_id
    arms = [registry_arm("a", "models:/clf/1"), registry_arm("b", "models:/clf/2")]

    tags = promote(client, parent, "champion", {"verdict": "b_better"}, arms)  # no champion yet: B becomes it
    assert (tags["ab.promotion"], tags["ab.promotion_from"], tags["ab.promotion_to"]) == ("moved", "none", "2")
    assert str(client.get_model_version_by_alias("clf", "champion").version) == "2"
    assert client.get_run(parent).data.tags["ab.promotion_alias"] == "clf@champion"
    assert "ablab: promotion moved: clf@champion none -> 2 (verdict b_better)" in capsys.readouterr().err

    client.set_registered_model_alias("clf", "champion", "1")
    tags = promote(client, parent, "champion", {"verdict": "no_significant_difference"}, arms)
    assert (tags["ab.promotion"], tags["ab.promotion_from"], tags["ab.promotion_to"]) == ("kept", "1", "1")
    assert str(client.get_model_version_by_alias("clf", "champion").version) == "1"
    assert client.get_run(parent).data.tags["ab.promotion_reason"].startswith("verdict no_significant_difference")


def test_register_arms_registers_each_logged_model_once_and_tags_parent_and_children(tracking: str, capsys) -> None:
    from history_fakes import log_fast_child

    from lab.compare import fetch_arms

    client = mlflow.MlflowClient()
    exp = client.create_experiment("e")
    parent = client.create_run(exp).info.run_id
    tuned = [log_fast_child(client, exp, 0.5, "timm:resnet10t:pretrained=False:classes=10", logged_model=True,
                            arm=arm) for arm in ("a", "b")]
    as_is = log_fast_child(client, exp, 0.5, "timm:resnet18:pretrained=True:classes=10", arm="c",
                           **{"ab.logged_model": "m-external", "ab.logged_model_format": "external"})
    arms = fetch_arms(client, [*tuned, as_is], ["a", "b", "c"])

    assert register_arms(client, parent, "clf", arms) == {0: ("clf", "1"), 1: ("clf", "2")}
    tags = client.get_run(parent).data.tags
    assert (tags["ab.register"], tags["ab.registered.a"], tags["ab.registered.b"]) == ("clf", "clf/1", "clf/2")
    assert tags["ab.registered.c"] == "none: no weights logged (scored as it is, or log_model=false)"
    assert [client.get_run(r).data.tags["ab.registered.clf"] for r in tuned] == ["1", "2"]
    version = client.get_model_version("clf", "2")
    assert (version.source, version.run_id) == (f"models:/{arms[1].tags['ab.logged_model']}", tuned[1])
    assert "ablab: arm a: models:/clf/1 (registered now)" in capsys.readouterr().err

    # Again (the arms reused by a later job): no new versions; an arm that evaluated a version of clf is that one.
    arms.append(registry_arm("d", "models:/clf/1"))
    assert register_arms(client, parent, "clf", arms) == {0: ("clf", "1"), 1: ("clf", "2"), 3: ("clf", "1")}
    assert len(client.search_model_versions("name = 'clf'")) == 2
    assert "ablab: arm b: models:/clf/2 (registered before)" in capsys.readouterr().err


def test_promote_takes_the_version_registration_gave_b(tracking: str) -> None:
    client = mlflow.MlflowClient()
    client.create_registered_model("clf")
    for _ in range(3):
        client.create_model_version("clf", source="file:///models/clf")
    parent = client.create_run(client.create_experiment("e")).info.run_id
    arms = [registry_arm("a", "timm:a"), registry_arm("b", "timm:b")]
    tags = promote(client, parent, "champion", {"verdict": "b_better"}, arms, ("clf", "3"))
    assert (tags["ab.promotion"], tags["ab.promotion_to"]) == ("moved", "3")
    tags = promote(client, parent, "champion", {"verdict": "b_better"}, arms)  # B has no version: the gate says so
    assert tags["ab.promotion"] == "kept" and "not a registered model version" in tags["ab.promotion_reason"]
