"""The typed experiment config: one frozen dataclass, its defaults, and the one place it is validated.

A config is built from `configs/default.yaml`-style YAML files (only the keys that differ from the defaults)
with command-line overrides applied on top. An unknown key, a wrong type, an out-of-range value or keys that
do not go together (a margin under the superiority rule, a promotion gate without a registered B) raise
`ConfigError` naming the key and the fix; nothing downstream re-validates.

    from lab.config import config_path, load_config
    cfg = load_config(config_path("configs/default.yaml"), {"epochs": "2", "b": "efficientnet_b3"})
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
RUN_ID = re.compile(r"[0-9a-f]{32}")  # an MLflow run id, as `compare` takes for an arm
RAY_ADDRESS = re.compile(r"(ray://)?[\w.\-]+:\d{1,5}")  # placement=ray: a Ray client or GCS address
SEED_SUFFIX = re.compile(r"@seed=(\d+)$")  # `resnet18@seed=1`: that arm's own seed (an A/A test's noise floor)


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key and what is allowed."""


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> dict[str, Any]:
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open}


@dataclass(frozen=True)
class Config:
    """Everything one A/B(/n) experiment needs. Field docs are the README's parameter table."""

    # Arms: `arms` (a list) wins over the two-arm shorthand `a`/`b`.
    a: str = "resnet18"
    b: str = "mobilenetv3_small_100"
    arms: tuple[str, ...] = ()
    experiment: str = ""  # "": $MLFLOW_EXPERIMENT_ID or $MLFLOW_EXPERIMENT_NAME, else `ablab` (lab/runs.py)

    # Data.
    data: str = "digits"
    data_dir: str = "~/.cache/ablab"
    test_fraction: float = field(default=0.3, metadata=_range(0.0, 1.0, lo_open=True))
    fake_samples: int = field(default=512, metadata=_range(1))
    fake_classes: int = field(default=10, metadata=_range(2))
    num_workers: int = field(default=0, metadata=_range(0))
    skip_bad_images: bool = False  # image folders: leave undecodable files out (listed) instead of refusing

    # Preprocessing: `shared` gives every arm image_size/mean/std; `native` each timm model its own.
    preprocess: Literal["shared", "native"] = "shared"
    image_size: int = field(default=32, metadata=_range(8, 1024))
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    # Models and the optional fine-tune stage (one seeded recipe for every arm).
    pretrained: bool = False
    allow_random_head: bool = False
    # Loading a pickled MLflow model runs code from its files; only with this opt-in (recorded on the parent).
    allow_pickle_models: bool = False
    epochs: int = field(default=4, metadata=_range(0, 1000))
    batch_size: int = field(default=64, metadata=_range(1, 65536))
    lr: float = field(default=2e-3, metadata=_range(0.0, 10.0, lo_open=True))
    weight_decay: float = field(default=0.05, metadata=_range(0.0, 10.0))
    augment: Literal["none", "crop_flip"] = "none"
    seed: int = field(default=0, metadata=_range(0, 2**32 - 1))
    # B's initial weights and training order (-1: `seed`); the test split always follows `seed`. With a == b
    # this measures the seed-to-seed noise floor (an A/A test).
    seed_b: int = field(default=-1, metadata=_range(-1, 2**32 - 1))
    deterministic: bool = False  # Trainer(deterministic=True): deterministic kernels, cuDNN benchmark off

    # Devices, placement and measurement. devices: auto, cpu, or GPU indices like 0,1.
    devices: str = "auto"
    placement: Literal["auto", "parallel", "lockstep", "sequential", "ray"] = "auto"
    # placement=ray: the cluster (auto = $RAY_ADDRESS or a running local cluster, ray://host:10001, or local to
    # start one here) and what each arm asks of it (GPUs = devices_per_arm on GPU clusters, else CPUs).
    ray_address: str = "auto"
    ray_cpus_per_arm: int = field(default=1, metadata=_range(1, 1024))
    # One arm data-parallel over N devices (Lightning DDP); predictions gathered exactly by sample_id.
    devices_per_arm: int = field(default=1, metadata=_range(1, 64))
    precision: Literal["32", "16-mixed", "bf16-mixed"] = "32"
    channels_last: bool = False
    compile: bool = False
    warmup_batches: int = field(default=5, metadata=_range(0))
    telemetry_sync: bool = False
    lockstep_timeout_s: float = field(default=900.0, metadata=_range(1.0))
    # A tracking server that goes away: predictions and telemetry are spooled locally and uploaded if it is back
    # within this many seconds; after that the job stops and `python -m lab resume <spool dir>` finishes it.
    outage_window_s: float = field(default=600.0, metadata=_range(0.0))

    # Statistics.
    alpha: float = field(default=0.05, metadata=_range(0.0, 0.5, lo_open=True, hi_open=True))
    rule: Literal["superiority", "non_inferiority", "equivalence", "bayes"] = "superiority"
    margin: float = field(default=0.0, metadata=_range(0.0, 1.0, hi_open=True))
    metric: Literal["accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy"] = "accuracy"
    # Test images in groups (frames of a video, crops of a scene): whole groups are resampled.
    group_by: Literal["none", "subfolder"] = "none"
    groups: str = ""  # a CSV mapping file (or sample_id) to group
    mcnemar_method: Literal["exact", "midp", "chi2", "chi2_corrected"] = "exact"
    n_resamples: int = field(default=10_000, metadata=_range(100, 10_000_000))

    # Teams and history.
    rerun: bool = False
    promote_alias: str = ""
    log_model: bool = True  # fine-tuned weights as an MLflow logged model (false: only a link to the source)
    register: str = ""  # registered model name for every arm's logged model (and the promotion gate's B)

    @property
    def arm_inputs(self) -> tuple[str, ...]:
        """Every arm as given, baseline first: a model spec, optionally with an `@seed=N` suffix."""
        return self.arms if self.arms else (self.a, self.b)

    @property
    def arm_specs(self) -> tuple[str, ...]:
        """The model spec of every arm, baseline first (without any `@seed=N` suffix)."""
        return tuple(split_seed(spec)[0] for spec in self.arm_inputs)

    @property
    def aa_test(self) -> bool:
        """Every arm is the same model spec: an A/A test of the pipeline and its noise floor."""
        return len(set(self.arm_specs)) == 1

    def arm_seed(self, index: int) -> int:
        """The seed of an arm's initial weights and training order: its `@seed=N` suffix, else `seed_b` for B where
        given, else `seed`."""
        own = split_seed(self.arm_inputs[index])[1]
        if own is not None:
            return own
        return self.seed_b if index == 1 and self.seed_b >= 0 else self.seed

    @property
    def arm_names(self) -> tuple[str, ...]:
        """Short arm names: `a`, `b` for the two-arm shorthand, the spec's last path part otherwise."""
        if not self.arms:
            return ("a", "b")
        # Same model twice (e.g. two checkpoints of one architecture): keep names unique.
        return tuple(unique_names([arm_name(spec) for spec in self.arm_inputs]))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in FIELDS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


