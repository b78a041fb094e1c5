"""lab/data.py: the shared seeded data module, the registry, and the fingerprint."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from lab.config import build_config
from lab.data import ABDataModule, DataError, Preprocess, SplitDataset, resolve_dataset


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


def _forked_reference(dataset: SplitDataset, i: int) -> torch.Tensor:
    """How the augmentation was seeded before (torch.random.fork_rng + torch.manual_seed): the images must not
    change, or past fine-tunes could no longer be reused or reproduced."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(hash((dataset.seed, dataset.epoch, i)) & 0x7FFF_FFFF)
        return dataset.transform(dataset._pixels(i))


def test_augmentation_per_sample_matches_the_forked_rng_and_leaves_the_global_rng_alone() -> None:
    dm = _module(data="digits", seed=1, augment="crop_flip")
    dm.trainer = None
    dataset = dm.train_dataloader().dataset
    assert dataset.seed == 1
    torch.manual_seed(123)
    before = torch.get_rng_state()
    images = [dataset[i][0] for i in range(40)]
    assert torch.equal(torch.get_rng_state(), before)  # the model's dropout and init draws are untouched
    for i, image in enumerate(images):
        assert torch.equal(image, _forked_reference(dataset, i))
    assert len({img.sum().item() for img in images}) > 1 and not torch.equal(images[0], dataset.transform(
        dataset._pixels(0)))  # really augmented, and seeded per sample


def test_no_augmentation_means_no_per_sample_seeding_and_the_same_images() -> None:
    dm = _module(data="digits", seed=1)
    dm.trainer = None
    dataset = dm.train_dataloader().dataset
    assert dataset.seed is None  # augment=none: the transform draws nothing, so nothing is seeded
    seeded = SplitDataset(dataset.split, dataset.transform, seed=1)
    for i in (0, 5, 77):
        assert torch.equal(dataset[i][0], _forked_reference(seeded, i))


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
    # The fingerprint follows the files, not where they are: a copy has the same one, a copy with one test
    # file's content (size) changed has another. (New paths also keep resolve_dataset's cache out of the way.)
    same, changed = tmp_path / "same", tmp_path / "changed"
    shutil.copytree(tmp_path / "imgs", same)
    shutil.copytree(tmp_path / "imgs", changed)
    victim = changed / Path(info.test.paths[0]).relative_to(tmp_path / "imgs")
    victim.write_bytes(victim.read_bytes() + b"\0")
    copied = {
        folder: resolve_dataset(build_config({"data": f"imagefolder:{folder}", "test_fraction": 0.5, "image_size": 16}))
        for folder in (same, changed)
    }
    assert copied[same].fingerprint == info.fingerprint != copied[changed].fingerprint


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


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_without_network_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The real torchvision download path, with every outgoing connection refused: the same on any machine."""
    attempts: list[object] = []

    def no_network(address: object, *args: object, **kwargs: object) -> None:
        attempts.append(address)
        raise OSError("network is unreachable (blocked by the test)")

    monkeypatch.setattr(socket, "create_connection", no_network)
    cfg = build_config({"data": name, "data_dir": str(tmp_path)})
    with pytest.raises(DataError, match=rf"{name}: could not download into .*use data=digits") as info:
        resolve_dataset(cfg)
    assert attempts, "torchvision never tried to connect: the download path was not exercised"
    assert "blocked by the test" in str(info.value) and "\n" not in str(info.value)


def test_groups_from_subfolders_below_the_class_folders(tmp_path: Path) -> None:
    from lab import data

    for cls, group, count in [("cat", "p1", 3), ("cat", "p2", 2), ("dog", "p1", 2), ("dog", "p3", 3)]:
        _write_folder(tmp_path / "imgs" / cls, {group: count})
    _write_folder(tmp_path / "imgs", {"dog": 1})  # dog/0.png: directly in its class folder, a group of its own
    cfg = build_config({"data": f"imagefolder:{tmp_path / 'imgs'}", "test_fraction": 0.99, "group_by": "subfolder"})
    info = data.resolve_dataset(cfg)
    groups = data.test_groups(cfg)
    assert set(groups) == {int(i) for i in info.test.sample_ids}
    by_path = {Path(p).relative_to(tmp_path / "imgs").as_posix(): groups[int(i)]
               for i, p in zip(info.test.sample_ids, info.test.paths, strict=True)}  # fmt: skip
    assert by_path["cat/p1/0.png"] == by_path["dog/p1/1.png"] == "p1"  # one name under two classes: one group
    assert by_path["dog/p3/2.png"] == "p3" and by_path["dog/0.png"] == "dog/0.png"
    assert data.test_groups(build_config({"data": "digits"})) is None  # no groups asked for


def test_groups_from_a_csv_by_file_or_sample_id(tmp_path: Path) -> None:
    import pandas as pd

    from lab import data

    _write_folder(tmp_path / "imgs", {"cat": 4, "dog": 4})
    cfg = build_config({"data": f"imagefolder:{tmp_path / 'imgs'}", "test_fraction": 0.5,
                        "groups": str(tmp_path / "g.csv")})
    info = data.resolve_dataset(cfg)
    files = [Path(p).relative_to(tmp_path / "imgs").as_posix() for p in info.test.paths]
    pd.DataFrame({"file": files, "group": [f.split("/")[0] for f in files]}).to_csv(tmp_path / "g.csv", index=False)
    assert sorted(set(data.test_groups(cfg).values())) == sorted({f.split("/")[0] for f in files})
    pd.DataFrame({"file": files[1:], "group": "x"}).to_csv(tmp_path / "g.csv", index=False)
    with pytest.raises(DataError, match=rf"groups: 1 of the {len(files)} test samples have no group in .*g\.csv "
                                        rf"\(first: {files[0]}\)"):  # fmt: skip
        data.test_groups(cfg)
    digits = build_config({"data": "digits", "groups": str(tmp_path / "ids.csv")})
    ids = data.resolve_dataset(digits).test.sample_ids
    pd.DataFrame({"sample_id": ids, "group": ids // 10}).to_csv(tmp_path / "ids.csv", index=False)
    assert data.test_groups(digits) == {int(i): str(i // 10) for i in ids}
    pd.DataFrame({"sample": ids}).to_csv(tmp_path / "ids.csv", index=False)
    with pytest.raises(DataError, match="needs columns file \\(or sample_id\\) and group; it has sample"):
        data.test_groups(digits)
    with pytest.raises(DataError, match="group_by=subfolder needs data=imagefolder:<path>; digits has no folders"):
        data.test_groups(build_config({"data": "digits", "group_by": "subfolder"}))


def test_clear_cache_reloads_changed_files(tmp_path: Path) -> None:
    from lab import data

    _write_folder(tmp_path / "imgs", {"cat": 3, "dog": 3})
    cfg = build_config({"data": f"imagefolder:{tmp_path / 'imgs'}"})
    first = data.resolve_dataset(cfg)
    _write_folder(tmp_path / "imgs", {"cat": 5})
    assert data.resolve_dataset(cfg) is first  # cached for the process
    data.clear_cache()
    assert len(data.resolve_dataset(cfg).train) + len(data.resolve_dataset(cfg).test) == 8
