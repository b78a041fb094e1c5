"""The layout of a comparison report: its tables, report.md, and a self-contained report.html with the figures
(lab.plots) embedded as base64 PNGs, so that it renders on its own in the MLflow UI's artifact view; beside them
the full per-class, confusion and flip tables as Parquet (the report shows at most 50 classes).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lab import plots
from lab.report.notes import bayes_lines, group_lines, latency_lines, notes, power_lines, rule_line
from lab.report.words import (
    INTERVAL_NAMES,
    METRIC_NAMES,
    NEUTRAL,
    describe,
    fixed,
    format_p,
    level,
    pct,
    probability,
    pts,
    pvalue_text,
)

STYLE = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#1b1f24;max-width:1200px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.verdict{font-size:18px;padding:12px 16px;background:#eef6ee;border-left:5px solid #2e7d32;margin:12px 0}
.verdict.none{background:#f4f4f4;border-color:#888}
.note{background:#fff8e1;border-left:4px solid #f9a825;padding:6px 10px;margin:4px 0}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
th{background:#f6f8fa}img{max-width:100%;margin:6px 0}code{background:#f6f8fa;padding:1px 4px}"""

# ------------------------------------------------------------------------------------------------ tables


def arm_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    metric = summary.get("metric", "accuracy")
    extra = [] if metric == "accuracy" else [METRIC_NAMES[metric]]
    head = ["arm", "model", "accuracy", f"{level(1 - summary['alpha'])} Wilson CI", *extra, "ECE", "conf. std"]
    head += ["p50 ms", "p99 ms", "img/s", "peak mem MB", "device", "preprocess"]
    rows = []
    for a in summary["arms"]:
        t = a["telemetry"]
        mem = t.get("gpu_mem_peak_mb", t.get("cpu_rss_peak_mb"))
        value = [pct(a["metrics"][metric])] if extra else []
        rows.append([a["name"], a["spec"], pct(a["accuracy"]), f"{pct(a['acc_low'])} to {pct(a['acc_high'])}", *value,
                     fixed(a["ece"], 3), fixed(a["confidence_std"], 3), fixed(t.get("latency_ms_p50")),
                     fixed(t.get("latency_ms_p99")), fixed(t.get("throughput_img_per_s"), 0), fixed(mem, 0),
                     a["device"], a["preprocess"]])  # fmt: skip
    return head, rows


def pair_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Each arm against the baseline: the metric difference with the interval the rule used, McNemar, Bayes."""
    first, alpha = summary["pairs"][0], summary["alpha"]
    name = METRIC_NAMES[summary.get("metric", "accuracy")]
    method = INTERVAL_NAMES.get(first.get("decision_method"), "")
    head = ["comparison", f"{name} diff (points)", f"{level(first['decision_confidence'])} {method} interval (rule)"]
    head += ["only A right (b)", "only B right (c)", f"McNemar {summary['mcnemar_method']} p", "Holm p"]
    head += ["P(B better) (Bayes)", *(["design effect"] if summary.get("groups") else []), "MDE (points)", "verdict"]
    rows = [
        [f"{p['b']} vs {p['a']}", pts(p.get("metric_diff", p["acc_diff"])),
         f"{pts(p['decision_low'])} to {pts(p['decision_high'])}", str(p["mcnemar_b"]), str(p["mcnemar_c"]),
         pvalue_text(p["mcnemar_pvalue"], alpha), pvalue_text(p["pvalue_holm"], alpha),
         probability(p["bayes"]["prob_b_better"]), *([fixed(p["design_effect"])] if summary.get("groups") else []),
         fixed(100 * p["mde"]), p["verdict"]]
        for p in summary["pairs"]
    ]  # fmt: skip
    return head, rows


def pairwise_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    alpha = summary["alpha"]
    head = ["pair", "only first right", "only second right", "McNemar p", "Holm p", "verdict"]
    rows = [
        [f"{p['a']} vs {p['b']}", str(p["b_count"]), str(p["c_count"]), pvalue_text(p["pvalue"], alpha),
         pvalue_text(p["pvalue_holm"], alpha), p.get("verdict", "")]
        for p in summary.get("pairwise", [])
    ]  # fmt: skip
    return head, rows


def flip_table(pair: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Classes where the arms disagree, with per-class exact McNemar p-values, Holm-corrected over classes."""
    head = ["class", "n", f"only {pair['a']} right", f"only {pair['b']} right", "p", "Holm p"]
    rows = [
        [str(c["label"]), str(c["n"]), str(c["only_a"]), str(c["only_b"]), pvalue_text(c["pvalue"]),
         pvalue_text(c["pvalue_adjusted"])]
        for c in pair["per_class"]
        if c["only_a"] + c["only_b"] > 0
    ]  # fmt: skip
    return head, rows


