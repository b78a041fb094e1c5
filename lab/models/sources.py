"""Models from timm names and local checkpoints (safetensors, Lightning .ckpt, .pt state dicts), without pickle.

Also what every source shares: `ModelError`, `ResolvedModel`, and the identities that make two evaluations of
"the same model" the same (timm name and flags; a file's hash).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import safe_open
from timm.data import resolve_data_config
from torch import nn

from lab.config import Config
from lab.data import Preprocess

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".safetensors")


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
    pickled: bool = False  # loaded by unpickling (allow_pickle_models=true): the child says so (ab.pickle_loaded)


def spec_kind(spec: str) -> str:
    if spec.startswith(("runs:/", "models:/")):
        return "mlflow"
    if spec.endswith(CHECKPOINT_SUFFIXES):
        return "checkpoint"
    return "timm"


def split_checkpoint_spec(spec: str) -> tuple[str | None, Path]:
    """`resnet18:/w/best.pt` -> ("resnet18", path); `/w/best.ckpt` -> (None, path)."""
    head, sep, tail = spec.partition(":")
    if sep and not Path(spec).exists() and "/" not in head and head:
        return head, Path(tail).expanduser()
    return None, Path(spec).expanduser()


def check_timm_name(name: str) -> None:
    base = name.split(".")[0]
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for names"
        raise ModelError(f"unknown model {name!r}: not a timm architecture, MLflow URI or checkpoint; {hint}")


def native_preprocess(model: nn.Module) -> Preprocess | None:
    cfg = getattr(model, "pretrained_cfg", None)
    if not cfg:
        return None
    data_cfg = resolve_data_config(model=model)  # reads model.pretrained_cfg only
    return Preprocess(input_size=int(data_cfg["input_size"][-1]), mean=tuple(data_cfg["mean"]),
                      std=tuple(data_cfg["std"]), interpolation=data_cfg.get("interpolation", "bilinear"),
                      crop_pct=float(data_cfg.get("crop_pct", 1.0)))


@functools.lru_cache(maxsize=64)
def size_kwargs(arch: str, img_size: int | None) -> tuple[tuple[str, int], ...]:
    """(("img_size", n),) for a timm architecture whose default input is not n px and whose constructor takes
    `img_size` (ViT, Swin, ...: their position embeddings are built for it); () for any other (a CNN takes any
    size). Decided by building the model once on the meta device: no weights, no memory, well under a second."""
    try:
        default = timm.get_pretrained_cfg(arch.split(".")[0]).input_size[-1]
    except Exception:
        default = None
    if img_size is None or default == img_size:
        return ()
    try:
        with torch.device("meta"):
            timm.create_model(arch, pretrained=False, num_classes=2, img_size=img_size)
    except TypeError:  # "unexpected keyword argument 'img_size'"
        return ()
    except Exception:
        return ()  # cannot be built for that size: check_input_size names the size it needs
    return (("img_size", img_size),)


def check_input_size(arch: str, img_size: int) -> None:
    """Build `arch` for `img_size` on the meta device and push a batch of two through it: a model that cannot
    take that size is refused here, in a second, naming the size it needs, not after an epoch of fitting."""
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, num_classes=2, **dict(size_kwargs(arch, img_size)))
            model.eval()(torch.zeros(2, 3, img_size, img_size))
    except NotImplementedError:
        return  # an operator without a meta kernel: nothing learned, the arm's own build will tell
    except Exception as err:
        try:
            needed = timm.get_pretrained_cfg(arch.split(".")[0]).input_size[-1]
        except Exception:
            needed = "its default"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ModelError(f"{arch}: cannot be built for the shared {img_size} px input ({reason}); set "
                         f"image_size={needed} or preprocess=native") from None


def check_pretrained(arch: str, timeout_s: float = 3.0) -> None:
    """Pretrained weights that are neither in the Hugging Face cache nor on a hub answering within `timeout_s`
    are one line here, not a minute of hub retries inside an arm."""
    try:
        hub_id = timm.get_pretrained_cfg(arch).hf_hub_id
    except Exception:
        return  # no pretrained config: create_timm says so
    if not hub_id:
        return
    from huggingface_hub import try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(hub_id, f), str) for f in ("model.safetensors", "pytorch_model.bin")):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    if not offline:
        if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
            return  # only the proxy knows: leave it to the download
        try:
            socket.create_connection((host, 443), timeout=timeout_s).close()
            return
        except OSError:
            pass
    why = "HF_HUB_OFFLINE is set" if offline else f"{host} cannot be reached"
    raise ModelError(f"{arch}: pretrained weights ({hub_id}) are not in the Hugging Face cache and {why}; connect, "
                     "pre-fill the cache (HF_HOME), or set pretrained=false with epochs>0 to train from scratch")


def create_timm(arch: str, num_classes: int, pretrained: bool, img_size: int | None = None) -> nn.Module:
    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes,
                                 **dict(size_kwargs(arch, img_size)))
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


def timm_model(spec: str, cfg: Config, num_classes: int) -> ResolvedModel:
    check_timm_name(spec)
    module = create_timm(spec, num_classes, cfg.pretrained, shared_size(cfg))
    source_classes = getattr(module, "pretrained_cfg", {}).get("num_classes", 0)
    random_head = not cfg.pretrained or source_classes != num_classes
    identity = timm_identity(spec, cfg.pretrained, num_classes)
    return ResolvedModel(module, spec, "timm", identity, random_head, native_preprocess(module))


def shared_size(cfg: Config) -> int | None:
    """The input size every arm is built for (`preprocess=shared`), or None: each model's own."""
    return cfg.image_size if cfg.preprocess == "shared" else None


def timm_identity(arch: str, pretrained: bool, num_classes: int) -> str:
    return f"timm:{arch}:pretrained={pretrained}:classes={num_classes}"


def file_identity(path: Path) -> str:
    """`sha256:` and the first 32 hex digits of the file's hash: a checkpoint is its bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"sha256:{h.hexdigest()[:32]}"


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) from a safetensors file, a Lightning .ckpt or a .pt state dict, without pickle."""
    try:
        if path.suffix == ".safetensors":
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


def checkpoint_model(spec: str, cfg: Config, num_classes: int) -> ResolvedModel:
    arch, path = split_checkpoint_spec(spec)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {str(path)!r}; give an existing .ckpt/.pt/.safetensors path")
    state, meta = read_state_dict(path)
    arch = arch or meta.get("arch")
    if not arch:
        raise ModelError(f"checkpoint {str(path)!r} does not name its architecture; write it as <timm name>:{path}")
    check_timm_name(arch)
    module = create_timm(arch, num_classes, pretrained=False, img_size=shared_size(cfg))
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
    return ResolvedModel(module, arch, "checkpoint", file_identity(path), False, native_preprocess(module))
