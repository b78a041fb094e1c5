"""lab/plots.py: every figure draws from a summary, the optional ones say None, and PNGs close their figure.

Run with ``python -m pytest tests/test_plots.py -q``.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from test_compare import make_arms

from lab import plots
from lab.compare import analyse
from lab.config import build_config

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def summary() -> dict:
    return analyse(build_config({"n_resamples": 200}), make_arms([0.7, 0.8], n=300))


def test_summary_figures(summary: dict) -> None:
    confusion = plots.plot_confusion(summary)
    assert len(confusion.axes) == 2 and confusion.axes[1].get_title().startswith("m1")
    assert len(confusion.axes[0].texts) == np.count_nonzero(summary["arms"][0]["confusion"])  # counts, 3 classes
    per_class = plots.plot_per_class(summary)
    assert len(per_class.axes[0].patches) == 2 * summary["num_classes"]
    calibration = plots.plot_calibration(summary)
    assert calibration.axes[0].get_legend().get_texts()[0].get_text().startswith("m0 (ECE ")
    latency = plots.plot_latency(summary)
    assert len(latency.axes[1].lines) == 2 and len(latency.axes[1].lines[0].get_ydata()) == 10
    for fig in (confusion, per_class, calibration, latency):
        assert plots.to_png(fig).startswith(PNG)
    assert plt.get_fignums() == []  # to_png closes each figure


def test_pair_figures(summary: dict) -> None:
    pair = summary["pairs"][0]
    flips = plots.plot_flips(pair)
    heights = [round(p.get_height()) for p in flips.axes[0].patches]
    assert heights == [r["only_a"] for r in pair["per_class"]] + [r["only_b"] for r in pair["per_class"]]
    gallery = plots.plot_gallery(pair, [np.zeros((4, 4, 3), np.uint8)] * 3, [np.ones((4, 4, 3), np.uint8)])
    assert len(gallery.axes) == 2 * 3 and len(gallery.axes[3].images) == 1 and not gallery.axes[4].images
    for fig in (flips, gallery):
        plt.close(fig)


def test_forest_plot_shows_each_arm_against_the_baseline_with_the_margin() -> None:
    cfg = build_config({"arms": ["model0", "model1", "model2"], "rule": "equivalence", "margin": 0.05,
                        "n_resamples": 200})  # fmt: skip
    summary = analyse(cfg, make_arms([0.7, 0.72, 0.8], n=300))
    fig = plots.plot_forest(summary)
    ax = fig.axes[0]
    ticks = dict(zip(ax.get_yticks(), (t.get_text() for t in ax.get_yticklabels()), strict=True))
    assert ticks == {1: "m1 vs m0", 0: "m2 vs m0"}  # the first pair on top
    (points, _, (bars,)) = ax.containers[0].lines
    assert list(points.get_xdata()) == pytest.approx([100 * p["metric_diff"] for p in summary["pairs"]])
    segments = bars.get_segments()
    np.testing.assert_allclose([s[:, 0] for s in segments],
                               [(100 * p["decision_low"], 100 * p["decision_high"]) for p in summary["pairs"]])
    vertical = sorted(line.get_xdata()[0] for line in ax.lines if len(set(line.get_xdata())) == 1)
    assert vertical == pytest.approx([-5.0, 0.0, 5.0])  # 0 and the margin on both sides (equivalence)
    assert "95% interval the rule used" in ax.get_title()
    assert plots.to_png(fig).startswith(PNG)


def test_optional_figures_are_none_without_data(summary: dict) -> None:
    assert plots.plot_gallery(summary["pairs"][0], [], []) is None
    bare = summary | {"arms": [arm | {"latencies_ms": []} for arm in summary["arms"]]}
    assert plots.plot_latency(bare) is None


def test_many_classes_drop_the_cell_counts() -> None:
    arm = {"name": "a", "confusion": np.eye(25, dtype=int).tolist()}
    fig = plots.plot_confusion({"arms": [arm]})
    assert not fig.axes[0].texts
    plt.close(fig)


def test_past_50_classes_the_figures_draw_the_classes_shown() -> None:
    from test_compare_classes import IMPROVED, K, many_class_arms

    summary = analyse(build_config({"n_resamples": 200}), many_class_arms())
    shown = summary["classes_shown"]
    per_class = plots.plot_per_class(summary)
    assert len(per_class.axes[0].patches) == 2 * len(shown) == 100  # not 2 x 300 bars
    assert per_class.axes[0].get_xticklabels()[0].get_text() == str(IMPROVED)
    assert f"50 of {K} classes" in per_class.axes[0].get_title()
    flips = plots.plot_flips(summary["pairs"][0])
    assert len(flips.axes[0].patches) == 2 * len(summary["pairs"][0]["per_class"]) <= 100
    confusion = plots.plot_confusion(summary)
    rows = confusion.axes[0].images[0].get_array()
    assert rows.shape == (50, 51) and confusion.axes[0].get_xticklabels()[-1].get_text() == "other"
    np.testing.assert_allclose(rows.sum(1), 1.0)  # each true class's images, the classes left out included
    for fig in (per_class, flips, confusion):
        assert plots.to_png(fig).startswith(PNG)
