"""The shared, seeded LightningDataModule, the dataset registry, and the dataset fingerprint.

Every arm builds `ABDataModule(cfg, preprocess)` from the same config: the same samples, in the same order,
with the same stable integer `sample_id`s. Only the preprocessing may differ per arm (`preprocess=native`).
The fingerprint hashes the ordered test sample ids and labels, the class names, and the raw data where that
is cheap (the arrays of an in-memory dataset; the file list with sizes of an image folder), so two arms --
or two runs a month apart -- can prove they scored the same test set.

    from lab.data import ABDataModule, resolve_dataset
    info = resolve_dataset(cfg)          # DatasetInfo: splits, classes, fingerprint
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from lab.config import Config

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(ValueError):
    """A dataset that cannot be loaded; the message names the dataset and the fix."""


@dataclass(frozen=True)
class Split:
    """One split: ids and labels always; pixels either in memory (uint8 N,H,W,3) or as file paths."""

    sample_ids: np.ndarray
    labels: np.ndarray
    images: np.ndarray | None = None
    paths: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.sample_ids)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    class_names: tuple[str, ...]
    train: Split
    test: Split
    fingerprint: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def label_map_hash(self) -> str:
        return hashlib.sha256(json.dumps(list(self.class_names)).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Preprocess:
    """How an arm turns raw pixels into its input tensor (timm's data-config fields)."""

    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    def describe(self) -> str:
        mean = ",".join(f"{m:.3f}" for m in self.mean)
        std = ",".join(f"{s:.3f}" for s in self.std)
        return f"size={self.input_size} interp={self.interpolation} crop={self.crop_pct:g} mean={mean} std={std}"

    def transform(self, train: bool, augment: str) -> v2.Compose:
        interp = v2.InterpolationMode(self.interpolation)
        if train and augment == "crop_flip":
            resize = [
                v2.RandomResizedCrop(self.input_size, scale=(0.8, 1.0), interpolation=interp),
                v2.RandomHorizontalFlip(),
            ]
        else:
            scaled = round(self.input_size / self.crop_pct)
            resize = [v2.Resize(scaled, interpolation=interp, antialias=True), v2.CenterCrop(self.input_size)]
        return v2.Compose([*resize, v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)])


# ----------------------------------------------------------------------------------------------- registry

DatasetLoader = Callable[[Config, str], tuple[tuple[str, ...], Split, Split]]
_REGISTRY: dict[str, DatasetLoader] = {}


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    def wrap(fn: DatasetLoader) -> DatasetLoader:
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_datasets() -> list[str]:
    return [*sorted(_REGISTRY), "imagefolder:<path>"]


def _seeded_split(n: int, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Train and test ids for a dataset without an official split: a permutation fixed by the seed."""
    perm = np.random.default_rng(cfg.seed).permutation(n)
    n_test = max(1, round(n * cfg.test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _in_memory(images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> Split:
    return Split(sample_ids=ids.astype(np.int64), labels=labels[ids].astype(np.int64), images=images[ids])


@register_dataset("digits")
def _digits(cfg: Config, _arg: str) -> tuple[tuple[str, ...], Split, Split]:
    """scikit-learn's bundled 8x8 digits (1,797 images, no network), grey levels 0-16 -> uint8 RGB."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    grey = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(grey[..., None], 3, axis=-1)
    train_ids, test_ids = _seeded_split(len(images), cfg)
    labels = bunch.target.astype(np.int64)
    return tuple(str(d) for d in range(10)), _in_memory(images, labels, train_ids), _in_memory(images, labels, test_ids)


@register_dataset("fake")
def _fake(cfg: Config, _arg: str) -> tuple[tuple[str, ...], Split, Split]:
    """Synthetic noise images with random labels, all from the seed: for tests and latency-only runs."""
    rng = np.random.default_rng(cfg.seed)
    n, size = cfg.fake_samples, cfg.image_size
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, cfg.fake_classes, size=n).astype(np.int64)
    train_ids, test_ids = _seeded_split(n, cfg)
    names = tuple(f"class_{i}" for i in range(cfg.fake_classes))
    return names, _in_memory(images, labels, train_ids), _in_memory(images, labels, test_ids)


def _torchvision_cifar(cls_name: str) -> DatasetLoader:
    def load(cfg: Config, _arg: str) -> tuple[tuple[str, ...], Split, Split]:
        import torchvision

        root = Path(cfg.data_dir).expanduser()
        cls = getattr(torchvision.datasets, cls_name)
        try:
            train, test = (cls(root=str(root), train=t, download=True) for t in (True, False))
        except Exception as err:
            raise DataError(
                f"{cls_name.lower()}: could not download into {root} ({type(err).__name__}: {err}); "
                f"put the extracted dataset there (data_dir=...) or use data=digits"
            ) from None

        def split(ds) -> Split:
            ids = np.arange(len(ds.targets), dtype=np.int64)
            return Split(sample_ids=ids, labels=np.asarray(ds.targets, dtype=np.int64), images=ds.data)

        return tuple(train.classes), split(train), split(test)

    return load


register_dataset("cifar10")(_torchvision_cifar("CIFAR10"))
register_dataset("cifar100")(_torchvision_cifar("CIFAR100"))


def _files_under(folder: Path) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    classes = tuple(sorted(d.name for d in folder.iterdir() if d.is_dir()))
    items = [
        (str(p), i)
        for i, c in enumerate(classes)
        for p in sorted((folder / c).rglob("*"))
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]
    return classes, items


