"""Models stored in MLflow: ablab's stored format (a torch.export pt2 MLflow model, or safetensors where export
fails, each with the spec that rebuilds and feeds it) written to a folder, and `runs:/` / `models:/` URIs loaded
back without pickle.

    fmt = save_model_dir(net, model_spec("resnet18", 10, preprocess, cfg), example, folder)   # "pt2" or why not
    resolved = mlflow_model("runs:/<run id>/model", cfg, num_classes=10)

The spec rides inside the model as `extra_files/ablab_spec.json` (where `mlflow.pytorch.save_model` puts extra
files): the timm architecture, the number of classes and the input pipeline the weights were trained and tested
with, which becomes the model's native preprocessing when it is loaded again.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import torch
import yaml
from torch import nn

from lab.config import Config
from lab.data import Preprocess
from lab.models.sources import ModelError, ResolvedModel, create_timm, file_identity

SPEC_FILE = "ablab_spec.json"
SPEC_DIR = "extra_files"  # mlflow.pytorch.save_model's folder for extra_files
PT2_FILE = Path("data") / "model.pt2"
WEIGHTS_FILE = "model.safetensors"  # the fallback's weights


def model_spec(arch: str, num_classes: int, preprocess: Preprocess, cfg: Config) -> dict[str, Any]:
    """What rebuilding and feeding a fine-tuned model needs (and the recipe that made it)."""
    return {
        "arch": arch,
        "num_classes": num_classes,
        "preprocess": {"input_size": preprocess.input_size, "mean": list(preprocess.mean), "std": list(preprocess.std),
                       "interpolation": preprocess.interpolation, "crop_pct": preprocess.crop_pct},
        "channels_last": cfg.channels_last,
        "recipe": {"data": cfg.data, "seed": cfg.seed, "epochs": cfg.epochs, "lr": cfg.lr,
                   "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size, "augment": cfg.augment},
    }


def read_spec(model_dir: Path) -> dict[str, Any] | None:
    """The spec stored with a model, or None (a model that ablab did not log)."""
    path = Path(model_dir) / SPEC_DIR / SPEC_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def spec_preprocess(spec: dict[str, Any] | None) -> Preprocess | None:
    """The input pipeline a stored spec names, or None."""
    if not spec or "preprocess" not in spec:
        return None
    p = spec["preprocess"]
    return Preprocess(input_size=int(p["input_size"]), mean=tuple(p["mean"]), std=tuple(p["std"]),
                      interpolation=p.get("interpolation", "bilinear"), crop_pct=float(p.get("crop_pct", 1.0)))


def save_model_dir(model: nn.Module, spec: dict[str, Any], example: torch.Tensor, folder: Path,
                   mlflow_model: Any = None) -> str:
    """Write `model` (eval mode, on the CPU) under `folder` as a pt2 MLflow model with its spec; where torch.export
    fails, as safetensors plus the spec. Returns "pt2", or "safetensors" and why export failed."""
    import mlflow.pytorch

    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix="ablab-spec-") as tmp:
        spec_path = Path(tmp) / SPEC_FILE
        spec_path.write_text(json.dumps(spec, indent=1))
        try:
            # pip_requirements given: no dependency inference (it loads the model once more). The signature from
            # one eager forward: MLflow's own inference runs the exported program (0.5-1 s a model on the CPU).
            with torch.no_grad():
                signature = mlflow.models.infer_signature(example.numpy(), model(example).numpy())
            mlflow.pytorch.save_model(model, str(folder), serialization_format="pt2", input_example=example.numpy(),
                                      signature=signature, extra_files=[str(spec_path)], mlflow_model=mlflow_model,
                                      pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
            return "pt2"
        except Exception as err:  # an architecture torch.export cannot trace: keep the weights anyway
            text = str(err).strip().splitlines()[0] if str(err).strip() else ""
            reason = f"{type(err).__name__}: {text}"[:300]
        shutil.rmtree(folder, ignore_errors=True)
        (folder / SPEC_DIR).mkdir(parents=True)
        shutil.copy(spec_path, folder / SPEC_DIR / SPEC_FILE)
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"arch": spec["arch"]})
    return f"safetensors (pt2 export failed: {reason})"


class ExportedClassifier(nn.Module):
    """A torch.export program as a module. Exported programs refuse `.eval()`/`.train()` (their mode was fixed
    at export), so mode switches stop here instead of reaching into them."""

    def __init__(self, program: nn.Module):
        super().__init__()
        self.program = program

    def train(self, mode: bool = True) -> ExportedClassifier:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)


def registry_identity(spec: str) -> str | None:
    """`models:/name@alias` -> `models:/name/<version>`: the alias moves, the version does not."""
    if not spec.startswith("models:/"):
        return None
    name, _, rest = spec.removeprefix("models:/").partition("/")
    if "@" in name:
        name, alias = name.split("@", 1)
        return f"models:/{name}/{mlflow.MlflowClient().get_model_version_by_alias(name, alias).version}"
    return f"models:/{name}/{rest}" if rest.isdigit() else None


def mlflow_model(spec: str, cfg: Config, num_classes: int) -> ResolvedModel:
    """A `runs:/` or `models:/` URI: a pt2 MLflow PyTorch model, or ablab's safetensors fallback with its spec."""
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec))
    except Exception as err:
        raise ModelError(
            f"MLflow model {spec!r} could not be fetched ({str(err).splitlines()[0][:160]}); "
            "check the URI and MLFLOW_TRACKING_URI"
        ) from None
    saved = read_spec(local)
    native = spec_preprocess(saved)
    arch = saved["arch"] if saved else spec
    if saved and (local / WEIGHTS_FILE).is_file():
        module = _fallback_module(spec, local / WEIGHTS_FILE, saved)
        return ResolvedModel(module, arch, "mlflow", registry_identity(spec) or file_identity(local / WEIGHTS_FILE),
                             False, native)
    mlmodel = local / "MLmodel"
    flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}) if mlmodel.is_file() else {}
    if "pytorch" not in flavor:
        raise ModelError(f"{spec} is not an MLflow PyTorch model (flavors: {', '.join(flavor) or 'none'})")
    from mlflow.pytorch import load_model  # only for MLflow model specs: a second of import for every other arm

    if not (local / PT2_FILE).is_file():
        if not cfg.allow_pickle_models:
            raise ModelError(f"{spec} was logged with pickle serialization, which runs arbitrary code on load; "
                             "re-log it with mlflow.pytorch.log_model(..., serialization_format='pt2'), or set "
                             "allow_pickle_models=true if you trust whoever logged it")
        pickled = next((p for p in sorted((local / "data").glob("*.pth"))), local / "MLmodel")
        return ResolvedModel(load_model(str(local)), arch, "mlflow", registry_identity(spec) or file_identity(pickled),
                             False, native, pickled=True)

    module = ExportedClassifier(load_model(str(local)))
    identity = registry_identity(spec) or file_identity(local / PT2_FILE)
    return ResolvedModel(module, arch, "mlflow", identity, False, native)


def _fallback_module(spec: str, weights: Path, saved: dict[str, Any]) -> nn.Module:
    from safetensors.torch import load_file

    size = int(saved.get("preprocess", {}).get("input_size", 0)) or None  # a ViT tuned at 32 px: rebuilt for 32
    module = create_timm(saved["arch"], int(saved["num_classes"]), pretrained=False, img_size=size)
    try:
        module.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as err:
        raise ModelError(f"{spec}: its weights do not fit architecture {saved['arch']!r} "
                         f"({str(err).splitlines()[0][:160]})") from None
    return module


def expected_native(spec: str) -> Preprocess | None:
    """The input pipeline stored with an MLflow model (its spec file alone is fetched), or None."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:  # the model's own repository: `models:/m-<id>/<path>` is not a URI download_artifacts reads
        path = get_artifact_repository(spec.rstrip("/")).download_artifacts(f"{SPEC_DIR}/{SPEC_FILE}")
    except Exception:  # no spec (not logged by ablab), or not reachable: the arm will say what is wrong
        return None
    return spec_preprocess(json.loads(Path(path).read_text()))
