"""lab/data/imagefolder.py: the ImageFolder rule (files at any depth below a class folder), decodable suffixes
only, bad files named (or skipped and listed), empty class folders refused, the check cached on disk, and the
fingerprint following file contents."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lab.config import build_config
from lab.data import DataError, clear_cache, resolve_dataset, train_fingerprint
from lab.data.imagefolder import DECODABLE, scan_folder


def png(seed: int = 0, size: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def folder_cfg(root: Path, **extra):
    return build_config({"data": f"imagefolder:{root}", "test_fraction": 0.5, "data_dir": str(root.parent / "cache"),
                         **extra})


def test_nested_files_belong_to_their_class_folder_and_other_files_are_ignored(tmp_path: Path) -> None:
    root = write(tmp_path / "imgs", {"cat/a.png": png(1), "cat/deep/er/b.png": png(2), "dog/c.png": png(3),
                                     "dog/notes.txt": b"x", "dog/.hidden.png": b"junk", ".git/x.png": b"junk"})
    scan = scan_folder(root)
    assert scan.classes == ("cat", "dog") and scan.skipped == ()
    assert [(Path(p).relative_to(root).as_posix(), label) for p, label in scan.items] == [
        ("cat/a.png", 0), ("cat/deep/er/b.png", 0), ("dog/c.png", 1)]


@pytest.mark.parametrize(("name", "data", "message"), [
    ("dog/broken.png", b"\x89PNG\r\n\x1a\n not really", r"dog/broken.png: not a readable image"),
    ("dog/scan.bmp", b"BM....", r"dog/scan.bmp: .bmp images cannot be decoded by torchvision; convert them to PNG"),
    ("dog/scan.TIFF", b"II*\x00", r"dog/scan.TIFF: .tiff images cannot be decoded"),
])
def test_an_undecodable_file_is_one_line_naming_it(tmp_path: Path, name: str, data: bytes, message: str) -> None:
    root = write(tmp_path / "imgs", {"cat/a.png": png(1), "dog/b.png": png(2), name: data})
    with pytest.raises(DataError, match=message) as err:
        scan_folder(root)
    assert "\n" not in str(err.value) and "skip_bad_images=true" in str(err.value)


def test_skip_bad_images_lists_them_and_the_fingerprint_changes(tmp_path: Path, capsys) -> None:
    good = {"cat/a.png": png(1), "cat/b.png": png(2), "dog/c.png": png(3), "dog/d.png": png(4)}
    clean = write(tmp_path / "clean", good)
    dirty = write(tmp_path / "dirty", {**good, "dog/bad.png": b"not a png"})
    with pytest.raises(DataError, match=r"dog/bad\.png"):
        resolve_dataset(folder_cfg(dirty))
    info = resolve_dataset(folder_cfg(dirty, skip_bad_images=True))
    assert info.skipped == ("dog/bad.png",)
    assert "left out 1 undecodable file" in capsys.readouterr().err
    assert info.fingerprint != resolve_dataset(folder_cfg(clean, skip_bad_images=True)).fingerprint


def test_an_empty_class_folder_is_an_error_naming_it(tmp_path: Path) -> None:
    root = write(tmp_path / "imgs", {"cat/a.png": png(1), "dog/b.png": png(2), "emu/readme.txt": b"soon"})
    with pytest.raises(DataError, match=r"class folder .*/emu holds no decodable image"):
        scan_folder(root)


def test_an_empty_path_is_refused_at_config_load() -> None:
    from lab.config import ConfigError

    with pytest.raises(ConfigError, match=r"^data: imagefolder: needs a path"):
        build_config({"data": "imagefolder:"})


def test_the_check_is_cached_on_disk_and_follows_changed_files(tmp_path: Path, monkeypatch) -> None:
    from lab.data import imagefolder

    root = write(tmp_path / "imgs", {"cat/a.png": png(1), "dog/b.png": png(2)})
    scan_folder(root, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "checked-images").glob("*.json"))) == 1
    imagefolder._CHECKED.clear()  # a new process: only the disk cache remains
    monkeypatch.setattr(imagefolder, "_decode", lambda p: pytest.fail(f"decoded {p} again"))
    scan_folder(root, cache_dir=tmp_path / "cache")
    monkeypatch.undo()
    (root / "dog/b.png").write_bytes(b"now broken")
    with pytest.raises(DataError, match=r"dog/b\.png"):
        scan_folder(root, cache_dir=tmp_path / "cache")


def test_changing_one_training_image_changes_the_training_fingerprint(tmp_path: Path) -> None:
    files = {f"{c}/{i}.png": png(10 * k + i) for k, c in enumerate(("cat", "dog")) for i in range(4)}
    root = write(tmp_path / "imgs", files)
    info = resolve_dataset(folder_cfg(root))
    before, test_before = train_fingerprint(info), info.fingerprint
    victim = Path(info.train.paths[0])
    victim.write_bytes(png(999))  # same name, new pixels (the size may well be the same)
    clear_cache()
    after = resolve_dataset(folder_cfg(root))
    assert train_fingerprint(after) != before and after.fingerprint == test_before


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 3),
                                 st.sampled_from((*DECODABLE[:3], ".txt"))), min_size=1, max_size=12))
def test_scanner_property_every_image_below_a_class_is_found_once(tmp_path: Path, layout) -> None:
    root = tmp_path / "prop"
    shutil.rmtree(root, ignore_errors=True)
    files = {}
    for n, (cls, depth, suffix) in enumerate(layout):
        data = png(n) if suffix != ".txt" else b"text"
        if suffix in (".jpg", ".jpeg"):
            buf = io.BytesIO()
            Image.open(io.BytesIO(png(n))).save(buf, "JPEG")
            data = buf.getvalue()
        files["/".join([cls, *(f"d{k}" for k in range(depth)), f"f{n}{suffix}"])] = data
    write(root, files)
    classes = sorted({c for c, _, _ in layout})
    images = {rel for rel in files if not rel.endswith(".txt")}
    empty = [c for c in classes if not any(rel.startswith(c + "/") for rel in images)]
    if empty:
        with pytest.raises(DataError, match=f"/{empty[0]} holds no decodable image"):
            scan_folder(root)
        return
    scan = scan_folder(root)
    assert scan.classes == tuple(classes)
    found = {Path(p).relative_to(root).as_posix(): label for p, label in scan.items}
    assert set(found) == images
    assert all(classes[label] == rel.split("/")[0] for rel, label in found.items())
