"""Render a comparison summary (from lab.compare.analyse) as Markdown, self-contained HTML and PNG plots.

The HTML embeds every plot as a base64 PNG so it renders on its own in the MLflow UI's artifact view.
Nothing here computes a statistic: it only lays out what the summary holds.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

Figure = Any


def _pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.2f}%"


def _pts(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:+.2f}"


def _p(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return "< 0.001" if x < 0.001 else f"{x:.3f}"


def _num(x: Any, fmt: str = "{:.2f}") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


# ------------------------------------------------------------------------------------------------- plots


def plot_confusion(summary: dict[str, Any]) -> Figure:
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


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ text


def _arm_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    conf = round(100 * (1 - summary["alpha"]))
    head = [
        "arm",
        "model",
        "accuracy",
        f"{conf}% Wilson CI",
        "ECE",
        "conf. std",
        "p50 ms",
        "p99 ms",
        "img/s",
        "peak mem MB",
        "device",
        "preprocess",
    ]
    rows = []
    for a in summary["arms"]:
        t = a["telemetry"]
        mem = t.get("gpu_mem_peak_mb", t.get("cpu_rss_peak_mb"))
        rows.append(
            [
                a["name"],
                a["spec"],
                _pct(a["accuracy"]),
                f"{_pct(a['acc_low'])} to {_pct(a['acc_high'])}",
                _num(a["ece"], "{:.3f}"),
                _num(a["confidence_std"], "{:.3f}"),
                _num(t.get("latency_ms_p50")),
                _num(t.get("latency_ms_p99")),
                _num(t.get("throughput_img_per_s"), "{:.0f}"),
                _num(mem, "{:.0f}"),
                a["device"],
                a["preprocess"],
            ]
        )
    return head, rows


def _pair_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = [
        "comparison",
        "diff (points)",
        "95% bootstrap CI",
        "only A right (b)",
        "only B right (c)",
        f"McNemar {summary['mcnemar_method']} p",
        "Holm p",
        "MDE (points)",
        "verdict",
    ]
    rows = [
        [
            f"{p['b']} vs {p['a']}",
            _pts(p["acc_diff"]),
            f"{_pts(p['ci_low'])} to {_pts(p['ci_high'])}",
            str(p["mcnemar_b"]),
            str(p["mcnemar_c"]),
            _p(p["mcnemar_pvalue"]),
            _p(p["pvalue_holm"]),
            _num(100 * p["mde"] if p["mde"] == p["mde"] else None),
            p["verdict"],
        ]
        for p in summary["pairs"]
    ]
    return head, rows


def _pairwise_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["pair", "only first right", "only second right", "McNemar p", "Holm p"]
    rows = [
        [f"{p['a']} vs {p['b']}", str(p["b_count"]), str(p["c_count"]), _p(p["pvalue"]), _p(p["pvalue_holm"])]
        for p in summary.get("pairwise", [])
    ]
    return head, rows


def _flip_table(pair: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Classes where the arms disagree, with per-class exact McNemar p-values, Holm-corrected over classes."""
    head = ["class", "n", f"only {pair['a']} right", f"only {pair['b']} right", "p", "Holm p"]
    rows = [
        [str(c["label"]), str(c["n"]), str(c["only_a"]), str(c["only_b"]), _p(c["pvalue"]), _p(c["pvalue_adjusted"])]
        for c in pair["per_class"]
        if c["only_a"] + c["only_b"] > 0
    ]
    return head, rows


def _notes(summary: dict[str, Any]) -> list[str]:
    notes = []
    if summary["preprocess_differs"]:
        pre = "; ".join(f"{a['name']}: {a['preprocess']}" for a in summary["arms"])
        notes.append(f"The arms' preprocessing differs (each model's native pipeline): {pre}.")
    else:
        notes.append(f"Every arm used the same preprocessing ({summary['arms'][0]['preprocess']}).")
    if summary["precision_differs"]:
        notes.append("The arms ran at different numeric precisions.")
    reused = [a for a in summary["arms"] if a.get("reused_from")]
    for a in reused:
        notes.append(f"Arm {a['name']} reused the predictions of run {a['reused_from']}.")
    batch = {a["batch_size"] for a in summary["arms"]}
    if len(batch) > 1:
        notes.append(
            f"The arms ended with different batch sizes ({', '.join(sorted(batch))}) after out-of-memory "
            "retries: latencies are per batch of different sizes."
        )
    lat = summary["latency"]
    notes.append(f"Placement: {lat['placement'] or 'n/a'}. Latency: {lat['note']}.")
    return notes


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _power_lines(summary: dict[str, Any]) -> list[str]:
    """What this test set could have detected: the minimum detectable effect of each comparison."""
    lines = []
    for p in summary["pairs"]:
        if p["mde"] == p["mde"]:  # not nan
            lines.append(
                f"{p['b']} vs {p['a']}: with {summary['n']:,} test images and {100 * p['p_discordant']:.1f}% "
                f"discordant pairs, a true difference of {100 * p['mde']:.2f} points would be detected with 80% "
                f"power at alpha = {summary['alpha']} (McNemar exact); smaller differences may go unseen."
            )
    return lines


def _latency_line(summary: dict[str, Any]) -> str | None:
    paired = summary["latency"].get("paired")
    if not paired:
        return None
    a, b = summary["arms"][0]["name"], summary["arms"][1]["name"]
    return (
        f"Paired batch latency {b} - {a}: {paired['estimate_ms']:+.2f} ms "
        f"({100 * paired['confidence']:g}% CI {paired['low_ms']:+.2f} to {paired['high_ms']:+.2f}) "
        f"over {paired['n_batches']} batches measured by both arms."
    )


