"""lab/config.py: typed, validated once; YAML then command line; every shipped YAML loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.config import Config, ConfigError, build_config, flat_params, load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert len(cfg.arm_specs) >= 2


def test_command_line_wins_over_yaml(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("a: resnet50\nepochs: 3\nbatch_size: 32\n")
    cfg = load_config(path, {"epochs": "7", "b": "", "seed": None})
    assert (cfg.a, cfg.epochs, cfg.batch_size, cfg.b) == ("resnet50", 7, 32, Config.b)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"epoch": 3}, "unknown config key 'epoch'; did you mean epochs"),
        ({"epochs": "three"}, "epochs: expected an integer, got 'three'"),
        ({"epochs": 2.5}, "epochs: expected an integer"),
        ({"epochs": -1}, "epochs: -1 is out of range"),
        ({"alpha": 0.0}, "alpha: 0.0 is out of range; allowed (0.0, 0.5]"),
        ({"alpha": "x"}, "alpha: expected a number"),
        ({"placement": "diagonal"}, "placement: 'diagonal' is not allowed; choose one of auto, parallel"),
        ({"pretrained": "maybe"}, "pretrained: expected true or false"),
        ({"devices": "gpu0"}, "devices: 'gpu0' is not allowed"),
        ({"rule": "equivalence"}, "margin: the equivalence rule needs margin > 0"),
        ({"arms": "resnet18"}, "arms: need at least two models"),
        ({"mean": "0.5,0.5"}, "mean/std: expected three numbers"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(values: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(values)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)


def test_types_are_coerced_from_strings() -> None:
    cfg = build_config(
        {
            "arms": "resnet18, resnet34 ,resnet50",
            "pretrained": "True",
            "lr": "1e-4",
            "mean": "0.5,0.5,0.5",
            "devices": "0,1",
        }
    )
    assert cfg.arm_specs == ("resnet18", "resnet34", "resnet50")
    assert cfg.arm_names == ("resnet18", "resnet34", "resnet50")
    assert cfg.pretrained is True and cfg.lr == pytest.approx(1e-4) and cfg.mean == (0.5, 0.5, 0.5)


def test_arm_names_are_unique_and_readable() -> None:
    cfg = build_config({"arms": ["models:/clf@champion", "runs:/abc/model", "/ckpt/best.safetensors"]})
    assert cfg.arm_names == ("clf@champion", "model", "best")
    assert build_config({}).arm_names == ("a", "b")


def test_config_is_frozen_and_round_trips() -> None:
    cfg = build_config({"arms": ["resnet18", "resnet34"], "margin": 0.01, "rule": "non_inferiority"})
    with pytest.raises(AttributeError):
        cfg.epochs = 3  # type: ignore[misc]
    assert build_config(__import__("yaml").safe_load(cfg.to_yaml())) == cfg
    params = flat_params(cfg)
    assert params["arms"] == "resnet18,resnet34" and params["margin"] == "0.01"
