"""lab/report: the verdict sentences word the decision with the interval the rule used and its method, numbers never
mislead (p-values on the right side of alpha, enough digits in a level, no "-0.00"), describe keeps summary.json's
key order, and render writes a self-contained report with the rule, the Bayesian reading, power and latency.

Run with ``python -m pytest tests/test_report.py -q``.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from test_compare import make_arms
from test_stats_mcnemar import pairs

from lab import report, stats
from lab.compare import analyse
from lab.config import build_config


def two_arm_summary(counts: tuple[int, int, int, int], **kwargs: Any) -> dict[str, Any]:
    """The fields a sentence reads, from stats.decide on arms named "resnet (a)" and "vit" (its spec is its name)."""
    a, b = pairs(*counts)
    method = kwargs.get("method", "exact")
    d = stats.decide(a, b, **kwargs)
    bayes = stats.decide(a, b, "bayes", d.margin, d.alpha)
    pair = {"a": "a", "b": "vit", "acc_diff": d.estimate, "metric_diff": d.estimate,
            "mcnemar_pvalue": stats.mcnemar(a, b, method).pvalue, "mcnemar_method": method, "verdict": d.verdict,
            "decision_low": d.low, "decision_high": d.high, "decision_confidence": d.confidence,
            "decision_method": d.method, "decision_pvalue": d.pvalue, "comparisons": 1,
            "bayes": dict(zip(("prob_a_better", "prob_within", "prob_b_better"), bayes.probabilities, strict=True))
            | {"margin": d.margin}}  # fmt: skip
    arms = [{"name": "a", "spec": "resnet"}, {"name": "vit", "spec": "vit"}]
    return {"n": d.n, "rule": d.rule, "margin": d.margin, "alpha": d.alpha, "metric": "accuracy", "groups": None,
            "arms": arms, "pairs": [pair], "verdict": d.verdict}  # fmt: skip


SENTENCES = [
    ((100, 190, 7500, 2210), {},
     "vit is better than resnet (a) by 0.9 points (95% Tango score CI 0.6 to 1.2), McNemar exact p < 0.001, "
     "10,000 test images."),
    ((190, 100, 7500, 2210), {},
     "resnet (a) is better than vit by 0.9 points (95% Tango score CI 0.6 to 1.2), McNemar exact p < 0.001, "
     "10,000 test images."),
    ((100, 110, 7500, 2290), {},
     "No significant difference between resnet (a) and vit: vit - resnet (a) = 0.1 points (95% Tango score CI -0.2 "
     "to 0.4), McNemar exact p = 0.53, 10,000 test images."),
    ((110, 100, 7500, 2290), {"rule": "non_inferiority", "margin": 0.005},
     "vit is non-inferior to resnet (a) at a margin of 0.5 points: vit - resnet (a) = -0.10 points (90% Tango score "
     "CI -0.34 to 0.14), 10,000 test images."),
    ((110, 100, 7500, 2290), {"rule": "non_inferiority", "margin": 0.001},
     "Non-inferiority of vit at a margin of 0.1 points not shown: vit - resnet (a) = -0.10 points (90% Tango score CI "
     "-0.34 to 0.14), 10,000 test images."),
    ((105, 105, 7500, 2290), {"rule": "equivalence", "margin": 0.005},
     "resnet (a) and vit are equivalent within ±0.5 points: vit - resnet (a) = 0.00 points (90% Tango score CI -0.24 "
     "to 0.24), 10,000 test images."),
    ((100, 160, 7500, 2240), {"rule": "equivalence", "margin": 0.005},
     "Equivalence within ±0.5 points not shown: vit - resnet (a) = 0.6 points (90% Tango score CI 0.3 to 0.9), "
     "10,000 test images."),
    ((0, 4, 46, 0), {},  # the contradiction: the exact test keeps the null, the interval excludes 0
     "No verdict between resnet (a) and vit: vit - resnet (a) = 8.0 points (95% Tango score CI 0.3 to 18.8), McNemar "
     "exact p = 0.12, 50 test images; the interval and the test disagree, and a verdict needs both."),
    ((0, 0, 200, 0), {"rule": "equivalence", "margin": 0.005},
     "Equivalence within ±0.5 points not shown: vit - resnet (a) = 0.0 points (90% Tango score CI -1.3 to 1.3), "
     "200 test images."),
    ((100, 190, 7500, 2210), {"rule": "bayes"},
     "vit is better than resnet (a) with posterior probability > 99.9%: vit - resnet (a) = 0.9 points (90% credible "
     "interval 0.6 to 1.2), 10,000 test images."),
    ((105, 105, 7500, 2290), {"rule": "bayes", "margin": 0.005},
     "resnet (a) and vit are practically equivalent (within ±0.5 points) with posterior probability > 99.9%: vit - "
     "resnet (a) = 0.00 points (90% credible interval -0.24 to 0.24), 10,000 test images."),
    ((8, 12, 150, 30), {"rule": "bayes", "margin": 0.005},
     "No verdict between resnet (a) and vit: no region holds 95.0% of the posterior (P(vit better by more than 0.5 "
     "points) = 74.2%, P(within ±0.5) = 12.1%, P(a better by more than 0.5) = 13.7%); vit - resnet (a) = 2.0 points "
     "(90% credible interval -1.8 to 5.8), 200 test images."),
]  # fmt: skip


@pytest.mark.parametrize(("counts", "kwargs", "sentence"), SENTENCES)
def test_verdict_sentence_words_the_decision(counts: tuple, kwargs: dict, sentence: str) -> None:
    summary = two_arm_summary(counts, **kwargs)
    assert report.verdict_sentence(summary, summary["pairs"][0]) == sentence
    assert report.overall_sentence(summary) == sentence


def test_p_values_stay_on_their_side_of_alpha_and_never_read_p_equals_less_than() -> None:
    assert [report.format_p(p) for p in (0.0004, 0.001, 0.0123, 0.5, 1.0)] == [
        "p < 0.001", "p = 0.001", "p = 0.012", "p = 0.5", "p = 1"]  # fmt: skip
    assert report.format_p(0.0498, 0.05) == "p = 0.0498"  # two digits would round it onto alpha
    assert report.format_p(0.04999, 0.05) == "p = 0.04999"
    assert report.format_p(0.0502, 0.05) == "p = 0.05"  # still not below alpha: two digits are honest here
    assert report.format_p(8.41e-46, 0.05) == "p < 0.001"  # no "8.41e-46"
    assert report.format_p(0.0004, 0.0005) == "p = 0.0004" and report.format_p(1e-7, 0.0005) == "p < 0.00005"
    assert report.pvalue_text(0.0004) == "< 0.001" and report.pvalue_text(None) == "n/a"


def test_levels_have_the_digits_they_need_and_zero_has_no_sign() -> None:
    assert [report.level(c) for c in (0.95, 0.9, 0.995, 1 - 0.05 / 3, 0.9999)] == [
        "95%", "90%", "99.5%", "98.33%", "99.99%"]  # fmt: skip
    assert report.fixed(-0.0001) == "0.00" and report.fixed(-0.0001, sign=True) == "+0.00"
    assert report.fixed(-0.004, 2) == "0.00" and report.fixed(float("nan")) == "n/a"


def test_wilson_header_uses_the_real_confidence(tmp_path: Path) -> None:
    summary = analyse(build_config({"n_resamples": 200, "alpha": 0.005}), make_arms([0.7, 0.8]))
    md = report.render(summary, tmp_path)["report.md"].read_text()
    assert "| 99.5% Wilson CI |" in md and "100% Wilson" not in md
    assert "p = <" not in md and "e-" not in md.split("## Arms")[0] and "-0.00" not in md


def test_describe_adds_sentences_in_place_after_the_verdict() -> None:
    summary = analyse(build_config({"n_resamples": 500}), make_arms([0.7, 0.8]))
    keys, pair_keys = list(summary), list(summary["pairs"][0])
    assert report.describe(summary) is summary
    pair = summary["pairs"][0]
    cut = pair_keys.index("verdict") + 1
    assert list(pair) == [*pair_keys[:cut], "sentence", *pair_keys[cut:]]
    assert list(summary) == [*keys, "sentence"] and keys[-1] == "verdict"
    assert summary["sentence"] == pair["sentence"]
    assert summary["sentence"].startswith("model1 (m1) is better than model0 (m0) by ")
    before = json.dumps(summary, default=float)
    assert json.dumps(report.describe(summary), default=float) == before  # describing twice changes nothing


@pytest.mark.parametrize(("overrides", "accuracies", "pattern"), [
    ({}, [0.70, 0.72, 0.85],
     r"^m2 is the best arm on accuracy \(\d+\.\d\d%\), better than every other \(simultaneous 98\.33% intervals, "
     r"Holm-adjusted McNemar\); Cochran's Q \(accuracy\) p < 0\.001, 600 test images\.$"),
    ({}, [0.70, 0.70, 0.70],
     r"^No significant difference among the 3 arms on accuracy \(simultaneous 98\.33% intervals, Holm-adjusted "
     r"McNemar\); Cochran's Q \(accuracy\) p = 0\.\d+, 600 test images\.$"),
    ({}, [0.70, 0.80, 0.80],
     r"^The arms differ on accuracy \(m\d beats m0; m\d beats m0\) but no single arm beats all others "
     r"\(simultaneous 98\.33% intervals, Holm-adjusted McNemar\); m\d has the highest value \(\d+\.\d\d%\); "
     r"Cochran's Q \(accuracy\) p < 0\.001\.$"),
    ({"rule": "non_inferiority", "margin": 0.05}, [0.70, 0.70, 0.55],
     r"^m1 is non-inferior to m0 on accuracy at a margin of 5 points \(simultaneous 95% intervals\), 600 test "
     r"images; not shown for m2\.$"),
    ({"rule": "equivalence", "margin": 0.2}, [0.70, 0.70, 0.72],
     r"^Every arm is equivalent to m0 on accuracy at a margin of 20 points \(simultaneous 95% intervals\)"),
])  # fmt: skip
def test_overall_sentence_for_several_arms(overrides: dict, accuracies: list[float], pattern: str) -> None:
    cfg = build_config({"arms": ["model0", "model1", "model2"], "n_resamples": 300} | overrides)
    summary = report.describe(analyse(cfg, make_arms(accuracies)))
    assert re.match(pattern, summary["sentence"]), summary["sentence"]
    assert all(p["sentence"] for p in summary["pairs"]) and "e-" not in summary["sentence"]


def test_report_renders_self_contained_with_the_verdict_and_its_rule_first(tmp_path: Path) -> None:
    arms = make_arms([0.7, 0.8], **{"ab.preprocess": "size=224"})
    summary = analyse(build_config({"n_resamples": 1000}), arms)
    paths = report.render(summary, tmp_path, gallery=lambda ids: [np.zeros((8, 8, 3), np.uint8)] * min(len(ids), 3))
    assert "sentence" in summary  # render describes a summary that has no sentences yet
    page = paths["report.html"].read_text()
    assert page.index(html.escape(summary["sentence"])) < page.index("Decision rule: B is better than A only when "
                                                                     "the 95% Tango score interval")
    assert page.index("preprocessing differs") < page.index("<h2>Arms</h2>") < page.index('alt="forest"')
    assert 'src="http' not in page and page.count("data:image/png;base64,") >= 7  # self-contained
    md = paths["report.md"].read_text()
    assert md.splitlines()[2] == f"**{summary['sentence']}**"
    assert md.splitlines()[4] == ("Decision rule: B is better than A only when the 95% Tango score interval for "
                                  "accuracy(B) - accuracy(A) lies above 0 and McNemar's exact test rejects at "
                                  "alpha = 0.05 (A better: below 0); when the two disagree there is no verdict "
                                  "(inconclusive).")  # fmt: skip
    assert md.index("preprocessing differs") < md.index("## Arms") and "m1: size=224" in md
    assert "| 95% Tango score interval (rule) |" in md and "the metric that decided: accuracy" in md
    assert (tmp_path / "flip_gallery.png").stat().st_size > 0 and (tmp_path / "forest.png").stat().st_size > 0
    assert {p.name for p in tmp_path.iterdir()} == {path.name for path in paths.values()}


def test_power_line_gives_the_mde_and_the_planning_power(tmp_path: Path) -> None:
    summary = analyse(build_config({"n_resamples": 300}), make_arms([0.7, 0.75]))
    pair = summary["pairs"][0]
    md = report.render(summary, tmp_path)["report.md"].read_text()
    achieved = stats.achieved_power(summary["n"], pair["p_discordant"], pair["acc_diff"], alpha=summary["alpha"])
    line = next(line for line in md.splitlines() if line.startswith("m1 vs m0: with 600 test images"))
    assert f"a true accuracy difference of {100 * pair['mde']:.2f} points would be detected with 80% power" in line
    assert line.endswith(f"observed difference of {100 * pair['acc_diff']:+.2f} points: {100 * achieved:.0f}%.")


def test_margin_not_shown_names_the_mde_and_the_smallest_margin(tmp_path: Path) -> None:
    cfg = build_config({"rule": "non_inferiority", "margin": 0.005, "n_resamples": 300})
    summary = analyse(cfg, make_arms([0.8, 0.8], n=400, seed=2))
    pair = summary["pairs"][0]
    assert pair["verdict"] == "non_inferiority_not_shown"
    md = report.render(summary, tmp_path)["report.md"].read_text()
    assert f"a true accuracy difference of {100 * pair['mde']:.2f} points would be detected" in md
    assert (f"m1 vs m0: not shown at 0.5 points; this data supports the claim only at a margin wider than "
            f"{100 * pair['smallest_margin']:.2f} points.") in md  # fmt: skip


def test_bayesian_reading_beside_the_verdict(tmp_path: Path) -> None:
    md = report.render(analyse(build_config({"n_resamples": 300}), make_arms([0.7, 0.75])), tmp_path)["report.md"]
    line = next(x for x in md.read_text().splitlines() if x.startswith("Bayesian reading of m1 vs m0"))
    assert re.fullmatch(r"Bayesian reading of m1 vs m0 \(accuracy; Dirichlet posterior, uniform prior\): P\(m1 "
                        r"better\) (= \d+\.\d%|> 99\.9%), P\(m0 better\) (= \d+\.\d%|< 0\.1%); shown, not used for "
                        r"the verdict\.", line), line  # fmt: skip
    bayes = analyse(build_config({"rule": "bayes", "margin": 0.01, "n_resamples": 300}), make_arms([0.7, 0.75]))
    md = report.render(bayes, tmp_path)["report.md"].read_text()
    assert "P(within ±1) = " in md and "it decides the verdict (rule=bayes)" in md and "Decision rule (bayes)" in md


def test_latency_lines_give_percentile_intervals_and_the_paired_difference(tmp_path: Path) -> None:
    summary = analyse(build_config({"n_resamples": 300}), make_arms([0.7, 0.75]))
    md = report.render(summary, tmp_path)["report.md"].read_text()
    assert re.search(r"^Batch latency \(95% bootstrap CI over batches, warm-up excluded\): m0 p50 \d+\.\d\d ms "
                     r"\(\d+\.\d\d to \d+\.\d\d\); m0 p99 ", md, re.MULTILINE)  # fmt: skip
    assert re.search(r"^Paired batch latency m1 - m0: mean \+\d\.\d\d ms \(95% CI [+-]\d\.\d\d to [+-]\d\.\d\d\), "
                     r"p50 [+-]\d\.\d\d ms \(.*\), p99 .* over 10 batches measured by both arms\.$", md, re.MULTILINE)


def test_abn_report_has_a_flips_section_per_pair_and_the_cochran_line(tmp_path: Path) -> None:
    cfg = build_config({"arms": ["model0", "model1", "model2"], "n_resamples": 300})
    summary = analyse(cfg, make_arms([0.70, 0.72, 0.85]))
    paths = report.render(summary, tmp_path)
    md = paths["report.md"].read_text()
    assert "### Flips per class: m1 vs m0" in md and "### Flips per class: m2 vs m0" in md
    assert re.search(r"^Cochran's Q \(accuracy, all arms\) = \d+\.\d\d \(df 2\), p < 0\.001\.$", md, re.MULTILINE)
    assert "| 98.33% Tango score interval (rule) |" in md and "every McNemar p-value Holm-adjusted" in md
    assert {"flips_m1_vs_m0", "flips_m2_vs_m0", "forest"} <= set(paths) and "flip_gallery" not in paths
    assert "Pairwise p-values are Holm-corrected." in paths["report.html"].read_text()


# --------------------------------------------------------------------------- grouped images, end to end


def grouped_folder(root: Path, duplicates: bool, groups: int = 30, size: int = 6, seed: int = 0) -> None:
    """<class>/<group>/<i>.png: 8x8 grey images whose brightness and left-right ramp are set per group
    (near-duplicates, `duplicates=True`) or per image (independent)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(-1, 1, 8)[None, :].repeat(8, 0)
    for cls, centre in (("a", 100), ("b", 140)):
        for g in range(groups):
            (root / cls / f"{cls}{g}").mkdir(parents=True)
            level, tilt = rng.normal(centre, 30), rng.normal(0, 40)
            for i in range(size):
                if not duplicates:
                    level, tilt = rng.normal(centre, 30), rng.normal(0, 40)
                pixels = np.clip(level + tilt * ramp + rng.normal(0, 2, (8, 8)), 0, 255).astype(np.uint8)
                Image.fromarray(np.repeat(pixels[..., None], 3, -1)).save(root / cls / f"{cls}{g}" / f"{i}.png")


