"""Test samples by sample id, for the comparison: their groups (clustered images) and their pixels (the report's
gallery of flipped samples).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lab.config import Config
from lab.data.datasets import DataError, DatasetInfo, resolve_dataset


def _split_root(root: Path) -> Path:
    """Where the test split's class folders live: <root>/test (or val) beside <root>/train, else <root>."""
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    return test_dir if test_dir is not None and (root / "train").is_dir() else root


def _subfolder_groups(info: DatasetInfo, root: Path) -> list[str]:
    """<class>/<group>/.../img.png -> group (the same name under two classes is one group, e.g. a patient);
    an image directly in its class folder is a group of its own."""
    base = _split_root(root)
    groups = []
    for path in info.test.paths or ():
        parts = Path(path).relative_to(base).parts
        groups.append(parts[1] if len(parts) > 2 else "/".join(parts))
    return groups


def _csv_groups(info: DatasetInfo, csv: Path, root: Path | None) -> list[str]:
    """A CSV with `group` and `file` (path below the image folder, or absolute) or `sample_id` columns."""
    import pandas as pd

    try:
        table = pd.read_csv(csv, dtype=str)
    except (OSError, ValueError) as err:
        raise DataError(f"groups: cannot read {str(csv)!r} ({type(err).__name__}); give a CSV with columns "
                        "file (or sample_id) and group") from None
    key = "file" if "file" in table.columns else "sample_id"
    if "group" not in table.columns or key not in table.columns:
        raise DataError(f"groups: {csv} needs columns file (or sample_id) and group; it has {', '.join(table.columns)}")
    if key == "file":
        if info.test.paths is None:
            raise DataError(f"groups: {csv} maps files, but {info.name} has no files; use a sample_id column")
        mapping = dict(zip(table["file"], table["group"], strict=True))
        names = [str(Path(p).relative_to(root)) if root else p for p in info.test.paths]
        found = [mapping.get(name, mapping.get(str(p))) for name, p in zip(names, info.test.paths, strict=True)]
    else:
        mapping = {int(k): g for k, g in zip(table["sample_id"], table["group"], strict=True)}
        names = [str(i) for i in info.test.sample_ids]
        found = [mapping.get(int(i)) for i in info.test.sample_ids]
    missing = [name for name, group in zip(names, found, strict=True) if group is None or group != group]
    if missing:
        raise DataError(f"groups: {len(missing)} of the {len(names)} test samples have no group in {csv} "
                        f"(first: {missing[0]})")
    return [str(g) for g in found]


def test_groups(cfg: Config) -> dict[int, str] | None:
    """The group of every test sample, by sample_id, when the config names groups; None when it does not.

    `group_by=subfolder` reads an image folder's <class>/<group>/ level; `groups=<csv>` maps files or sample ids
    to groups. The comparison then resamples whole groups (lab.stats.clustered).
    """
    group_by, source = cfg.group_by, cfg.groups
    if group_by == "none" and not source:
        return None
    info = resolve_dataset(cfg)
    name, _, arg = cfg.data.partition(":")
    root = Path(arg).expanduser() if name == "imagefolder" else None
    if source:
        groups = _csv_groups(info, Path(source).expanduser(), root)
    elif root is None:
        raise DataError(f"group_by=subfolder needs data=imagefolder:<path>; {cfg.data} has no folders (give "
                        "groups=<csv with sample_id,group> instead)")
    else:
        groups = _subfolder_groups(info, root)
    return dict(zip((int(i) for i in info.test.sample_ids), groups, strict=True))




def test_images(cfg: Config, ids: list[int], limit: int = 8, fingerprint: str | None = None) -> list[np.ndarray]:
    """Raw pixels (uint8 HxWx3) of up to `limit` test samples by sample id, for a report's flips gallery.

    Empty where the dataset is unavailable here, or is not the one the arms scored (`fingerprint`, e.g. a
    `compare` of old runs); ids not in the test split are skipped.
    """
    try:
        info = resolve_dataset(cfg)
    except Exception:  # a gallery is a nicety; a dataset absent on this machine is fine
        return []
    if fingerprint is not None and info.fingerprint != fingerprint:
        return []
    position = {int(s): i for i, s in enumerate(info.test.sample_ids)}
    out = []
    for sid in ids[:limit]:
        i = position.get(int(sid))
        if i is None:
            continue
        if info.test.images is not None:
            out.append(np.asarray(info.test.images[i]))
        elif info.test.paths is not None:
            from PIL import Image

            out.append(np.asarray(Image.open(info.test.paths[i]).convert("RGB")))
    return out