FIELDS = dataclasses.fields(Config)
FIELD_BY_NAME = {f.name: f for f in FIELDS}
_HINTS = typing.get_type_hints(Config)


def split_seed(spec: str) -> tuple[str, int | None]:
    """`resnet18@seed=1` -> ("resnet18", 1); a spec without the suffix -> (spec, None)."""
    found = SEED_SUFFIX.search(spec)
    return (spec[: found.start()], int(found.group(1))) if found else (spec, None)


def arm_name(spec: str) -> str:
    """A readable name for a model spec that is safe in MLflow metric keys (`acc.<name>`), which refuse `@`:
    `models:/clf@champion` -> `clf-champion`, `resnet18@seed=1` -> `resnet18-seed_1`."""
    tail = spec.rstrip("/").split("/")[-1].split(":")[-1]
    tail = tail.rsplit(".", 1)[0] if tail.endswith((".ckpt", ".pt", ".pth", ".safetensors")) else tail
    return "".join(ch if ch.isalnum() or ch in "_-." else "-" if ch == "@" else "_" for ch in tail) or "arm"


def unique_names(names: list[str]) -> list[str]:
    """Names that occur more than once get their position appended (`resnet18_0`, `resnet18_1`)."""
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


def config_path(arg: str) -> Path:
    """A config path as given, else relative to the project (so `configs/...` works from any directory)."""
    given = Path(arg).expanduser()
    shipped = PROJECT_ROOT / arg
    return given if given.is_file() or given.is_absolute() or not shipped.is_file() else shipped


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "1", "yes", "on"}:
        return True
    if text in {"false", "0", "no", "off"}:
        return False
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _coerce(key: str, value: Any) -> Any:
    """Turn a YAML value or a command-line string into the field's type, or raise ConfigError."""
    hint = _HINTS[key]
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        text = str(value)
        if text not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")
        return text
    if hint is bool:
        return _parse_bool(key, value)
    if origin is tuple:
        item_type = typing.get_args(hint)[0]
        items = value if isinstance(value, (list, tuple)) else [p for p in str(value).split(",") if p.strip()]
        try:
            return tuple(item_type(str(v).strip()) if item_type is not str else str(v).strip() for v in items)
        except ValueError:
            raise ConfigError(f"{key}: expected a list of {item_type.__name__}, got {value!r}") from None
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(str(value).strip()) if not isinstance(value, float) else int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    raise TypeError(f"unhandled config type {hint!r} for {key}")  # pragma: no cover - a bug in Config