def brightness_arms(cfg) -> list:
    """Two threshold classifiers on the test images: mean brightness of the whole image, of its left half."""
    from PIL import Image
    from test_compare import TAGS

    from lab.compare import Arm
    from lab.data import resolve_dataset

    info = resolve_dataset(cfg)
    x = np.stack([np.asarray(Image.open(p))[..., 0] for p in info.test.paths]).astype(float)
    arms = []
    for name, feature in (("whole", x.mean((1, 2))), ("left", x[:, :, :4].mean((1, 2)))):
        frame = pd.DataFrame({"sample_id": info.test.sample_ids, "label": info.test.labels,
                              "pred": (feature > 120).astype(int), "confidence": 0.9})  # fmt: skip
        tags = TAGS | {"ab.num_classes": "2", "ab.dataset_fingerprint": info.fingerprint}
        arms.append(Arm(name, f"{name}-run", name, tags, {}, frame))
    return arms


@pytest.mark.parametrize(("duplicates", "low", "high"), [(True, 2.0, 6.0), (False, 0.6, 1.5)])
def test_design_effect_end_to_end_on_an_image_folder(tmp_path: Path, duplicates: bool, low: float, high: float) -> None:
    from lab import data

    grouped_folder(tmp_path / "imgs", duplicates)
    cfg = build_config({"data": f"imagefolder:{tmp_path / 'imgs'}", "test_fraction": 0.5, "group_by": "subfolder",
                        "n_resamples": 2000})
    summary = analyse(cfg, brightness_arms(cfg), groups=data.test_groups(cfg))
    pair = summary["pairs"][0]
    assert summary["groups"] == {"source": "subfolder", "n_groups": 59}
    assert pair["decision_method"] == "cluster_bootstrap"
    assert low < pair["design_effect"] < high
    md = report.render(summary, tmp_path / "out")["report.md"].read_text()
    assert f"design effect {pair['design_effect']:.2f}: intervals " in md and "in 59 groups" in summary["sentence"]
    assert "cluster bootstrap" in md and "clustered McNemar" in md
