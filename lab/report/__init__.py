"""Words and layout of a comparison: the verdict sentences, and report.md / report.html from a summary.

The summary (lab.compare.analyse) holds numbers and verdict codes; ``describe`` adds the sentences and ``render``
writes the report. ``words``: formatting and sentences; ``notes``: the rule and the explanatory lines;
``layout``: tables, Markdown, HTML and the figures (lab.plots).
"""

from lab.report.layout import STYLE, figures, markdown, page, render
from lab.report.notes import bayes_lines, group_lines, latency_lines, notes, plan_lines, power_lines, rule_line
from lab.report.words import (
    describe,
    fixed,
    format_p,
    level,
    overall_sentence,
    pvalue_text,
    verdict_sentence,
)

__all__ = [
    "STYLE",
    "bayes_lines",
    "describe",
    "figures",
    "fixed",
    "format_p",
    "group_lines",
    "latency_lines",
    "level",
    "markdown",
    "notes",
    "overall_sentence",
    "page",
    "plan_lines",
    "power_lines",
    "pvalue_text",
    "render",
    "rule_line",
    "verdict_sentence",
]
