"""The dataset registry and loaders (digits, fake, CIFAR, image folders), the splits, and the fingerprint.

The fingerprint hashes the ordered test sample ids and labels, the class names, and the raw data where that is cheap
(the arrays of an in-memory dataset; the file list with sizes of an image folder), so two arms -- or two runs a
month apart -- can prove they scored the same test set.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lab.config import Config
from lab.data.imagefolder import DECODABLE, DataError, content_digest, scan_folder

IMAGE_SUFFIXES = DECODABLE  # what torchvision decodes here (lab/data/imagefolder.py); .bmp/.tif are refused by name


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
    skipped: tuple[str, ...] = ()  # undecodable files left out with skip_bad_images=true (relative paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def label_map_hash(self) -> str:
        return hashlib.sha256(json.dumps(list(self.class_names)).encode()).hexdigest()[:16]

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


_SKIPPED: dict[str, tuple[str, ...]] = {}  # imagefolder root -> files its last scan left out (skip_bad_images)


def _files_under(folder: Path, cfg: Config, root: Path) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    scan = scan_folder(folder, cfg.skip_bad_images, Path(cfg.data_dir).expanduser())
    prefix = folder.relative_to(root)
    _SKIPPED[str(root)] = (*_SKIPPED.get(str(root), ()), *(str(prefix / s) for s in scan.skipped))
    return scan.classes, list(scan.items)


def _imagefolder(cfg: Config, arg: str) -> tuple[tuple[str, ...], Split, Split]:
    """`imagefolder:<path>`: <path>/<class>/*.jpg, or <path>/train|test/<class>/... with an official split."""
    root = Path(arg).expanduser()
    _SKIPPED.pop(str(root), None)
    if not arg.strip():
        raise DataError("data: imagefolder: needs a path (data=imagefolder:<path to images>)")
    if not root.is_dir():
        raise DataError(f"imagefolder: no such directory {str(root)!r}; pass data=imagefolder:<path to images>")
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if test_dir is not None and (root / "train").is_dir():
        classes, test_items = _files_under(test_dir, cfg, root)
        train_classes, train_items = _files_under(root / "train", cfg, root)
        if train_classes != classes:
            raise DataError(f"imagefolder: class folders differ between {root / 'train'} and {test_dir}")
    else:
        classes, items = _files_under(root, cfg, root)
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


def fingerprint(split: Split, class_names: tuple[str, ...], root: str | None = None,
                skipped: tuple[str, ...] = ()) -> str:
    """sha256 of the ordered ids and labels, the class names and the raw data (arrays, or the files' contents),
    and the files an image folder left out (skip_bad_images)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(split.sample_ids, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(split.labels, dtype=np.int64).tobytes())
    h.update(json.dumps(list(class_names)).encode())
    if split.images is not None:
        h.update(np.ascontiguousarray(split.images).tobytes())
    for path in split.paths or ():
        rel = str(Path(path).relative_to(root)) if root else path
        h.update(f"{rel}\0{content_digest(path)}\n".encode())
    if skipped:
        h.update(json.dumps(["skipped", *skipped]).encode())
    return "sha256:" + h.hexdigest()[:32]


_CACHE: dict[tuple, DatasetInfo] = {}


def clear_cache() -> None:
    """Forget every dataset `resolve_dataset` has loaded in this process (say, after files changed on disk)."""
    _CACHE.clear()


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
        cfg.skip_bad_images,
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
    skipped = _SKIPPED.get(root, ()) if root else ()
    info = DatasetInfo(name=cfg.data, class_names=classes, train=train, test=test,
                       fingerprint=fingerprint(test, classes, root, skipped), skipped=skipped)
    _CACHE[key] = info
    return info
