"""Model specs -> torch.nn.Module, and the LightningModule every arm runs.

A spec is one of:
- a timm model name (`resnet50`, `efficientnet_b3.ra2_in1k`), with `pretrained` from the config;
- an MLflow model URI (`runs:/<run id>/model`, `models:/name/3`, `models:/name@champion`) logged with
  `serialization_format="pt2"` (torch.export; pickled models are refused: loading them runs arbitrary code);
- a local checkpoint: `<path>.safetensors` or `<path>.ckpt` that names its timm architecture (ablab writes
  `arch` into both), or `<timm name>:<path>` for a `.pt`/`.pth`/`.safetensors` state dict. Tensors load with
  `torch.load(weights_only=True)` or safetensors, never pickle.

    from lab.models import resolve_model
    resolved = resolve_model("resnet18", cfg, num_classes=10)
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
import torchmetrics
from torch import nn

from lab.config import Config
from lab.data import Preprocess

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".safetensors")
TOPK_STORED = 5
MAX_CLASSES_STORED = 100


class ModelError(ValueError):
    """A model spec that cannot be resolved; the message names the spec and the fix."""


@dataclass(frozen=True)
class ResolvedModel:
    module: nn.Module
    arch: str
    source: str  # timm | mlflow | checkpoint
    identity: str  # what makes two evaluations of "the same model" the same: name+flags, registry version, hash
    random_head: bool  # the classifier (or the whole net) is freshly initialised
    native: Preprocess | None  # the model's own input size/normalisation, where it has one


def spec_kind(spec: str) -> str:
    if spec.startswith(("runs:/", "models:/")):
        return "mlflow"
    if spec.endswith(CHECKPOINT_SUFFIXES):
        return "checkpoint"
    return "timm"


def _split_checkpoint_spec(spec: str) -> tuple[str | None, Path]:
    """`resnet18:/w/best.pt` -> ("resnet18", path); `/w/best.ckpt` -> (None, path)."""
    head, sep, tail = spec.partition(":")
    if sep and not Path(spec).exists() and "/" not in head and head:
        return head, Path(tail).expanduser()
    return None, Path(spec).expanduser()


def check_timm_name(name: str) -> None:
    import timm

    base = name.split(".")[0]
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for names"
        raise ModelError(f"unknown model {name!r}: not a timm architecture, MLflow URI or checkpoint; {hint}")


def preflight(spec: str, cfg: Config) -> None:
    """Cheap checks before any run is created: names exist, paths exist, no untrained head is scored."""
    kind = spec_kind(spec)
    if kind == "timm":
        check_timm_name(spec)
        if not cfg.pretrained and cfg.epochs == 0 and not cfg.allow_random_head:
            raise ModelError(
                f"{spec}: pretrained=false and epochs=0 would score randomly initialised weights (chance level); "
                "set pretrained=true, epochs>0, or allow_random_head=true for a latency-only run"
            )
    elif kind == "checkpoint":
        arch, path = _split_checkpoint_spec(spec)
        if arch:
            check_timm_name(arch)
        if not path.is_file():
            raise ModelError(f"checkpoint not found: {str(path)!r}; give an existing .ckpt/.pt/.safetensors path")


def _native_preprocess(model: nn.Module) -> Preprocess | None:
    cfg = getattr(model, "pretrained_cfg", None)
    if not cfg:
        return None
    from timm.data import resolve_data_config

    data_cfg = resolve_data_config(model=model)
    return Preprocess(
        input_size=int(data_cfg["input_size"][-1]),
        mean=tuple(data_cfg["mean"]),
        std=tuple(data_cfg["std"]),
        interpolation=data_cfg.get("interpolation", "bilinear"),
        crop_pct=float(data_cfg.get("crop_pct", 1.0)),
    )


def _create_timm(arch: str, num_classes: int, pretrained: bool) -> nn.Module:
    import timm

    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes)
    except RuntimeError as err:
        if "Unknown model" in str(err) or "Invalid pretrained tag" in str(err):
            check_timm_name(arch.split(".")[0])
            base = arch.split(".")[0]
            raise ModelError(f"unknown pretrained tag in {arch!r}; see timm.list_pretrained('{base}*')") from None
        raise
    except Exception as err:
        if not pretrained:
            raise
        raise ModelError(
            f"{arch}: pretrained weights could not be downloaded ({type(err).__name__}); connect to the "
            "Hugging Face hub or pre-fill its cache, or set pretrained=false with epochs>0 to train from scratch"
        ) from None


def _timm_model(spec: str, cfg: Config, num_classes: int) -> ResolvedModel:
    check_timm_name(spec)
    module = _create_timm(spec, num_classes, cfg.pretrained)
    source_classes = getattr(module, "pretrained_cfg", {}).get("num_classes", 0)
    random_head = not cfg.pretrained or source_classes != num_classes
    identity = f"timm:{spec}:pretrained={cfg.pretrained}:classes={num_classes}"
    return ResolvedModel(module, spec, "timm", identity, random_head, _native_preprocess(module))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) from a safetensors file, a Lightning .ckpt or a .pt state dict, without pickle."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise ModelError(
            f"checkpoint {str(path)!r} could not be read ({reason}); is it a complete "
            ".ckpt/.pt/.safetensors file? Re-export it, or use a timm name"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj:  # Lightning checkpoint
        hparams = obj.get("hyper_parameters") or {}
        state = {k.removeprefix("model."): v for k, v in obj["state_dict"].items()}
        return state, {k: str(v) for k, v in hparams.items()}
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}
    raise ModelError(f"checkpoint {str(path)!r} holds no state dict; save model.state_dict() instead")


def _checkpoint_model(spec: str, cfg: Config, num_classes: int) -> ResolvedModel:
    arch, path = _split_checkpoint_spec(spec)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {str(path)!r}; give an existing .ckpt/.pt/.safetensors path")
    state, meta = _read_state_dict(path)
    arch = arch or meta.get("arch")
    if not arch:
        raise ModelError(f"checkpoint {str(path)!r} does not name its architecture; write it as <timm name>:{path}")
    check_timm_name(arch)
    module = _create_timm(arch, num_classes, pretrained=False)
    head = getattr(module, "pretrained_cfg", {}).get("classifier", "")
    head_key = f"{head}.weight" if isinstance(head, str) else ""
    if head_key in state and state[head_key].shape[0] != num_classes:
        raise ModelError(
            f"checkpoint {str(path)!r} has {state[head_key].shape[0]} output classes but the dataset "
            f"has {num_classes}; use data that matches the checkpoint, or fine-tune a timm model"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), str(err))[:200]
        raise ModelError(f"checkpoint {str(path)!r} does not fit architecture {arch!r} ({first})") from None
    identity = f"sha256:{_file_sha256(path)[:32]}"
    return ResolvedModel(module, arch, "checkpoint", identity, False, _native_preprocess(module))


def _mlflow_model(spec: str, cfg: Config, num_classes: int) -> ResolvedModel:
    import mlflow
    import yaml

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec))
    except Exception as err:
        raise ModelError(
            f"MLflow model {spec!r} could not be fetched ({str(err).splitlines()[0][:160]}); "
            "check the URI and MLFLOW_TRACKING_URI"
        ) from None
    mlmodel = local / "MLmodel"
    flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}) if mlmodel.is_file() else {}
    if "pytorch" not in flavor:
        raise ModelError(f"{spec} is not an MLflow PyTorch model (flavors: {', '.join(flavor) or 'none'})")
    if not (local / "data" / "model.pt2").is_file():
        raise ModelError(
            f"{spec} was logged with pickle serialization, which runs arbitrary code on load; "
            "re-log it with mlflow.pytorch.log_model(..., export_model=True)"
        )
    import mlflow.pytorch

    module = ExportedClassifier(mlflow.pytorch.load_model(str(local)))
    registry = _registry_identity(spec)
    identity = registry or f"sha256:{_file_sha256(local / 'data' / 'model.pt2')[:32]}"
    return ResolvedModel(module, spec, "mlflow", identity, False, None)


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


def _registry_identity(spec: str) -> str | None:
    """`models:/name@alias` -> `models:/name/<version>`: the alias moves, the version does not."""
    if not spec.startswith("models:/"):
        return None
    from mlflow import MlflowClient

    name, _, rest = spec.removeprefix("models:/").partition("/")
    if "@" in name:
        name, alias = name.split("@", 1)
        return f"models:/{name}/{MlflowClient().get_model_version_by_alias(name, alias).version}"
    return f"models:/{name}/{rest}" if rest.isdigit() else None


def resolve_model(spec: str, cfg: Config, num_classes: int) -> ResolvedModel:
    """Build the module a spec names; every failure is a one-line ModelError."""
    kind = spec_kind(spec)
    if kind == "mlflow":
        resolved = _mlflow_model(spec, cfg, num_classes)
    elif kind == "checkpoint":
        resolved = _checkpoint_model(spec, cfg, num_classes)
    else:
        resolved = _timm_model(spec, cfg, num_classes)
    if resolved.random_head and cfg.epochs == 0 and not cfg.allow_random_head:
        raise ModelError(
            f"{spec}: its classifier head is freshly initialised and epochs=0 would score it at chance; "
            "set epochs>0 to fine-tune, or allow_random_head=true for a latency-only run"
        )
    return resolved


def save_safetensors(module: nn.Module, arch: str, path: Path, num_classes: int) -> Path:
    """ablab's checkpoint format: weights plus the timm architecture, loadable by spec `<path>.safetensors`."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={"arch": arch, "num_classes": str(num_classes)})
    return path