STYLE = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#1b1f24;max-width:1200px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.verdict{font-size:18px;padding:12px 16px;background:#eef6ee;border-left:5px solid #2e7d32;margin:12px 0}
.verdict.none{background:#f4f4f4;border-color:#888}
.note{background:#fff8e1;border-left:4px solid #f9a825;padding:6px 10px;margin:4px 0}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
th{background:#f6f8fa}img{max-width:100%;margin:6px 0}code{background:#f6f8fa;padding:1px 4px}"""


def render(
    summary: dict[str, Any], out_dir: Path, gallery: Callable[[list[int]], list[np.ndarray]] | None = None
) -> dict[str, Path]:
    """Write report.md, report.html and the PNGs into out_dir; return the paths by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Figure | None] = {
        "confusion_matrices": plot_confusion(summary),
        "per_class_accuracy": plot_per_class(summary),
        "latency": plot_latency(summary),
        "calibration": plot_calibration(summary),
    }
    for pair in summary["pairs"]:
        suffix = "" if len(summary["pairs"]) == 1 else f"_{pair['key']}"
        figures[f"flips{suffix}"] = plot_flips(pair)
        if gallery is not None:
            figures[f"flip_gallery{suffix}"] = plot_gallery(
                pair, gallery(pair["flips_only_a"]), gallery(pair["flips_only_b"])
            )
    pngs = {name: _png(fig) for name, fig in figures.items() if fig is not None}
    paths = {}
    for name, data in pngs.items():
        paths[name] = out_dir / f"{name}.png"
        paths[name].write_bytes(data)

    arm_head, arm_rows = _arm_table(summary)
    pair_head, pair_rows = _pair_table(summary)
    notes = _notes(summary)
    latency_line = _latency_line(summary)
    power = _power_lines(summary)
    title = "ablab comparison: " + " vs ".join(a["name"] + f" ({a['spec']})" for a in summary["arms"])
    facts = (
        f"Dataset `{summary['dataset']}` ({summary['n']:,} test images, {summary['num_classes']} classes, "
        f"fingerprint `{summary['fingerprint']}`). Rule: {summary['rule']}"
        + (f" at margin {100 * summary['margin']:g} points" if summary["margin"] else "")
        + f", alpha = {summary['alpha']}."
    )
    cochran = summary.get("cochran")

    md = [f"# {title}", "", f"**{summary['sentence']}**", "", facts, ""]
    md += [f"> {n}" for n in notes] + [
        "",
        "## Arms",
        _md_table(arm_head, arm_rows),
        "",
        "## Comparisons",
        _md_table(pair_head, pair_rows),
        "",
    ]
    if cochran:
        md += ["All pairs (Holm-corrected):", _md_table(*_pairwise_table(summary)), ""]
        md += [f"Cochran's Q = {cochran['statistic']:.2f} (df {cochran['df']}), p = {_p(cochran['pvalue'])}.", ""]
    md += [*power, ""] if power else []
    if latency_line:
        md += [latency_line, ""]
    for pair in summary["pairs"]:
        md += [f"### Flips per class: {pair['b']} vs {pair['a']}", _md_table(*_flip_table(pair)), ""]
    md += [f"![{name}]({name}.png)" for name in pngs]
    paths["report.md"] = out_dir / "report.md"
    paths["report.md"].write_text("\n".join(md) + "\n")

    def img(name: str) -> str:
        if name not in pngs:
            return ""
        return f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(pngs[name]).decode()}">'

    neutral = " none" if summary["verdict"].startswith(("no_", "non_inferiority_not", "equivalence_not")) else ""
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f'<div class="verdict{neutral}">{html.escape(summary["sentence"])}</div>',
        f"<p>{html.escape(facts).replace('`', '')}</p>",
    ]
    body += [f'<div class="note">{html.escape(n)}</div>' for n in notes]
    body += [
        "<h2>Arms</h2>",
        _html_table(arm_head, arm_rows),
        "<h2>Comparisons</h2>",
        _html_table(pair_head, pair_rows),
    ]
    if cochran:
        body.append(
            f"<p>Cochran's Q = {cochran['statistic']:.2f} (df {cochran['df']}), p = {_p(cochran['pvalue'])}."
            " Pairwise p-values are Holm-corrected.</p>"
        )
        body.append(_html_table(*_pairwise_table(summary)))
    body += [f"<p>{html.escape(line)}</p>" for line in power]
    body.append("<h2>Flips</h2>")
    for pair in summary["pairs"]:
        body += [
            f"<h3>{html.escape(pair['b'])} vs {html.escape(pair['a'])}: classes with flips</h3>",
            _html_table(*_flip_table(pair)),
        ]
    body += [img(n) for n in pngs if n.startswith(("flips", "flip_gallery"))]
    body += [
        "<h2>Per-class accuracy</h2>",
        img("per_class_accuracy"),
        "<h2>Confusion matrices</h2>",
        img("confusion_matrices"),
        "<h2>Calibration</h2>",
        img("calibration"),
        "<h2>Latency</h2>",
    ]
    body += [f"<p>{html.escape(latency_line)}</p>" if latency_line else "", img("latency")]
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>"
    )
    paths["report.html"] = out_dir / "report.html"
    paths["report.html"].write_text(page)
    return paths