def _imagefolder(cfg: Config, arg: str) -> tuple[tuple[str, ...], Split, Split]:
    """`imagefolder:<path>`: <path>/<class>/*.jpg, or <path>/train|test/<class>/... with an official split."""
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise DataError(f"imagefolder: no such directory {str(root)!r}; pass data=imagefolder:<path to images>")
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if test_dir is not None and (root / "train").is_dir():
        classes, test_items = _files_under(test_dir)
        train_classes, train_items = _files_under(root / "train")
        if train_classes != classes:
            raise DataError(f"imagefolder: class folders differ between {root / 'train'} and {test_dir}")
    else:
        classes, items = _files_under(root)
        train_ids, test_ids = _seeded_split(len(items), cfg) if items else (np.array([]), np.array([]))
        train_items, test_items = [items[i] for i in train_ids], [items[i] for i in test_ids]
    if len(classes) < 2 or not test_items:
        raise DataError(f"imagefolder: {root} needs at least two class folders with images ({len(classes)} found)")

    def split(items: list[tuple[str, int]]) -> Split:
        return Split(
            sample_ids=np.arange(len(items), dtype=np.int64),
            labels=np.array([lab for _, lab in items], dtype=np.int64),
            paths=tuple(p for p, _ in items),
        )

    return classes, split(train_items), split(test_items)


def fingerprint(split: Split, class_names: tuple[str, ...], root: str | None = None) -> str:
    """sha256 of the ordered test ids and labels, the class names and the raw data (arrays or file sizes)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(split.sample_ids, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(split.labels, dtype=np.int64).tobytes())
    h.update(json.dumps(list(class_names)).encode())
    if split.images is not None:
        h.update(np.ascontiguousarray(split.images).tobytes())
    for path in split.paths or ():
        rel = str(Path(path).relative_to(root)) if root else path
        h.update(f"{rel}\0{Path(path).stat().st_size}\n".encode())
    return "sha256:" + h.hexdigest()[:32]


_CACHE: dict[tuple, DatasetInfo] = {}


def resolve_dataset(cfg: Config) -> DatasetInfo:
    """Load (once per process) the dataset the config names; unknown names raise with close matches."""
    key = (
        cfg.data,
        cfg.data_dir,
        cfg.seed,
        cfg.test_fraction,
        cfg.fake_samples,
        cfg.fake_classes,
        cfg.image_size if cfg.data == "fake" else 0,
    )
    if key in _CACHE:
        return _CACHE[key]
    name, _, arg = cfg.data.partition(":")
    if name == "imagefolder":
        loader: DatasetLoader = _imagefolder
    elif name in _REGISTRY and not arg:
        loader = _REGISTRY[name]
    else:
        close = difflib.get_close_matches(cfg.data, list_datasets(), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"available: {', '.join(list_datasets())}"
        raise DataError(f"unknown dataset {cfg.data!r}; {hint}")
    classes, train, test = loader(cfg, arg)
    root = str(Path(arg).expanduser()) if name == "imagefolder" else None
    info = DatasetInfo(
        name=cfg.data, class_names=classes, train=train, test=test, fingerprint=fingerprint(test, classes, root)
    )
    _CACHE[key] = info
    return info


# ------------------------------------------------------------------------------------- dataset/datamodule


class SplitDataset(Dataset):
    """Yields (image tensor, label, sample_id). Training augmentation is seeded per (seed, epoch, index)."""

    def __init__(self, split: Split, transform: v2.Compose, seed: int | None = None, epoch: int = 0):
        self.split, self.transform, self.seed, self.epoch = split, transform, seed, epoch

    def __len__(self) -> int:
        return len(self.split)

    def _pixels(self, i: int) -> torch.Tensor:
        if self.split.images is not None:
            return torch.from_numpy(np.ascontiguousarray(self.split.images[i])).permute(2, 0, 1)
        from torchvision.io import ImageReadMode, decode_image

        return decode_image(self.split.paths[i], mode=ImageReadMode.RGB)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        pixels = self._pixels(i)
        if self.seed is None:
            image = self.transform(pixels)
        else:
            # Random augmentation drawn from a generator that only (seed, epoch, i) decide, so every arm
            # sees exactly the same augmented images whatever RNG calls its model construction made.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFF_FFFF)
                image = self.transform(pixels)
        return image, int(self.split.labels[i]), int(self.split.sample_ids[i])


class ABDataModule(L.LightningDataModule):
    """One seeded data module for every arm: same test samples in the same order, same training order."""

    def __init__(self, cfg: Config, preprocess: Preprocess):
        super().__init__()
        self.cfg, self.preprocess = cfg, preprocess
        self.info: DatasetInfo | None = None

    def prepare_data(self) -> None:
        resolve_dataset(self.cfg)

    def setup(self, stage: str | None = None) -> None:
        self.info = resolve_dataset(self.cfg)

    def _loader(self, dataset: Dataset, shuffle: bool, generator: torch.Generator | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.cfg.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        assert self.info is not None
        # Called again every epoch (Trainer(reload_dataloaders_every_n_epochs=1)): order and augmentation
        # depend only on (seed, epoch), identical for every arm.
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        dataset = SplitDataset(
            self.info.train, self.preprocess.transform(True, self.cfg.augment), seed=self.cfg.seed, epoch=epoch
        )
        return self._loader(dataset, shuffle=True, generator=torch.Generator().manual_seed(self.cfg.seed + epoch))

    def test_dataloader(self) -> DataLoader:
        assert self.info is not None
        return self._loader(SplitDataset(self.info.test, self.preprocess.transform(False, "none")), shuffle=False)
