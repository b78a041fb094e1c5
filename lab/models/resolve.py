"""Model specs -> what an arm runs: preflight checks, the module with its identity and native preprocessing, and
the identity and input pipeline an arm would record, told without loading any weights (for reuse)."""

from __future__ import annotations

from types import SimpleNamespace

from mlflow.exceptions import MlflowException
from timm.models import get_pretrained_cfg

from lab.config import Config
from lab.data import Preprocess, resolve_dataset
from lab.models.logged import expected_native, mlflow_model, registry_identity
from lab.models.sources import (
    ModelError,
    ResolvedModel,
    check_input_size,
    check_pretrained,
    check_timm_name,
    checkpoint_model,
    file_identity,
    native_preprocess,
    spec_kind,
    split_checkpoint_spec,
    timm_identity,
    timm_model,
)
from lab.runs import mlflow_error_line


def preprocess_for(cfg: Config, native: Preprocess | None) -> Preprocess:
    """The input pipeline of an arm: the model's own with `preprocess=native` (where it has one), else the
    config's shared image_size/mean/std."""
    if cfg.preprocess == "native" and native is not None:
        return native
    return Preprocess(input_size=cfg.image_size, mean=cfg.mean, std=cfg.std)


def preflight(spec: str, cfg: Config) -> None:
    """Checks before any run is created, in about a second per arm: names exist, no untrained head is scored,
    a timm model takes the shared input size (built on the meta device), checkpoints load into their
    architecture with the dataset's class count, and MLflow URIs name a run or model version that exists."""
    kind = spec_kind(spec)
    if kind == "timm":
        check_timm_name(spec)
        if not cfg.pretrained and cfg.epochs == 0 and not cfg.allow_random_head:
            raise ModelError(
                f"{spec}: pretrained=false and epochs=0 would score randomly initialised weights (chance level); "
                "set pretrained=true, epochs>0, or allow_random_head=true for a latency-only run"
            )
        if cfg.pretrained:
            check_pretrained(spec)
        if cfg.preprocess == "shared":
            check_input_size(spec, cfg.image_size)
    elif kind == "checkpoint":
        arch, path = split_checkpoint_spec(spec)
        if arch:
            check_timm_name(arch)
        if not path.is_file():
            raise ModelError(f"checkpoint not found: {str(path)!r}; give an existing .ckpt/.pt/.safetensors path")
        checkpoint_model(spec, cfg, resolve_dataset(cfg).num_classes)  # wrong class count or architecture: now
    elif kind == "mlflow":
        check_uri(spec)


def check_uri(spec: str) -> None:
    """A `runs:/` or `models:/` URI that names nothing is refused here, without downloading any weights."""
    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        if spec.startswith("runs:/"):
            run_id, _, path = spec.removeprefix("runs:/").partition("/")
            client.get_run(run_id)
            if path.strip("/") and not client.list_artifacts(run_id, path.strip("/")):
                raise ModelError(f"MLflow model {spec!r}: run {run_id} has no artifacts under {path!r}; check the URI")
        elif spec.startswith("models:/"):
            name, alias = spec.removeprefix("models:/").partition("@")[::2]
            if alias:
                client.get_model_version_by_alias(name, alias)
            elif (version := name.partition("/")[2]).isdigit():
                client.get_model_version(name.partition("/")[0], version)
    except MlflowException as err:
        raise ModelError(f"MLflow model {spec!r} not found ({str(err).splitlines()[0][:160]}); check the URI and "
                         "MLFLOW_TRACKING_URI") from None


def resolve_model(spec: str, cfg: Config, num_classes: int) -> ResolvedModel:
    """Build the module a spec names; every failure is a one-line ModelError."""
    kind = spec_kind(spec)
    if kind == "mlflow":
        resolved = mlflow_model(spec, cfg, num_classes)
    elif kind == "checkpoint":
        resolved = checkpoint_model(spec, cfg, num_classes)
    else:
        resolved = timm_model(spec, cfg, num_classes)
    if resolved.random_head and cfg.epochs == 0 and not cfg.allow_random_head:
        raise ModelError(
            f"{spec}: its classifier head is freshly initialised and epochs=0 would score it at chance; "
            "set epochs>0 to fine-tune, or allow_random_head=true for a latency-only run"
        )
    return resolved


def expected_identity(spec: str, cfg: Config, num_classes: int) -> str | None:
    """The `ab.model_identity` an arm of `spec` would log (as `resolve_model` builds it), without loading weights.

    None where that cannot be told cheaply: a `runs:/` model, a missing checkpoint file, a registry alias that
    does not resolve. The arm is then evaluated, and reports whatever is wrong with the spec.
    """
    kind = spec_kind(spec)
    if kind == "mlflow":
        try:
            return registry_identity(spec)
        except MlflowException:
            return None
    if kind == "checkpoint":
        _, path = split_checkpoint_spec(spec)
        return file_identity(path) if path.is_file() else None
    return timm_identity(spec, cfg.pretrained, num_classes)


def expected_preprocess(spec: str, cfg: Config) -> Preprocess | None:
    """The input pipeline an arm of `spec` would use (`preprocess_for` of what it resolves), without weights.

    With `preprocess=native` that is timm's pretrained config of the architecture, or the spec stored with an
    MLflow model (its small spec file is fetched); None for a checkpoint that names its architecture only inside
    the file (knowing its input size means reading it).
    """
    if cfg.preprocess != "native":
        return preprocess_for(cfg, None)
    kind = spec_kind(spec)
    if kind == "mlflow":
        return preprocess_for(cfg, expected_native(spec))
    arch = spec if kind == "timm" else split_checkpoint_spec(spec)[0]
    if kind == "checkpoint" and arch is None:
        return None
    pretrained = get_pretrained_cfg(arch) if arch is not None else None
    # What timm.create_model attaches as `model.pretrained_cfg`, read the way the arm reads it.
    native = None if pretrained is None else native_preprocess(SimpleNamespace(pretrained_cfg=pretrained.to_dict()))
    return preprocess_for(cfg, native)


def probe(config_path: str, indices: list[int]) -> dict:
    """`probe_here` of the config at `config_path`: what the launcher calls in a process forked from the arms'
    fork server (lab/zygote.py `call`), where torch and timm are loaded already, so that it imports neither."""
    from lab.config import load_config

    return probe_here(load_config(config_path), indices)


def probe_here(cfg: Config, indices: list[int]) -> dict:
    """What the launcher needs of the arms at `indices` before any run exists, as JSON: `preflight` of each, the
    identity and input pipeline each would record (`expected`: arm index -> [identity, preprocess], nulls where
    they cannot be told cheaply; none with rerun=true) and how many CUDA devices are visible (`cuda_devices`).
    Bad input raises its one-line ValueError."""
    import torch

    for i in indices:
        preflight(cfg.arm_specs[i], cfg)
    num_classes = resolve_dataset(cfg).num_classes
    expected = {}
    for i in indices if not cfg.rerun else ():
        spec = cfg.arm_specs[i]
        pre = expected_preprocess(spec, cfg)
        try:
            identity = expected_identity(spec, cfg, num_classes) if pre is not None else None
        except MlflowException as err:  # unreachable server, no permission: one line before any run exists
            raise ValueError(mlflow_error_line(err, "looking for finished evaluations to reuse")) from None
        expected[str(i)] = [identity, pre.describe() if pre is not None else None]
    return {"expected": expected, "cuda_devices": torch.cuda.device_count() if cfg.devices != "cpu" else 0}
