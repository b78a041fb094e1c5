"""Every figure of a comparison report, drawn with matplotlib (Agg) from the summary's numbers.

Each ``plot_*`` returns a Figure (or None when there is nothing to draw); ``to_png`` turns one into bytes.
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

Figure = Any


def plot_forest(summary: dict[str, Any]) -> Figure:
    """Every arm against the baseline: the metric difference with the interval the rule used, 0, and the margin."""
    pairs = summary["pairs"]
    fig, ax = plt.subplots(figsize=(6.4, 1.2 + 0.45 * len(pairs)))
    y = np.arange(len(pairs))[::-1]
    estimate = np.array([100 * p.get("metric_diff", p["acc_diff"]) for p in pairs])
    low = np.array([100 * p["decision_low"] for p in pairs])
    high = np.array([100 * p["decision_high"] for p in pairs])
    ax.errorbar(estimate, y, xerr=[estimate - low, high - estimate], fmt="o", color="#1f4e79", capsize=4)
    ax.axvline(0, color="grey", lw=1)
    margin = 100 * summary.get("margin", 0.0)
    if margin:
        for x in (-margin, margin) if summary["rule"] in ("equivalence", "bayes") else (-margin,):
            ax.axvline(x, color="#c62828", ls="--", lw=1)
        ax.axvspan(-margin, margin, color="#c62828", alpha=0.06, label=f"margin ±{margin:g} points")
        ax.legend(fontsize=8, loc="best")
    ax.set_yticks(y, [f"{p['b']} vs {p['a']}" for p in pairs])
    ax.set_xlabel(f"{summary.get('metric', 'accuracy').replace('_', ' ')} difference (points)")
    level = f"{100 * pairs[0]['decision_confidence']:.4g}%"
    ax.set_title(f"Each arm against {pairs[0]['a']}: the {level} interval the rule used", fontsize=9)
    fig.tight_layout()
    return fig


def plot_confusion(summary: dict[str, Any]) -> Figure:
    """One row-normalised confusion matrix per arm, with counts where there are at most 20 classes."""
    arms = summary["arms"]
    fig, axes = plt.subplots(1, len(arms), figsize=(4.2 * len(arms), 4), squeeze=False)
    for ax, arm in zip(axes[0], arms, strict=True):
        m = np.asarray(arm["confusion"], dtype=float)
        rows = m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"{arm['name']} (rows: true, normalised)", fontsize=9)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if len(m) <= 20:
            ax.set_xticks(range(len(m)))
            ax.set_yticks(range(len(m)))
            for (i, j), v in np.ndenumerate(m):
                if v:
                    ax.text(
                        j,
                        i,
                        int(v),
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if rows[i, j] > 0.5 else "black",
                    )
    fig.tight_layout()
    return fig


def plot_per_class(summary: dict[str, Any]) -> Figure:
    """Grouped bars: each arm's accuracy per class."""
    arms, names = summary["arms"], summary["class_names"]
    k = len(names)
    fig, ax = plt.subplots(figsize=(max(6, min(0.45 * k * len(arms), 18)), 3.6))
    width = 0.8 / len(arms)
    for j, arm in enumerate(arms):
        ax.bar(np.arange(k) + j * width, arm["per_class_accuracy"], width, label=arm["name"])
    ax.set_xticks(np.arange(k) + 0.4 - width / 2, names if k <= 40 else [""] * k, rotation=90 if k > 12 else 0)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("Per-class accuracy")
    fig.tight_layout()
    return fig


def plot_latency(summary: dict[str, Any]) -> Figure | None:
    """Box plot and trace of each arm's batch latencies (warm-up excluded); None without latencies."""
    series = [(a["name"], a["latencies_ms"]) for a in summary["arms"] if a["latencies_ms"]]
    if not series:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    ax1.boxplot([s for _, s in series], tick_labels=[n for n, _ in series], showfliers=True)
    ax1.set_ylabel("ms per batch")
    ax1.set_title("Batch latency (warm-up excluded)")
    for name, s in series:
        ax2.plot(s, label=name, lw=1)
    ax2.set_xlabel("measured batch")
    ax2.set_ylabel("ms")
    ax2.set_title("Latency over the test loop")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_calibration(summary: dict[str, Any]) -> Figure:
    """Reliability diagram of every arm, its ECE in the legend."""
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    for arm in summary["arms"]:
        c = arm["calibration"]
        conf, acc = np.asarray(c["mean_confidence"], float), np.asarray(c["accuracy"], float)
        keep = np.isfinite(conf) & np.isfinite(acc)
        ax.plot(conf[keep], acc[keep], marker="o", label=f"{arm['name']} (ECE {arm['ece']:.3f})")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_flips(pair: dict[str, Any]) -> Figure:
    """Per class, how many samples only A and only B got right."""
    rows = pair["per_class"]
    labels = [r["label"] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, min(0.4 * len(rows), 18)), 3.2))
    ax.bar(x - 0.2, [r["only_a"] for r in rows], 0.4, label=f"only {pair['a']} right")
    ax.bar(x + 0.2, [r["only_b"] for r in rows], 0.4, label=f"only {pair['b']} right")
    ax.set_xticks(x, labels if len(rows) <= 40 else [""] * len(rows), rotation=90 if len(rows) > 12 else 0)
    ax.set_ylabel("samples")
    ax.set_title(f"Flips per class: {pair['b']} vs {pair['a']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_gallery(pair: dict[str, Any], images_a: list[np.ndarray], images_b: list[np.ndarray]) -> Figure | None:
    """Two rows of thumbnails: samples only A got right, samples only B got right; None without images."""
    if not images_a and not images_b:
        return None
    cols = max(len(images_a), len(images_b), 1)
    fig, axes = plt.subplots(2, cols, figsize=(1.3 * cols + 1, 3.0), squeeze=False)
    for r, (imgs, who) in enumerate(((images_a, pair["a"]), (images_b, pair["b"]))):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(imgs):
                ax.imshow(imgs[c], interpolation="nearest")
        axes[r][0].set_title(f"only {who} right", fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def to_png(fig: Figure) -> bytes:
    """The figure as PNG bytes (90 dpi); closes it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
