"""lab/correctness.py: packed per-sample correctness, read from a real SQLite store, with and without the compact
artifact, and cached by run id."""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import pytest
from history_fakes import correct_mask, log_child, make_arm, predictions

from lab import correctness
from lab.compare import align


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 360, 1001])
def test_bits_survive_json(n: int) -> None:
    bits = np.random.default_rng(n).random(n) < 0.7
    back = correctness.from_json(correctness.Correctness(bits, "sha256:x").to_json())
    assert back.correct.dtype == bool and np.array_equal(back.correct, bits) and back.test_set == "sha256:x"


def test_bits_follow_sample_id_order_as_align_does() -> None:
    labels = np.arange(50) % 3
    frame = predictions(labels, correct_mask(50, 0.6, 4), sample_ids=np.arange(50) * 7 + 3)
    shuffled = frame.sample(frac=1.0, random_state=0)
    a, b = correctness.from_predictions(frame), correctness.from_predictions(shuffled)
    _, _, aligned = align([make_arm("x", shuffled)])
    assert np.array_equal(a.correct, aligned[:, 0]) and np.array_equal(b.correct, a.correct)
    assert a.test_set == b.test_set and a.test_set.startswith("sha256:")
    relabelled = frame.assign(label=np.where(frame["sample_id"] == 10, 2, frame["label"]))
    fewer = frame.iloc[1:]
    assert len({a.test_set, correctness.from_predictions(relabelled).test_set,
                correctness.from_predictions(fewer).test_set}) == 3  # one label or one sample changes it


def test_a_foreign_or_torn_file_is_refused() -> None:
    good = correctness.Correctness(np.ones(20, bool), "sha256:x").to_json()
    with pytest.raises(ValueError, match="format"):
        correctness.from_json(good.replace("ablab.correct/1", "other/2"))
    with pytest.raises(ValueError, match="3 bytes of bits for n=40"):
        correctness.from_json(good.replace('"n": 20', '"n": 40'))


def test_fetch_reads_new_and_old_runs_concurrently_and_caches_them(tracking: str, tmp_path: Path) -> None:
    client = mlflow.MlflowClient()
    labels = np.arange(40) % 3
    masks = [correct_mask(40, p, k) for k, p in enumerate((0.9, 0.7, 0.5))]
    new = log_child(client, "0", predictions(labels, masks[0]))
    old = log_child(client, "0", predictions(labels, masks[1]), bits=False)  # logged before correct.json
    running = log_child(client, "0", predictions(labels, masks[2]), status="RUNNING")
    empty = client.create_run("0").info.run_id
    client.set_terminated(empty, "FINISHED")
    found = [client.get_run(r) for r in (new, old, running, empty)]
    cache = tmp_path / "cache"
    downloaded = correctness.fetch(found, None, in_place=False)  # as from a server: MLflow's download API
    got = correctness.fetch(found, cache, workers=4)
    assert downloaded.keys() == got.keys() and downloaded[empty] is None
    assert all(np.array_equal(downloaded[r].correct, got[r].correct) for r in (new, old, running))
    assert np.array_equal(got[new].correct, masks[0]) and np.array_equal(got[old].correct, masks[1])
    assert np.array_equal(got[running].correct, masks[2]) and got[empty] is None
    expected = correctness.from_predictions(predictions(labels, masks[0])).test_set
    assert got[new].test_set == got[old].test_set == expected
    assert sorted(p.name for p in cache.iterdir()) == sorted([f"{new}.json", f"{old}.json"])  # not the RUNNING one

    for run in found[:2]:  # the artifacts are gone: only the cache can answer now
        shutil.rmtree(urlparse(run.info.artifact_uri).path if "://" in run.info.artifact_uri
                      else run.info.artifact_uri)
    again = correctness.fetch(found[:2], cache)
    assert np.array_equal(again[new].correct, masks[0]) and np.array_equal(again[old].correct, masks[1])
    assert correctness.fetch(found[:2], None) == {new: None, old: None}