# ------------------------------------------------------------------------------------------ LightningModule


class ArmModule(L.LightningModule):
    """Fine-tune (optional) and test one classifier; `test_step` keeps per-sample outputs on the device."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        epochs: int = 0,
        channels_last: bool = False,
        arch: str = "",
    ):
        super().__init__()
        self.save_hyperparameters({"arch": arch, "num_classes": num_classes, "lr": lr, "epochs": epochs})
        self.model = model
        self.num_classes, self.lr, self.weight_decay, self.epochs = num_classes, lr, weight_decay, epochs
        self.channels_last = channels_last
        self.test_acc = torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")
        self.test_acc_per_class = torchmetrics.classification.MulticlassAccuracy(num_classes, average="none")
        self.test_confusion = torchmetrics.classification.MulticlassConfusionMatrix(num_classes)
        self._outputs: list[tuple[torch.Tensor, ...]] = []
        self.predictions: pd.DataFrame | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=total, pct_start=0.15)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_test_epoch_start(self) -> None:
        # A test retried after running out of memory starts from nothing, not from the failed try's counts.
        self._outputs = []
        for metric in (self.test_acc, self.test_acc_per_class, self.test_confusion):
            metric.reset()

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        x, y, ids = batch
        logits = self(x)
        if logits.shape[-1] != self.num_classes:
            raise ModelError(f"the model outputs {logits.shape[-1]} classes but the dataset has {self.num_classes}")
        probs = logits.float().softmax(dim=-1)
        # Outputs stay on the device and the metrics are updated once, at the end: a batch costs its forward
        # pass and a softmax, and nothing in it waits for the device (torchmetrics' argument checks would).
        if self.num_classes <= MAX_CLASSES_STORED:
            self._outputs.append((ids, y, probs))
        else:
            self._outputs.append((ids, y, *probs.topk(TOPK_STORED, dim=-1)))

    def on_test_epoch_end(self) -> None:
        if self._outputs:
            labels = torch.cat([out[1] for out in self._outputs])
            preds = torch.cat([out[2].argmax(dim=-1) if len(out) == 3 else out[3][:, 0] for out in self._outputs])
            for metric in (self.test_acc, self.test_acc_per_class, self.test_confusion):
                metric.update(preds, labels)
        self.log("test_accuracy", self.test_acc.compute())
        self.predictions = predictions_frame(self._outputs, self.num_classes)
        self._outputs = []

    def per_class_accuracy(self) -> list[float]:
        return [float(v) for v in self.test_acc_per_class.compute().cpu()]

    def confusion_matrix(self) -> list[list[int]]:
        return self.test_confusion.compute().cpu().tolist()


def predictions_frame(outputs: list[tuple[torch.Tensor, ...]], num_classes: int) -> pd.DataFrame:
    """The `predictions.parquet` table: sample_id, label, pred, confidence, and probabilities or top-5."""
    cols = [torch.cat(parts).cpu().numpy() for parts in zip(*outputs, strict=True)]
    ids, labels = cols[0].astype(np.int64), cols[1].astype(np.int64)
    frame = {"sample_id": ids, "label": labels}
    if len(cols) == 3:
        probs = cols[2].astype(np.float32)
        frame |= {"pred": probs.argmax(1).astype(np.int64), "confidence": probs.max(1)}
        frame |= {f"prob_{k}": probs[:, k] for k in range(num_classes)}
    else:
        top_p, top_i = cols[2].astype(np.float32), cols[3].astype(np.int64)
        frame |= {"pred": top_i[:, 0], "confidence": top_p[:, 0]}
        frame |= {f"top{k + 1}_class": top_i[:, k] for k in range(top_i.shape[1])}
        frame |= {f"top{k + 1}_prob": top_p[:, k] for k in range(top_p.shape[1])}
    return pd.DataFrame(frame)
