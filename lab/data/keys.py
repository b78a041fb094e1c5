"""What the data and the libraries add to the reuse key of a fine-tuned arm: the training split's fingerprint
(its contents: pixels of an in-memory dataset, file bytes of an image folder) and the library versions that
decide what training computes (torch, torchvision's decoders and transforms, timm, Lightning)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from lab.config import Config
from lab.data.datasets import DatasetInfo, fingerprint

KEY_LIBRARIES = ("torch", "torchvision", "timm", "lightning")


def train_fingerprint(info: DatasetInfo) -> str:
    """sha256 of the training split as `fingerprint` hashes a test split (ids, labels, class names, contents),
    plus the files an image folder left out."""
    name, _, arg = info.name.partition(":")
    root = str(Path(arg).expanduser()) if name == "imagefolder" else None
    return fingerprint(info.train, info.class_names, root, info.skipped)


def library_versions() -> str:
    """`torch=2.9.1 torchvision=0.24.1 ...`: read from the installed packages' metadata, nothing imported."""
    found = []
    for name in KEY_LIBRARIES:
        try:
            found.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name}=none")
    return " ".join(found)


def training_tags(cfg: Config, index: int, info: DatasetInfo) -> dict[str, str]:
    """The child-run tags that, with the params of history.RECIPE_KEYS, decide what a fine-tuned arm learned:
    its own seed (seed_b for B), determinism, the training split's contents and the library versions. Empty for
    an as-is evaluation (epochs=0), which trains nothing."""
    if cfg.epochs == 0:
        return {}
    return {"ab.seed": str(cfg.arm_seed(index)), "ab.deterministic": str(cfg.deterministic).lower(),
            "ab.train_fingerprint": train_fingerprint(info), "ab.versions": library_versions()}
