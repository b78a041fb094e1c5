"""Every figure of a comparison report, drawn with matplotlib (Agg) from the summary's numbers.

Each ``plot_*`` returns a Figure (or None when there is nothing to draw); ``to_png`` turns one into bytes.
Per-class figures draw the summary's "classes_shown" (every class up to 50, else the classes that matter), so a
1,000-class comparison draws 50 bars, not 1,000 (seconds of matplotlib, and nothing a reader can read).
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

Figure = Any
MAX_LABELLED = 50  # class names under the bars up to this many bars


def shown_classes(summary: dict[str, Any], num_classes: int) -> list[int]:
    """The class indices the per-class figures draw, in order: "classes_shown", else all of them."""
    return list(summary.get("classes_shown") or range(num_classes))


def subset_title(summary: dict[str, Any], shown: list[int], what: str) -> str:
    k = summary.get("num_classes", len(shown))
    return what if len(shown) >= k else f"{what}: {len(shown)} of {k:,} classes (largest changes, then the worst)"


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
    """One row-normalised confusion matrix per arm, with counts where there are at most 20 classes. On a subset of
    the classes (summary "classes_shown") a last column, "other", holds predictions of the classes left out."""
    arms = summary["arms"]
    fig, axes = plt.subplots(1, len(arms), figsize=(4.2 * len(arms), 4), squeeze=False)
    for i, (ax, arm) in enumerate(zip(axes[0], arms, strict=True)):
        m = np.asarray(arm["confusion"], dtype=float)
        other = arm.get("confusion_other")
        full = m if other is None else np.column_stack([m, np.asarray(other, dtype=float)])
        rows = full / np.maximum(full.sum(1, keepdims=True), 1)
        ax.imshow(rows, cmap="Blues", vmin=0, vmax=1, aspect="equal" if other is None else "auto")
        ax.set_title(f"{arm['name']} (rows: true, normalised)", fontsize=9)
        if other is not None:  # a subset: name the classes once, on the left (text is most of a figure's cost)
            names = summary.get("class_names") or []
            labels = [names[c] if c < len(names) else str(c) for c in shown_classes(summary, len(m))]
            ax.set_yticks(range(len(labels)), labels if i == 0 else [], fontsize=4)
            ax.set_xticks([len(labels)], ["other"], fontsize=6)
        ax.set_xlabel("predicted" if other is None else "predicted (the rows' classes, then all others)")
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
    """Grouped bars: each arm's accuracy per class shown."""
    arms, names = summary["arms"], summary["class_names"]
    shown = shown_classes(summary, len(names))
    k = len(shown)
    fig, ax = plt.subplots(figsize=(max(6, min(0.45 * k * len(arms), 18)), 3.6))
    width = 0.8 / len(arms)
    for j, arm in enumerate(arms):
        ax.bar(np.arange(k) + j * width, [arm["per_class_accuracy"][c] for c in shown], width, label=arm["name"])
    labels = [names[c] for c in shown] if k <= MAX_LABELLED else [""] * k
    ax.set_xticks(np.arange(k) + 0.4 - width / 2, labels, rotation=90 if k > 12 else 0, fontsize=None if k <= 20 else 6)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title(subset_title(summary, shown, "Per-class accuracy"), fontsize=None if len(shown) == len(names) else 9)
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
    ax.set_xticks(x, labels if len(rows) <= MAX_LABELLED else [""] * len(rows), rotation=90 if len(rows) > 12 else 0,
                  fontsize=None if len(rows) <= 20 else 6)
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
