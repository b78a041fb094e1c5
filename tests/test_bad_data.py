"""The bad-data rows of issue 11's fault matrix: each bad image folder, bad key or bad model is caught before any
run exists (`python -m lab run` exits 2 with one `ablab: error:` line naming the file or key, the store holds no
run), and the preflight does it in seconds, not after an epoch of the other arm."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_ARGS, runs_by_status, write_safetensors
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lab.cli import main
from lab.config import FIELD_BY_NAME, ConfigError, build_config


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def folder(tmp: Path, extra: dict[str, bytes]) -> list[str]:
    root = tmp / "imgs"
    for rel, data in {**{f"{c}/{i}.png": png(10 * k + i) for k, c in enumerate(("cat", "dog")) for i in range(4)},
                      **extra}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return ["--data", f"imagefolder:{root}", "--data_dir", str(tmp / "cache")]


def wrong_class_checkpoint(tmp: Path) -> list[str]:
    import timm

    path = write_safetensors(timm.create_model("resnet10t", num_classes=3), "resnet10t", tmp / "three.safetensors")
    return ["--b", str(path)]


# (case, arguments made in tmp_path, what the one error line must say)
CASES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("corrupt image", lambda t: folder(t, {"dog/broken.png": b"\x89PNG\r\n\x1a\nnope"}),
     "dog/broken.png: not a readable image"),
    ("unsupported suffix", lambda t: folder(t, {"cat/scan.bmp": b"BM\0\0"}),
     "cat/scan.bmp: .bmp images cannot be decoded by torchvision"),
    ("empty class folder", lambda t: folder(t, {"emu/notes.txt": b"soon"}), "imgs/emu holds no decodable image"),
    ("empty path", lambda t: ["--data", "imagefolder:"], "data: imagefolder: needs a path"),
    ("corrupt file in a nested folder", lambda t: folder(t, {"dog/2024/june/x.png": b"junk"}),
     "dog/2024/june/x.png: not a readable image"),
    ("test_fraction=1.0 with training", lambda t: ["--test_fraction", "1.0", "--epochs", "1"],
     "test_fraction: 1.0 leaves no training images for epochs=1"),
    ("model that cannot take 32 px", lambda t: ["--b", "inception_v3"],
     "inception_v3: cannot be built for the shared 32 px input"),
    ("missing runs:/ URI", lambda t: ["--b", "runs:/" + "0" * 32 + "/model"], "not found"),
    ("wrong-class checkpoint", wrong_class_checkpoint, "has 3 output classes but the dataset has 10"),
]


@pytest.mark.parametrize(("case", "make", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_data_is_one_line_before_any_run(tracking: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                                             case: str, make: Callable[[Path], list[str]], message: str) -> None:
    args = make(tmp_path)
    start = time.monotonic()
    code = main(["run", *FAST_ARGS, *args])
    took = time.monotonic() - start
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ablab: error:")]
    assert code == 2, err
    assert len(errors) == 1 and message in errors[0], err
    assert runs_by_status(tracking) == {}, "a run was created"
    assert took < 10, f"{case}: refused after {took:.1f} s"


# ---- property-based: whatever a user types, the config loader answers with a Config or one ConfigError line

VALUES = st.one_of(st.text(max_size=12), st.integers(-10, 10**6), st.floats(allow_nan=True), st.booleans(),
                   st.none(), st.lists(st.integers(0, 5), max_size=3))


@settings(max_examples=300, deadline=None)
@given(values=st.dictionaries(st.sampled_from([*FIELD_BY_NAME, "epoch", "sede"]), VALUES, max_size=4))
def test_config_loader_property_a_config_or_one_line(values: dict) -> None:
    try:
        cfg = build_config(values)
    except ConfigError as err:
        assert "\n" not in str(err) and str(err).split(":")[0].strip()
        return
    assert cfg.test_fraction < 1.0 or cfg.epochs == 0
    assert not cfg.data.startswith("imagefolder:") or cfg.data.partition(":")[2].strip()


def test_summary_and_metrics_json_are_strict() -> None:
    import json

    import numpy as np

    from lab.runs import strict_json

    text = strict_json({"per_class": [0.5, float("nan"), np.float64("inf")], "n": np.int64(3), "ok": np.bool_(True)},
                       indent=1)
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON")) == {
        "per_class": [0.5, None, None], "n": 3, "ok": True}