def _check_range(key: str, value: Any) -> None:
    meta = FIELD_BY_NAME[key].metadata
    if not meta:
        return
    lo, hi, lo_open, hi_open = meta["lo"], meta["hi"], meta["lo_open"], meta["hi_open"]
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    too_high = hi is not None and (value >= hi if hi_open else value > hi)
    if too_low or too_high:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ConfigError(f"{key}: {value} is out of range; allowed {left}{lo}, {'inf' if hi is None else hi}{right}")


def _check_whole(cfg: Config) -> None:
    """Rules that involve more than one key."""
    if len(cfg.arm_specs) < 2:
        raise ConfigError(f"arms: need at least two models to compare, got {list(cfg.arm_specs)}")
    for spec in cfg.arm_inputs:
        base, own = split_seed(spec)
        if "@seed=" in spec and (own is None or not base):
            raise ConfigError(f"arms: {spec!r}: the seed suffix is <model>@seed=<integer>, e.g. resnet18@seed=1")
        if own is not None and own > 2**32 - 1:
            raise ConfigError(f"arms: {spec!r}: the seed is out of range; allowed [0, {2**32 - 1}]")
    if cfg.seed_b >= 0 and split_seed(cfg.arm_inputs[1])[1] is not None:
        raise ConfigError(f"seed_b: B already has its own seed ({cfg.arm_inputs[1]!r}); give seed_b or the @seed= "
                          "suffix, not both")
    if len(set(cfg.arm_specs)) != len(cfg.arm_specs) and not cfg.allow_random_head and not cfg.aa_test:
        raise ConfigError(f"arms: the same model appears twice in {list(cfg.arm_specs)}; give distinct specs, or the "
                          "same spec for every arm (an A/A test)")
    if cfg.test_fraction >= 1.0 and cfg.epochs > 0:
        raise ConfigError(f"test_fraction: 1.0 leaves no training images for epochs={cfg.epochs}; use a fraction "
                          "below 1, or epochs=0 to evaluate as is")
    if cfg.data.startswith("imagefolder:") and not cfg.data.partition(":")[2].strip():
        raise ConfigError("data: imagefolder: needs a path; give data=imagefolder:<path to class folders>")
    if len(cfg.mean) != 3 or len(cfg.std) != 3 or min(cfg.std) <= 0:
        raise ConfigError("mean/std: expected three numbers each (RGB), std > 0")
    if cfg.rule == "equivalence" and cfg.margin == 0.0:
        raise ConfigError("margin: the equivalence rule needs margin > 0 (a fraction, e.g. 0.005 = half a point)")
    if cfg.rule == "superiority" and cfg.margin != 0.0:
        raise ConfigError(f"margin: the superiority rule takes no margin (got {cfg.margin}); set margin=0, or "
                          "rule=non_inferiority or equivalence to test against a margin")
    if cfg.rule == "bayes" and cfg.metric != "accuracy":
        raise ConfigError(f"rule: bayes reads the accuracy difference only (metric={cfg.metric}); use metric=accuracy "
                          "or another rule")
    if cfg.group_by != "none" and cfg.groups:
        raise ConfigError(f"groups: give group_by=subfolder or groups=<csv>, not both (got {cfg.group_by!r} and "
                          f"{cfg.groups!r})")
    if cfg.devices not in ("auto", "cpu") and not all(p.strip().isdigit() for p in cfg.devices.split(",")):
        raise ConfigError(f"devices: {cfg.devices!r} is not allowed; use auto, cpu or GPU indices like 0,1")
    if cfg.placement == "ray" and cfg.devices not in ("auto", "cpu"):  # Ray hands each arm task its own GPUs
        raise ConfigError(f"devices: {cfg.devices!r} names GPUs, but under placement=ray the cluster picks each arm's "
                          "GPUs; use devices=auto (or cpu)")
    if cfg.ray_address not in ("auto", "local") and not RAY_ADDRESS.fullmatch(cfg.ray_address):
        raise ConfigError(f"ray_address: {cfg.ray_address!r} is not allowed; use auto, local, ray://<host>:10001 or "
                          "<host>:6379")
    if cfg.devices_per_arm > 1 and cfg.placement == "lockstep":  # lockstep turns are taken per process
        raise ConfigError(f"devices_per_arm: {cfg.devices_per_arm} cannot take lockstep turns (one process per arm); "
                          "use placement=parallel or sequential, or devices_per_arm=1")
    _check_promotable(cfg)


