"""lab/data.py: the shared seeded data module, the registry, and the fingerprint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lab.config import build_config
from lab.data import ABDataModule, DataError, Preprocess, resolve_dataset


def _module(**values) -> ABDataModule:
    cfg = build_config(values)
    dm = ABDataModule(cfg, Preprocess(cfg.image_size, cfg.mean, cfg.std))
    dm.setup("test")
    return dm


def _test_order(dm: ABDataModule) -> tuple[np.ndarray, torch.Tensor]:
    ids, images = zip(*[(b[2], b[0]) for b in dm.test_dataloader()], strict=True)
    return torch.cat(ids).numpy(), torch.cat(images)


def test_digits_same_seed_same_samples_order_and_fingerprint() -> None:
    one, two = _module(data="digits", seed=3), _module(data="digits", seed=3)
    ids_one, x_one = _test_order(one)
    ids_two, x_two = _test_order(two)
    assert one.info.fingerprint == two.info.fingerprint
    np.testing.assert_array_equal(ids_one, ids_two)
    assert torch.equal(x_one, x_two)
    assert len(ids_one) == round(1797 * 0.3) and np.all(np.diff(ids_one) > 0)  # fixed, ascending order
    assert x_one.shape[1:] == (3, 32, 32)


@pytest.mark.parametrize("change", [{"seed": 4}, {"test_fraction": 0.2}])
def test_another_seed_or_split_changes_the_fingerprint(change: dict) -> None:
    base = resolve_dataset(build_config({"data": "digits", "seed": 3}))
    other = resolve_dataset(build_config({"data": "digits", "seed": 3} | change))
    assert base.fingerprint != other.fingerprint
    assert not np.array_equal(base.test.sample_ids, other.test.sample_ids)


def test_training_order_and_augmentation_do_not_depend_on_the_model_rng() -> None:
    """Two arms build the same module after consuming different amounts of the global RNG."""
    batches = []
    for burn in (0, 1000):
        torch.manual_seed(burn)
        torch.rand(burn)  # a bigger model draws more numbers at init
        dm = _module(data="digits", seed=1, augment="crop_flip")
        dm.trainer = None
        batches.append(next(iter(dm.train_dataloader())))
    assert torch.equal(batches[0][2], batches[1][2])  # same sample ids in the same order
    assert torch.equal(batches[0][0], batches[1][0])  # same augmented pixels


def test_fake_is_deterministic_in_the_seed() -> None:
    a = resolve_dataset(build_config({"data": "fake", "fake_samples": 64, "seed": 1}))
    b = resolve_dataset(build_config({"data": "fake", "fake_samples": 64, "seed": 1}))
    c = resolve_dataset(build_config({"data": "fake", "fake_samples": 64, "seed": 2}))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.num_classes == 10 and len(a.test) == round(64 * 0.3)


def _write_folder(root: Path, sizes: dict[str, int]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, count in sizes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")


def test_imagefolder_split_ids_and_fingerprint_follow_the_files(tmp_path: Path) -> None:
    _write_folder(tmp_path / "imgs", {"cat": 6, "dog": 5})
    cfg = build_config({"data": f"imagefolder:{tmp_path / 'imgs'}", "test_fraction": 0.5, "image_size": 16})
    info = resolve_dataset(cfg)
    assert info.class_names == ("cat", "dog") and len(info.test) + len(info.train) == 11
    dm = ABDataModule(cfg, Preprocess(16, cfg.mean, cfg.std))
    dm.setup()
    x, _, ids = next(iter(dm.test_dataloader()))
    assert x.shape[1:] == (3, 16, 16) and len(ids) == len(info.test)
    # Changing one test file's content (size) changes the fingerprint.
    victim = Path(info.test.paths[0])
    victim.write_bytes(victim.read_bytes() + b"\0")
    from lab import data

    data._CACHE.clear()
    assert resolve_dataset(cfg).fingerprint != info.fingerprint


def test_imagefolder_with_official_split(tmp_path: Path) -> None:
    _write_folder(tmp_path / "ds" / "train", {"a": 3, "b": 3})
    _write_folder(tmp_path / "ds" / "test", {"a": 2, "b": 2})
    info = resolve_dataset(build_config({"data": f"imagefolder:{tmp_path / 'ds'}"}))
    assert len(info.train) == 6 and len(info.test) == 4
    np.testing.assert_array_equal(info.test.labels, [0, 0, 1, 1])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("digit", "unknown dataset 'digit'; did you mean digits"),
        ("cifar11", "unknown dataset 'cifar11'; did you mean cifar10"),
        ("imagefolder:/no/such/dir", "imagefolder: no such directory '/no/such/dir'"),
    ],
)
def test_bad_datasets_say_what_and_how_to_fix(data: str, message: str) -> None:
    with pytest.raises(DataError) as info:
        resolve_dataset(build_config({"data": data}))
    assert message in str(info.value)


def test_cifar_without_network_names_the_fix(tmp_path: Path) -> None:
    cfg = build_config({"data": "cifar10", "data_dir": str(tmp_path)})
    with pytest.raises(DataError, match=r"cifar10: could not download into .*use data=digits"):
        resolve_dataset(cfg)
