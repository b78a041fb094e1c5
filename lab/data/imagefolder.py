"""Image folders read the way torchvision's `ImageFolder` reads them, checked in full before any run exists.

The rule: `<root>/<class>/**/<file>`: every file at any depth below a class folder belongs to that class (as in
`ImageFolder`); hidden files and folders (`.DS_Store`, `.ipynb_checkpoints`) are left out, and so are files whose
suffix is not an image's. Only suffixes that torchvision's `decode_image` reads here count as images
(DECODABLE); `.bmp`, `.tif` and `.tiff` (which it cannot read) are refused by name like a corrupt file.

Every image is read and decoded once; the outcome (a sha256 of its bytes, or why it cannot be decoded) is cached
on disk under `data_dir` keyed by the files' paths, sizes and modification times, so the launcher decodes the
folder once and the arm processes (and later runs) read the check from the cache. An undecodable file is a
one-line error naming it; with `skip_bad_images=true` it is left out with a warning, and the list of skipped
files is logged as an artifact and is part of the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

DECODABLE = (".jpg", ".jpeg", ".png", ".gif", ".webp")
UNDECODABLE = (".bmp", ".tif", ".tiff")  # listed as image suffixes elsewhere, but torchvision cannot decode them


class DataError(ValueError):
    """A dataset that cannot be loaded; the message names the dataset (or the file) and the fix."""


@dataclass(frozen=True)
class Scan:
    """One folder of class folders: class names, (path, label) in a stable order, files left out (relative)."""

    classes: tuple[str, ...]
    items: tuple[tuple[str, int], ...]
    skipped: tuple[str, ...]


# path -> (size, mtime_ns, sha256 of the bytes or "", problem or ""): decoded at most once per process
_CHECKED: dict[str, tuple[int, int, str, str]] = {}


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _decode(path: Path) -> tuple[str, str]:
    """(sha256 of the file's bytes, "") or ("", why it cannot be decoded)."""
    import torch
    from torchvision.io import ImageReadMode, decode_image

    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if path.suffix.lower() in UNDECODABLE:
        return digest, f"{path.suffix.lower()} images cannot be decoded by torchvision; convert them to PNG"
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except Exception as err:  # torchvision raises RuntimeError with C++ frames: keep the first line only
        return digest, f"not a readable image ({(str(err).strip().splitlines() or [type(err).__name__])[0][:120]})"
    if image.ndim != 3 or min(image.shape[-2:]) == 0:
        return digest, "decodes to an empty image"
    return digest, ""


def _cache_file(cache_dir: Path | None, files: list[Path]) -> Path | None:
    if cache_dir is None:
        return None
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return cache_dir / "checked-images" / f"{h.hexdigest()[:32]}.json"


def check_files(files: list[Path], cache_dir: Path | None = None) -> dict[str, tuple[str, str]]:
    """path -> (sha256, problem) for every file, decoding only those neither this process nor the disk cache
    has seen with the same size and modification time."""
    cache = _cache_file(cache_dir, files)
    if cache is not None and cache.is_file():
        try:
            cached = {k: (str(v[0]), str(v[1])) for k, v in json.loads(cache.read_text()).items()}
            for p in files:  # the digests serve content_digest (the fingerprint) without reading the files again
                st = p.stat()
                _CHECKED[str(p)] = (st.st_size, st.st_mtime_ns, *cached[str(p)])
            return cached
        except (ValueError, KeyError, IndexError, TypeError):
            pass  # a damaged cache is decoded again
    out = {}
    for p in files:
        st = p.stat()
        seen = _CHECKED.get(str(p))
        if seen is None or seen[:2] != (st.st_size, st.st_mtime_ns):
            seen = (st.st_size, st.st_mtime_ns, *_decode(p))
            _CHECKED[str(p)] = seen
        out[str(p)] = (seen[2], seen[3])
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps({k: list(v) for k, v in out.items()}))
            tmp.replace(cache)
        except OSError:
            pass  # a read-only data_dir only costs a second decode
    return out


def content_digest(path: str) -> str:
    """sha256 of a file's bytes, from the check where it ran in this process."""
    p = Path(path)
    st = p.stat()
    seen = _CHECKED.get(str(p))
    if seen is not None and seen[:2] == (st.st_size, st.st_mtime_ns) and seen[2]:
        return seen[2]
    return hashlib.sha256(p.read_bytes()).hexdigest()


def scan_folder(folder: Path, skip_bad: bool = False, cache_dir: Path | None = None) -> Scan:
    """Class folders of `folder`, every image below each decoded once; bad files raise (or are skipped)."""
    classes = tuple(sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")))
    candidates = [
        (p, i)
        for i, c in enumerate(classes)
        for p in sorted((folder / c).rglob("*"))
        if p.is_file() and p.suffix.lower() in DECODABLE + UNDECODABLE and not _hidden(p, folder)
    ]
    checked = check_files([p for p, _ in candidates], cache_dir)
    bad = [(p, checked[str(p)][1]) for p, _ in candidates if checked[str(p)][1]]
    if bad and not skip_bad:
        path, problem = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"imagefolder: {path}: {problem}{more}; remove or fix it, or set skip_bad_images=true")
    bad_paths = {str(p) for p, _ in bad}
    items = tuple((str(p), i) for p, i in candidates if str(p) not in bad_paths)
    present = {i for _, i in items}
    for i, c in enumerate(classes):
        if i not in present:
            raise DataError(f"imagefolder: class folder {folder / c} holds no decodable image "
                            f"({', '.join(DECODABLE)}); add images or remove the folder")
    skipped = tuple(str(p.relative_to(folder)) for p, _ in bad)
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        print(f"ablab: warning: skip_bad_images=true left out {len(skipped)} undecodable file"
              f"{'' if len(skipped) == 1 else 's'} in {folder}: {shown}", file=sys.stderr)
    return Scan(classes, items, skipped)
