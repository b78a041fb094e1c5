"""lab/config.py: typed, validated once; YAML then command line; every shipped YAML loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.config import Config, ConfigError, build_config, config_path, flat_params, load_config, unique_names

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
        ({"alpha": 0.0}, "alpha: 0.0 is out of range; allowed (0.0, 0.5)"),
        ({"alpha": 0.5}, "alpha: 0.5 is out of range; allowed (0.0, 0.5)"),
        ({"rule": "non_inferiority", "margin": 1.0}, "margin: 1.0 is out of range; allowed [0.0, 1.0)"),
        ({"rule": "bayes", "metric": "macro_f1"}, "rule: bayes reads the accuracy difference only (metric=macro_f1)"),
        ({"metric": "f1"}, "metric: 'f1' is not allowed; choose one of accuracy, balanced_accuracy, macro_f1, top5"),
        ({"group_by": "subfolder", "groups": "g.csv"}, "groups: give group_by=subfolder or groups=<csv>, not both"),
        ({"alpha": "x"}, "alpha: expected a number"),
        ({"placement": "diagonal"}, "placement: 'diagonal' is not allowed; choose one of auto, parallel"),
        ({"pretrained": "maybe"}, "pretrained: expected true or false"),
        ({"devices": "gpu0"}, "devices: 'gpu0' is not allowed"),
        ({"rule": "equivalence"}, "margin: the equivalence rule needs margin > 0"),
        ({"margin": 0.01}, "margin: the superiority rule takes no margin (got 0.01); set margin=0, or "
                           "rule=non_inferiority or equivalence"),
        ({"promote_alias": "champion"}, "promote_alias: B must be a registered model (models:/name@alias or "
                                        "models:/name/<version>), got 'mobilenetv3_small_100'"),
        ({"promote_alias": "champion", "arms": "models:/c/1,models:/c/2,models:/c/3"},
         "promote_alias: the promotion gate needs exactly two arms (A, B); got 3"),
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
    assert cfg.arm_names == ("clf-champion", "model", "best")
    assert build_config({}).arm_names == ("a", "b")


def test_config_is_frozen_and_round_trips() -> None:
    cfg = build_config({"arms": ["resnet18", "resnet34"], "margin": 0.01, "rule": "non_inferiority"})
    with pytest.raises(AttributeError):
        cfg.epochs = 3  # type: ignore[misc]
    assert build_config(__import__("yaml").safe_load(cfg.to_yaml())) == cfg
    params = flat_params(cfg)
    assert params["arms"] == "resnet18,resnet34" and params["margin"] == "0.01"


def test_issue_9_statistics_keys() -> None:
    cfg = build_config({"rule": "bayes", "margin": 0.005, "metric": "accuracy", "group_by": "subfolder"})
    assert (cfg.rule, cfg.margin, cfg.metric, cfg.group_by, cfg.groups) == ("bayes", 0.005, "accuracy", "subfolder", "")
    assert build_config({}).metric == "accuracy" and build_config({}).group_by == "none"
    assert build_config({"rule": "bayes"}).margin == 0.0  # no region of practical equivalence: better or worse
    assert build_config({"metric": "top5_accuracy", "groups": "/data/groups.csv"}).groups == "/data/groups.csv"


def test_a_promotion_gate_needs_a_registered_b_or_a_run_of_one() -> None:
    assert build_config({"promote_alias": "champion", "b": "models:/clf@challenger"}).promote_alias == "champion"
    assert build_config({"promote_alias": "champion", "b": "0123456789abcdef" * 2}).b == "0123456789abcdef" * 2


def test_unique_names_number_only_the_repeated_ones() -> None:
    assert unique_names(["a", "best", "best"]) == ["a", "best_1", "best_2"]
    assert build_config({"arms": ["resnet18", "/x/resnet18.pt"], "allow_random_head": True}).arm_names == (
        "resnet18_0", "resnet18_1")


def test_config_path_finds_the_shipped_configs_from_anywhere(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert config_path("configs/default.yaml") == ROOT / "configs/default.yaml"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/default.yaml").write_text("epochs: 1\n")
    assert config_path("configs/default.yaml") == Path("configs/default.yaml")  # a file here wins
    assert config_path("/no/such.yaml") == Path("/no/such.yaml")  # and the error names the path as given


def test_a_per_arm_seed_suffix_gives_that_arm_its_own_seed() -> None:
    cfg = build_config({"arms": "resnet18,resnet18@seed=1,resnet18@seed=7", "seed": 3})
    assert cfg.arm_specs == ("resnet18",) * 3  # the model is the same: an A/A test of seeds
    assert cfg.aa_test
    assert [cfg.arm_seed(i) for i in range(3)] == [3, 1, 7]
    assert cfg.arm_names == ("resnet18", "resnet18-seed_1", "resnet18-seed_7")
    two = build_config({"a": "resnet18", "b": "resnet18@seed=5"})
    assert (two.arm_specs, two.arm_seed(0), two.arm_seed(1)) == (("resnet18", "resnet18"), 0, 5)
    # A registry alias keeps its own `@`: only a trailing `@seed=<int>` is a seed.
    reg = build_config({"a": "models:/clf@champion", "b": "models:/clf@champion@seed=2"})
    assert reg.arm_specs == ("models:/clf@champion",) * 2 and reg.arm_seed(1) == 2


@pytest.mark.parametrize(("values", "message"), [
    ({"a": "resnet18", "b": "resnet18@seed=x"}, "<model>@seed=<integer>"),
    ({"a": "resnet18", "b": "@seed=1"}, "<model>@seed=<integer>"),
    ({"a": "resnet18", "b": "resnet18@seed=1", "seed_b": 2}, "not both"),
    ({"a": "resnet18", "b": "resnet18@seed=99999999999"}, "out of range"),
])
def test_bad_seed_suffixes_are_refused(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(values)


@pytest.mark.parametrize("spec", ["models:/clf@champion", "resnet18@seed=1", "runs:/0123/model", "a b#c.ckpt",
                                  "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k"])
def test_arm_names_are_valid_mlflow_metric_keys(spec: str) -> None:
    from mlflow.utils.validation import _validate_metric_name  # MLflow's own rule for the parent's `acc.<arm>`

    cfg = build_config({"arms": f"resnet10t,{spec}"})
    for name in cfg.arm_names:
        _validate_metric_name(f"acc.{name}")