def _check_promotable(cfg: Config) -> None:
    """A promotion gate needs an A/B whose B is a registry URI (`run`), a child run id (`compare` checks that
    run's model when it promotes), or any arm whose logged model `register` registers."""
    if cfg.register and any(ch in cfg.register for ch in "/@:'\"\\"):
        raise ConfigError(f"register: {cfg.register!r} is not a registered model name; leave out / @ : and quotes")
    if cfg.register and cfg.epochs > 0 and not cfg.log_model:
        raise ConfigError("register: log_model=false logs no fine-tuned weights to register; set log_model=true")
    if not cfg.promote_alias:
        return
    if len(cfg.arm_specs) != 2:
        raise ConfigError(f"promote_alias: the promotion gate needs exactly two arms (A, B); got {len(cfg.arm_specs)}")
    b = cfg.arm_specs[1]
    if not b.startswith("models:/") and not RUN_ID.fullmatch(b) and not cfg.register:
        raise ConfigError(f"promote_alias: B must be a registered model (models:/name@alias or models:/name/<version>)"
                          f", got {b!r}; or set register=<name> to register the arms' logged models")


def build_config(values: dict[str, Any]) -> Config:
    """Validate raw key/value pairs (from YAML or the command line) into a Config."""
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in FIELD_BY_NAME:
            close = difflib.get_close_matches(key, FIELD_BY_NAME, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; allowed: {', '.join(FIELD_BY_NAME)}"
            raise ConfigError(f"unknown config key {key!r}{hint}")
        kwargs[key] = _coerce(key, value)
        if isinstance(kwargs[key], (int, float)) and not isinstance(kwargs[key], bool):
            _check_range(key, kwargs[key])
    cfg = Config(**kwargs)
    _check_whole(cfg)
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: no such file {str(path)!r}; pass a YAML file such as configs/default.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config: {path} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """YAML first, then command-line overrides (empty strings mean "not given") on top."""
    values = read_yaml(path) if path else {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None and v != ""})
    return build_config(values)


def flat_params(cfg: Config) -> dict[str, str]:
    """The config as MLflow params (strings, lists comma-joined)."""
    out = {}
    for key, value in cfg.to_dict().items():
        out[key] = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return out
