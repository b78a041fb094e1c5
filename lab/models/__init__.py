"""Model specs -> torch.nn.Module, ablab's stored model format, and the LightningModule every arm runs.

A spec is one of:
- a timm model name (`resnet50`, `efficientnet_b3.ra2_in1k`), with `pretrained` from the config;
- an MLflow model URI (`runs:/<run id>/model`, `models:/name/3`, `models:/name@champion`) logged with
  `serialization_format="pt2"` (torch.export; pickled models are refused: loading them runs arbitrary code), or
  ablab's safetensors fallback; a model that ablab logged carries its spec (architecture, classes, the input
  pipeline it was trained with: its native preprocessing);
- a local checkpoint: `<path>.safetensors` or `<path>.ckpt` that names its timm architecture (safetensors
  metadata `arch`; a Lightning checkpoint's hyperparameter `arch`, which ArmModule saves), or
  `<timm name>:<path>` for a `.pt`/`.pth`/`.safetensors` state dict. Tensors load with
  `torch.load(weights_only=True)` or safetensors, never pickle.

    from lab.models import resolve_model
    resolved = resolve_model("resnet18", cfg, num_classes=10)

``sources``: timm names and checkpoints; ``logged``: MLflow models (save and load); ``resolve``: spec -> model,
and `expected_identity` / `expected_preprocess`, which tell without loading any weights what an arm of a spec
would record (lab/history.py looks for earlier evaluations with them); ``module``: the LightningModule.
"""

from lab.models.logged import (
    SPEC_FILE,
    ExportedClassifier,
    model_spec,
    read_spec,
    save_model_dir,
    spec_preprocess,
)
from lab.models.resolve import (
    expected_identity,
    expected_preprocess,
    preflight,
    preprocess_for,
    probe_here,
    resolve_model,
)
from lab.models.sources import CHECKPOINT_SUFFIXES, ModelError, ResolvedModel, check_timm_name, spec_kind

# The LightningModule needs Lightning (~2.4 s of imports): loaded on first use, so that preflight and the reuse
# lookup in the launcher do without it.
_MODULE_NAMES = ("ArmModule", "predictions_frame")


def __getattr__(name: str):
    if name in _MODULE_NAMES:
        from lab.models import module

        return getattr(module, name)
    raise AttributeError(f"module 'lab.models' has no attribute {name!r}")


__all__ = [
    "CHECKPOINT_SUFFIXES",
    "SPEC_FILE",
    "ArmModule",
    "ExportedClassifier",
    "ModelError",
    "ResolvedModel",
    "check_timm_name",
    "expected_identity",
    "expected_preprocess",
    "model_spec",
    "predictions_frame",
    "preflight",
    "preprocess_for",
    "probe_here",
    "read_spec",
    "resolve_model",
    "save_model_dir",
    "spec_kind",
    "spec_preprocess",
]
