"""Preflight (issue 11, item 4): before any run exists, in about a second per arm, every timm model is built on the
meta device for the shared input size (ViTs and other models that take `img_size` are built for it), a model that
cannot take the size is refused naming the size it needs, checkpoints load, and MLflow URIs exist."""

from __future__ import annotations

import time

import pytest
import torch

from lab.config import build_config
from lab.models import ModelError, preflight, resolve_model
from lab.models.sources import size_kwargs


def test_a_vit_is_built_for_the_shared_32_px() -> None:
    cfg = build_config({"a": "vit_tiny_patch16_224", "b": "resnet10t", "epochs": 1, "image_size": 32})
    start = time.monotonic()
    preflight("vit_tiny_patch16_224", cfg)
    assert time.monotonic() - start < 10
    assert size_kwargs("vit_tiny_patch16_224", 32) == (("img_size", 32),)
    assert size_kwargs("resnet10t", 32) == ()  # a CNN takes any size: built as it is
    net = resolve_model("vit_tiny_patch16_224", cfg, 10).module.eval()
    with torch.no_grad():
        assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_preprocess_native_builds_the_model_as_published() -> None:
    cfg = build_config({"a": "vit_tiny_patch16_224", "b": "resnet10t", "epochs": 1, "preprocess": "native"})
    assert resolve_model("vit_tiny_patch16_224", cfg, 10).module.patch_embed.img_size == (224, 224)


def test_a_model_that_cannot_take_the_size_is_refused_naming_the_size_it_needs() -> None:
    cfg = build_config({"a": "inception_v3", "b": "resnet10t", "epochs": 1, "image_size": 32})
    start = time.monotonic()
    with pytest.raises(ModelError, match=r"^inception_v3: cannot be built for the shared 32 px input \(.*\); set "
                                         r"image_size=299 or preprocess=native$"):
        preflight("inception_v3", cfg)
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("offline", [True, False])
def test_pretrained_weights_out_of_reach_are_one_line_at_once(monkeypatch: pytest.MonkeyPatch, offline: bool) -> None:
    import socket

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: None)  # an empty cache
    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

        def refuse(*args, **kwargs):
            raise OSError("network is unreachable")

        monkeypatch.setattr(socket, "create_connection", refuse)
    cfg = build_config({"a": "resnet10t", "b": "resnet18", "pretrained": True, "epochs": 0})
    start = time.monotonic()
    why = "HF_HUB_OFFLINE is set" if offline else "huggingface.co cannot be reached"
    with pytest.raises(ModelError, match=rf"^resnet10t: pretrained weights \(timm/resnet10t\.c3_in1k\) are not in the "
                                         rf"Hugging Face cache and {why}; connect"):
        preflight("resnet10t", cfg)
    assert time.monotonic() - start < 5
