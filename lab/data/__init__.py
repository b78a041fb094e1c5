"""The shared, seeded LightningDataModule, the dataset registry, the dataset fingerprint, and test samples by id.

Every arm builds `ABDataModule(cfg, preprocess)` from the same config: the same samples, in the same order,
with the same stable integer `sample_id`s. Only the preprocessing may differ per arm (`preprocess=native`).
``datasets``: the registry, loaders, splits and fingerprint; ``preprocess``: an input pipeline as data;
``module``: the data module; ``samples``: test
samples by id (groups of clustered images, pixels for the report's gallery).

    from lab.data import ABDataModule, resolve_dataset
    info = resolve_dataset(cfg)          # DatasetInfo: splits, classes, fingerprint
"""

from lab.data.datasets import (
    IMAGE_SUFFIXES,
    DataError,
    DatasetInfo,
    DatasetLoader,
    Split,
    clear_cache,
    fingerprint,
    list_datasets,
    register_dataset,
    resolve_dataset,
)
from lab.data.keys import library_versions, train_fingerprint, training_tags
from lab.data.preprocess import Preprocess
from lab.data.samples import test_groups, test_images

# The data module needs torch and Lightning (seconds of imports): loaded on first use, so that the parent's
# report (class names, the flips gallery) can read a dataset without them.
_MODULE_NAMES = ("ABDataModule", "SplitDataset")


def __getattr__(name: str):
    if name in _MODULE_NAMES:
        from lab.data import module

        return getattr(module, name)
    raise AttributeError(f"module 'lab.data' has no attribute {name!r}")

__all__ = [
    "IMAGE_SUFFIXES",
    "ABDataModule",
    "DataError",
    "DatasetInfo",
    "DatasetLoader",
    "Preprocess",
    "Split",
    "SplitDataset",
    "clear_cache",
    "fingerprint",
    "library_versions",
    "list_datasets",
    "register_dataset",
    "resolve_dataset",
    "test_groups",
    "test_images",
    "train_fingerprint",
    "training_tags",
]
