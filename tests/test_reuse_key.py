"""The reuse key of a fine-tuned arm (issue 11, item 3): the training split's contents, the arm's seed,
determinism and the library versions are part of it, so one changed training image means a new evaluation;
the parent says what matched."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
from history_fakes import log_child, predictions
from mlflow import MlflowClient
from PIL import Image

from lab import history
from lab.config import build_config, flat_params
from lab.data import clear_cache, library_versions, resolve_dataset, training_tags
from lab.models import preprocess_for


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_training_tags_cover_seed_determinism_contents_and_versions(tmp_path: Path) -> None:
    cfg = build_config({"data": "digits", "epochs": 2, "seed_b": 5, "deterministic": True})
    info = resolve_dataset(cfg)
    a, b = training_tags(cfg, 0, info), training_tags(cfg, 1, info)
    assert (a["ab.seed"], b["ab.seed"], a["ab.deterministic"]) == ("0", "5", "true")
    assert a["ab.versions"] == library_versions() and "torch=" in a["ab.versions"] and "timm=" in a["ab.versions"]
    assert a["ab.train_fingerprint"].startswith("sha256:") and a["ab.train_fingerprint"] != info.fingerprint
    assert training_tags(build_config({"data": "digits", "epochs": 0}), 0, info) == {}  # as-is: nothing trained


def key_for(cfg, info) -> history.EvalKey:
    key = history.expected_key(cfg.arm_specs[0], cfg, info.num_classes, info.fingerprint)
    return dataclasses.replace(key, training=tuple(training_tags(cfg, 0, info).items()))


def test_one_changed_training_image_means_a_new_evaluation(tracking: str, tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for k, cls in enumerate(("cat", "dog")):
        for i in range(6):
            (root / cls).mkdir(parents=True, exist_ok=True)
            (root / cls / f"{i}.png").write_bytes(png(10 * k + i))
    cfg = build_config({"data": f"imagefolder:{root}", "data_dir": str(tmp_path / "cache"), "epochs": 1,
                        "a": "resnet10t", "b": "resnet18", "test_fraction": 0.5})
    info = resolve_dataset(cfg)
    key = key_for(cfg, info)
    client = MlflowClient()
    frame = predictions(info.test.labels, np.ones(len(info.test), bool), info.test.sample_ids, num_classes=2)
    params = {k: v for k, v in flat_params(cfg).items() if k not in ("a", "b")}
    tags = {"ab.dataset_fingerprint": info.fingerprint, "ab.num_classes": "2",
            "ab.preprocess": preprocess_for(cfg, None).describe(), **dict(key.training)}
    run_id = log_child(client, "0", frame, identity=key.identity, params=params, **tags)
    assert history.find_reusable(client, key).info.run_id == run_id

    Path(info.train.paths[0]).write_bytes(png(999))  # one training image, same name, new pixels
    clear_cache()
    changed = resolve_dataset(cfg)
    assert changed.fingerprint == info.fingerprint  # the test split did not change ...
    assert history.find_reusable(client, key_for(cfg, changed)) is None  # ... the training split did: train again
    other_seed = dataclasses.replace(key, training=tuple((k, "7" if k == "ab.seed" else v) for k, v in key.training))
    assert history.find_reusable(client, other_seed) is None


def test_the_parent_says_which_key_matched(tracking: str) -> None:
    from history_fakes import fast_dataset, log_parent
    from mlflow.entities import Run

    from lab.compare import Arm

    client = MlflowClient()
    _, ids, labels, _ = fast_dataset()
    child = log_child(client, "0", predictions(labels, np.ones(len(labels), bool), ids, num_classes=10),
                      params={"epochs": "2"})
    parent = log_parent(client, "0")
    arms = [Arm("a", "x", "resnet10t", {}, {}, None), Arm("b", child, "resnet18", {}, {}, None)]
    run: Run = client.get_run(child)
    history.mark_reused(client, parent, arms, {1: run})
    tags = client.get_run(parent).data.tags
    assert tags["ab.reused.b"] == child
    assert "training-split contents" in tags["ab.reuse_key.b"] and "torch/torchvision/timm" in tags["ab.reuse_key.b"]