def md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


# ----------------------------------------------------------------------------------------------- the page


def figures(summary: dict[str, Any], gallery: Callable[[list[int]], list[np.ndarray]] | None) -> dict[str, bytes]:
    """Every figure of the report as PNG bytes, by name (figures with nothing to draw are left out)."""
    drawn: dict[str, plots.Figure | None] = {
        "forest": plots.plot_forest(summary),
        "confusion_matrices": plots.plot_confusion(summary),
        "per_class_accuracy": plots.plot_per_class(summary),
        "latency": plots.plot_latency(summary),
        "calibration": plots.plot_calibration(summary),
    }
    for pair in summary["pairs"]:
        suffix = "" if len(summary["pairs"]) == 1 else f"_{pair['key']}"
        drawn[f"flips{suffix}"] = plots.plot_flips(pair)
        if gallery is not None:
            drawn[f"flip_gallery{suffix}"] = plots.plot_gallery(
                pair, gallery(pair["flips_only_a"]), gallery(pair["flips_only_b"])
            )
    return {name: plots.to_png(fig) for name, fig in drawn.items() if fig is not None}


def title(summary: dict[str, Any]) -> str:
    return "ablab comparison: " + " vs ".join(a["name"] + f" ({a['spec']})" for a in summary["arms"])


def facts(summary: dict[str, Any]) -> str:
    metric = summary.get("metric", "accuracy")
    return (
        f"Dataset `{summary['dataset']}` ({summary['n']:,} test images, {summary['num_classes']} classes, "
        f"fingerprint `{summary['fingerprint']}`). Rule: {summary['rule']}"
        + (f" at margin {100 * summary['margin']:g} points" if summary["margin"] else "")
        + f", alpha = {summary['alpha']:g}; the metric that decided: {METRIC_NAMES[metric]}."
    )


def classes_line(summary: dict[str, Any]) -> str | None:
    """Where the report shows a subset of the classes: which, and where every class is; else None."""
    shown, k = len(summary.get("classes_shown") or ()), summary["num_classes"]
    if not shown or shown >= k:
        return None
    return (f"Per-class tables and figures show {shown} of the {k:,} classes: those whose accuracy changed most "
            "between the arms, then the worst. Every class is in per_class.parquet, every confusion cell in "
            "confusion.parquet and every flipped sample in flips.parquet (this report's folder).")


def cochran_line(summary: dict[str, Any]) -> str:
    q = summary["cochran"]
    return f"Cochran's Q (accuracy, all arms) = {q['statistic']:.2f} (df {q['df']}), {format_p(q['pvalue'])}."


def explained(summary: dict[str, Any]) -> list[str]:
    """The paragraphs below the tables: power, groups, latency."""
    return [*power_lines(summary), *group_lines(summary), *latency_lines(summary)]


def markdown(summary: dict[str, Any], figure_names: list[str]) -> str:
    """report.md: the verdict, the rule, facts, notes, tables and links to the PNGs named."""
    md = [f"# {title(summary)}", "", f"**{summary['sentence']}**", "", rule_line(summary), ""]
    md += [*(f"{line}\n" for line in bayes_lines(summary)), facts(summary), ""]
    md += [f"> {n}" for n in notes(summary)]
    md += ["", "## Arms", md_table(*arm_table(summary)), "", "## Comparisons", md_table(*pair_table(summary)), ""]
    if summary.get("cochran"):
        md += ["All pairs (Holm-corrected):", md_table(*pairwise_table(summary)), "", cochran_line(summary), ""]
    for line in explained(summary):
        md += [line, ""]
    if classes_line(summary):
        md += [classes_line(summary), ""]
    for pair in summary["pairs"]:
        md += [f"### Flips per class: {pair['b']} vs {pair['a']}", md_table(*flip_table(pair)), ""]
    md += [f"![{name}]({name}.png)" for name in figure_names]
    return "\n".join(md) + "\n"


def page(summary: dict[str, Any], pngs: dict[str, bytes]) -> str:
    """report.html: self-contained, the figures inlined as base64 PNGs."""

    def img(name: str) -> str:
        if name not in pngs:
            return ""
        return f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(pngs[name]).decode()}">'

    neutral = " none" if summary["verdict"].startswith(NEUTRAL) or summary["verdict"].endswith("_not_shown") else ""
    body = [
        f"<h1>{html.escape(title(summary))}</h1>",
        f'<div class="verdict{neutral}">{html.escape(summary["sentence"])}</div>',
        f"<p>{html.escape(rule_line(summary))}</p>",
        *(f"<p>{html.escape(line)}</p>" for line in bayes_lines(summary)),
        f"<p>{html.escape(facts(summary)).replace('`', '')}</p>",
    ]
    body += [f'<div class="note">{html.escape(n)}</div>' for n in notes(summary)]
    body += ["<h2>Arms</h2>", html_table(*arm_table(summary))]
    body += ["<h2>Comparisons</h2>", html_table(*pair_table(summary)), img("forest")]
    if summary.get("cochran"):
        body.append(f"<p>{html.escape(cochran_line(summary))} Pairwise p-values are Holm-corrected.</p>")
        body.append(html_table(*pairwise_table(summary)))
    body += [f"<p>{html.escape(line)}</p>" for line in [*power_lines(summary), *group_lines(summary)]]
    body.append("<h2>Flips</h2>")
    if classes_line(summary):
        body.append(f"<p>{html.escape(classes_line(summary))}</p>")
    for pair in summary["pairs"]:
        body += [
            f"<h3>{html.escape(pair['b'])} vs {html.escape(pair['a'])}: classes with flips</h3>",
            html_table(*flip_table(pair)),
        ]
    body += [img(n) for n in pngs if n.startswith(("flips", "flip_gallery"))]
    for heading, name in [
        ("Per-class accuracy", "per_class_accuracy"),
        ("Confusion matrices", "confusion_matrices"),
        ("Calibration", "calibration"),
    ]:
        body += [f"<h2>{heading}</h2>", img(name)]
    body += ["<h2>Latency</h2>", *(f"<p>{html.escape(line)}</p>" for line in latency_lines(summary)), img("latency")]
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title(summary))}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>"
    )


def render(
    summary: dict[str, Any], out_dir: Path, gallery: Callable[[list[int]], list[np.ndarray]] | None = None
) -> dict[str, Path]:
    """Write report.md, report.html and the PNGs into out_dir; return the paths by name.

    A summary without sentences is described first (in place); `gallery(ids)` gives the pixels of test samples.
    The summary's full tables (`lab.compare.Summary.tables`), where it has them, are written as <name>.parquet.
    """
    if "sentence" not in summary:
        describe(summary)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = figures(summary, gallery)
    paths = {}
    for name, data in pngs.items():
        paths[name] = out_dir / f"{name}.png"
        paths[name].write_bytes(data)
    paths["report.md"] = out_dir / "report.md"
    paths["report.md"].write_text(markdown(summary, list(pngs)))
    paths["report.html"] = out_dir / "report.html"
    paths["report.html"].write_text(page(summary, pngs))
    for name, frame in getattr(summary, "tables", {}).items():
        paths[f"{name}.parquet"] = out_dir / f"{name}.parquet"
        frame.to_parquet(paths[f"{name}.parquet"], index=False)
    return paths
