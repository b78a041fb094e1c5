"""lab/compare on constructed arms: the guard, input checks, the numbers, each decision at its family's level,
A/B/n pair verdicts consistent with the overall verdict (and their any-pair rate under the null), metrics beyond
accuracy and grouped images end to end on digits and a generated image folder.

Run with ``python -m pytest tests/test_compare.py -q``.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from history_fakes import fast_cfg, make_arm, predictions
from statsmodels.stats.contingency_tables import cochrans_q as sm_cochrans_q

from lab import stats
from lab.compare import (
    Aligned,
    Arm,
    ComparisonError,
    analyse,
    check_comparable,
    decide_family,
    overall_verdict,
    parent_metrics,
)
from lab.config import build_config
from lab.report import render

TAGS = {
    "ab.dataset_fingerprint": "sha256:f",
    "ab.num_classes": "3",
    "ab.label_map": "m",
    "ab.device": "cpu:x",
    "ab.placement": "lockstep",
    "ab.preprocess": "size=32",
    "ab.precision": "32",
    "mlflow.parentRunId": "p",
}
LABELS = np.arange(60) % 3


def make_arms(accuracies: list[float], n: int = 600, seed: int = 0, **tag_changes) -> list[Arm]:
    """Arms m0, m1, ... with the given accuracies on one 3-class test set (rows in reverse sample order); the
    last arm gets tag_changes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    arms = []
    for i, acc in enumerate(accuracies):
        right = rng.random(n) < acc
        pred = np.where(right, labels, (labels + 1) % 3)
        frame = pd.DataFrame({"sample_id": np.arange(n)[::-1], "label": labels[::-1], "pred": pred[::-1],
                              "confidence": rng.uniform(0.4, 1.0, n)})  # fmt: skip
        batches = pd.DataFrame({"batch_idx": np.arange(12), "batch_size": 50, "latency_ms": rng.normal(10 + i, 0.5, 12),
                                "warmup": [True] * 2 + [False] * 10})  # fmt: skip
        tags = TAGS | (tag_changes if i == len(accuracies) - 1 else {})
        arms.append(Arm(f"m{i}", f"run{i}", f"model{i}", dict(tags), {"latency_ms_p50": 10.0 + i}, frame, batches))
    return arms


def correct_of(arms: list[Arm]) -> np.ndarray:
    return np.stack([(a.predictions.sort_values("sample_id")["pred"] == a.predictions.sort_values("sample_id")[
        "label"]).to_numpy() for a in arms], axis=1)  # fmt: skip


# --------------------------------------------------------------------------- the numbers


def test_two_arms_metrics_match_the_data() -> None:
    arms = make_arms([0.7, 0.8])
    summary = analyse(build_config({"n_resamples": 2000}), arms)
    correct = correct_of(arms)
    m = parent_metrics(summary)
    assert m["acc_a"] == pytest.approx(correct[:, 0].mean()) and m["acc_b"] == pytest.approx(correct[:, 1].mean())
    b, c = (correct[:, 0] & ~correct[:, 1]).sum(), (~correct[:, 0] & correct[:, 1]).sum()
    assert (m["mcnemar_b"], m["mcnemar_c"]) == (b, c)
    tango = stats.paired_diff_ci(int(b), int(c), 600, 0.95)
    assert (m["acc_diff_ci_low"], m["acc_diff_ci_high"]) == (tango.low, tango.high)  # the interval now reported
    assert (m["decision_ci_low"], m["decision_ci_high"]) == (tango.low, tango.high)
    pair = summary["pairs"][0]
    assert (pair["ci_method"], pair["decision_method"], pair["metric"]) == ("tango", "tango", "accuracy")
    assert summary["verdict"] == "b_better" == pair["verdict"] and pair["decision_pvalue"] == m["mcnemar_pvalue"]
    assert "sentence" not in summary and "sentence" not in pair  # numbers and codes: report words them
    assert 0 < pair["bayes"]["prob_b_better"] <= 1 and m["prob_b_better"] == pair["bayes"]["prob_b_better"]
    assert m["achieved_power"] == pytest.approx(stats.achieved_power(600, pair["p_discordant"], pair["acc_diff"]))
    assert all(np.isfinite(v) for v in m.values())


def test_abn_runs_cochran_and_holm_and_names_pairs() -> None:
    arms = make_arms([0.70, 0.72, 0.85])
    summary = analyse(build_config({"arms": ["model0", "model1", "model2"], "n_resamples": 1000}), arms)
    correct = correct_of(arms)
    assert summary["cochran"]["pvalue"] == pytest.approx(sm_cochrans_q(correct.astype(int)).pvalue)
    m = parent_metrics(summary)
    assert {"acc_diff.m1_vs_m0", "acc_diff.m2_vs_m0", "mcnemar_pvalue_holm.m2_vs_m0", "cochran_q"} <= set(m)
    assert "acc_a" not in m  # the two-arm names are only for two arms
    holm = {(p["a"], p["b"]): p["pvalue_holm"] for p in summary["pairwise"]}
    assert all(holm[k] >= p["pvalue"] for k, p in zip(holm, summary["pairwise"], strict=True))
    assert summary["verdict"] == "m2_best" and summary["comparisons"] == 3
    for j, pair in enumerate(summary["pairs"], start=1):
        # The pair verdict is the family's: Bonferroni-level interval (alpha / 3) and the Holm-adjusted p-value.
        d = stats.decide(correct[:, 0], correct[:, j], comparisons=3, pvalue=holm["m0", f"m{j}"])
        assert (pair["verdict"], pair["decision_low"], pair["decision_high"]) == (d.verdict, d.low, d.high)
        assert pair["pvalue_holm"] == pair["decision_pvalue"] == holm["m0", f"m{j}"]
        assert pair["decision_confidence"] == pytest.approx(1 - 0.05 / 3)


@pytest.mark.parametrize(("overrides", "confidence"), [({"rule": "non_inferiority", "margin": 0.02, "alpha": 0.1}, 0.9),
                                                       ({"rule": "equivalence", "margin": 0.05}, 0.95),
                                                       ({"rule": "bayes", "margin": 0.01}, 1 - 0.1 / 3)])  # fmt: skip
def test_each_rule_decides_the_family_at_its_level(overrides: dict, confidence: float) -> None:
    # Margin rules: each arm against the baseline, Bonferroni over the k - 1 = 2 comparisons. Bayes: every pair.
    cfg = build_config({"arms": ["model0", "model1", "model2"], "n_resamples": 500} | overrides)
    arms = make_arms([0.7, 0.71, 0.8], n=900, seed=4)
    summary = analyse(cfg, arms)
    correct = correct_of(arms)
    m = 3 if cfg.rule == "bayes" else 2
    for j, pair in enumerate(summary["pairs"], start=1):
        d = stats.decide(correct[:, 0], correct[:, j], cfg.rule, cfg.margin, cfg.alpha, comparisons=m)
        assert (pair["verdict"], pair["decision_low"], pair["decision_high"]) == (d.verdict, d.low, d.high)
        assert pair["decision_confidence"] == pytest.approx(confidence)
    assert ("verdict" in summary["pairwise"][2]) == (cfg.rule == "bayes")  # m1 vs m2 is decided only under bayes


def test_non_inferiority_verdict_follows_the_interval() -> None:
    arms = make_arms([0.80, 0.79], n=4000, seed=3)
    for margin in (0.05, 0.001):
        p = analyse(build_config({"rule": "non_inferiority", "margin": margin}), arms)["pairs"][0]
        assert p["verdict"] == ("b_non_inferior" if p["decision_low"] > -margin else "non_inferiority_not_shown")
        assert p["smallest_margin"] == max(0.0, -p["decision_low"])


def test_pair_rows_count_flips_and_per_class_disagreements() -> None:
    arms = make_arms([0.7, 0.8], n=300, seed=5)
    pair = analyse(build_config({"n_resamples": 200}), arms)["pairs"][0]
    frames = [a.predictions for a in arms]  # sorted by sample_id by analyse
    right = [(f["pred"] == f["label"]).to_numpy() for f in frames]
    ids, labels = frames[0]["sample_id"].to_numpy(), frames[0]["label"].to_numpy()
    assert pair["flips_only_a"] == ids[right[0] & ~right[1]].tolist()
    assert pair["flips_only_b"] == ids[~right[0] & right[1]].tolist()
    assert (pair["mcnemar_b"], pair["mcnemar_c"]) == (len(pair["flips_only_a"]), len(pair["flips_only_b"]))
    assert [c["label"] for c in pair["per_class"]] == ["0", "1", "2"]
    for c, row in enumerate(pair["per_class"]):
        assert (row["n"], row["only_a"]) == ((labels == c).sum(), (right[0] & ~right[1] & (labels == c)).sum())
    assert pair["p_discordant"] == pytest.approx((pair["mcnemar_b"] + pair["mcnemar_c"]) / 300)
    assert stats.mcnemar_power(300, pair["p_discordant"], pair["mde"]) == pytest.approx(0.8, abs=1e-6)


# --------------------------------------------------------------------------- A/B/n: one family, one story


def aligned_null(k: int, n: int, rng: np.random.Generator) -> Aligned:
    labels = rng.integers(0, 3, n)
    shared = rng.random(n) < 0.8  # correlated arms: each copies a common outcome 70% of the time
    correct = np.where(rng.random((n, k)) < 0.7, shared[:, None], rng.random((n, k)) < 0.8)
    preds = np.where(correct, labels[:, None], (labels[:, None] + 1) % 3)
    return Aligned(np.arange(n), labels, correct, preds, None, None, 3)


def test_four_arm_null_any_pair_verdict_rate_is_at_most_alpha() -> None:
    # 1,000 experiments with 4 arms of equal accuracy: the share of runs where any pair is called better.
    cfg = build_config({"arms": ["w", "x", "y", "z"]})
    rng = np.random.default_rng(11)
    runs = 1000
    any_claim = 0
    for _ in range(runs):
        decisions = decide_family(cfg, aligned_null(4, 300, rng))
        any_claim += any(d.verdict in ("a_better", "b_better") for d in decisions.values())
    assert any_claim / runs <= 0.05 + 0.01


def test_overall_verdict_never_conflicts_with_the_pair_verdicts() -> None:
    cfg = build_config({"arms": ["model0", "model1", "model2", "model3"], "n_resamples": 200})
    seen = set()
    for seed, accuracies in enumerate([[0.7, 0.7, 0.7, 0.7], [0.7, 0.72, 0.8, 0.7], [0.6, 0.8, 0.8, 0.6],
                                       [0.9, 0.7, 0.7, 0.7]]):  # fmt: skip
        summary = analyse(cfg, make_arms(accuracies, n=500, seed=seed))
        verdict, wins = summary["verdict"], [p for p in summary["pairwise"] if p["verdict"] in ("a_better", "b_better")]
        seen.add(verdict if not verdict.endswith("_best") else "best")
        if verdict.endswith("_best"):
            best = verdict.removesuffix("_best")
            assert sum(best == (p["b"] if p["verdict"] == "b_better" else p["a"]) for p in wins) == 3
        assert (verdict == "no_significant_difference") == (not wins)
        baseline = {(p["a"], p["b"]): p["verdict"] for p in summary["pairwise"]}
        assert all(baseline[p["a"], p["b"]] == p["verdict"] for p in summary["pairs"])
    assert seen == {"no_significant_difference", "differences_found", "best"}


def test_overall_verdict_codes_for_margin_rules_and_bayes() -> None:
    arm = {"accuracy": 0.7, "metrics": {"accuracy": 0.7}}
    arms = [arm | {"name": n} for n in "abc"]
    pairs = [{"a": "a", "b": "b", "verdict": "b_non_inferior"}, {"a": "a", "b": "c", "verdict": "b_non_inferior"}]
    base = {"rule": "non_inferiority", "arms": arms, "pairs": pairs}
    assert overall_verdict(base) == "all_non_inferior"
    pairs[1] = pairs[1] | {"verdict": "non_inferiority_not_shown"}
    assert overall_verdict(base | {"pairs": pairs}) == "some_non_inferior"
    shown_none = [p | {"verdict": "equivalence_not_shown"} for p in pairs]
    assert overall_verdict(base | {"rule": "equivalence", "pairs": shown_none}) == "equivalence_not_shown"
    pairwise = [{"a": x, "b": y, "verdict": "equivalent"} for x, y in itertools.combinations("abc", 2)]
    assert overall_verdict({"rule": "bayes", "arms": arms, "pairs": [], "pairwise": pairwise}) == "all_equivalent"
    pairwise[0] = pairwise[0] | {"verdict": "undecided"}
    assert overall_verdict({"rule": "bayes", "arms": arms, "pairs": [], "pairwise": pairwise}) == "undecided"


# --------------------------------------------------------------------------- the guard and bad input


GUARD = r"^arm a \(run a-run-id…\) and arm b \(run b-run-id…\) were scored on different test sets \(fingerprint "


@pytest.mark.parametrize(("change", "expected"), [
    ({"ab.num_classes": "4"}, GUARD + r"sha256:abababab… vs sha256:abababab…; number of classes 3 vs 4\): "
                              r"evaluate both models on a dataset with the same classes$"),
    ({"ab.label_map": "other"}, GUARD + r"sha256:abababab… vs sha256:abababab…; label map \(class names and their "
                                r"order\) labelmap3 vs other\): the same class index means a different class"),
    ({"ab.dataset_fingerprint": "sha256:" + "cd" * 16}, GUARD + r"sha256:abababab… vs sha256:cdcdcdcd…; same sample "
                                                        r"ids and labels but different images or class names\)"),
])  # fmt: skip
def test_guard_names_what_differs_and_both_values(change: dict, expected: str) -> None:
    arms = [make_arm("a", predictions(LABELS, LABELS > 0)), make_arm("b", predictions(LABELS, LABELS > 1), **change)]
    with pytest.raises(ComparisonError, match=expected) as err:
        check_comparable(arms)
    assert "\n" not in str(err.value)
    with pytest.raises(ComparisonError, match=expected):  # analyse runs the guard first
        analyse(build_config({}), arms)


def test_guard_names_the_label_map_before_the_fingerprint_it_changes() -> None:
    arms = [make_arm("a", predictions(LABELS, LABELS > 0)),
            make_arm("b", predictions(LABELS, LABELS > 0), **{"ab.label_map": "x", "ab.dataset_fingerprint": "y"})]
    with pytest.raises(ComparisonError, match=r"label map \(class names and their order\) labelmap3 vs x\): the same "
                                              r"class index"):  # fmt: skip
        check_comparable(arms)


def test_guard_refuses_other_samples_and_other_labels_with_the_first_example() -> None:
    base = make_arm("a", predictions(LABELS, LABELS > 0))
    with pytest.raises(ComparisonError, match=GUARD + r".*; 1 sample ids in only one, 60 vs 59 samples\)"):
        check_comparable([base, make_arm("b", predictions(LABELS[1:], LABELS[1:] > 0, np.arange(1, 60)))])
    relabelled = LABELS.copy()
    relabelled[[4, 7]] = (relabelled[[4, 7]] + 1) % 3
    with pytest.raises(ComparisonError, match=r"; labels differ on 2 samples, first sample 4: 1 vs 2\): the arms did "
                                              r"not score the same"):  # fmt: skip
        check_comparable([base, make_arm("b", predictions(relabelled, LABELS > 0))])


def test_preprocessing_difference_is_allowed_and_flagged_at_the_top(tmp_path: Path) -> None:
    arms = [make_arm("a", predictions(LABELS, LABELS > 0)),
            make_arm("b", predictions(LABELS, LABELS > 1), **{"ab.preprocess": "size=224 interp=bicubic"})]
    summary = analyse(fast_cfg(), arms)
    assert summary["preprocess_differs"] and not summary["precision_differs"]
    md = render(summary, tmp_path)["report.md"].read_text()
    assert md.index("preprocessing differs") < md.index("## Arms") and "b: size=224 interp=bicubic" in md


@pytest.mark.parametrize(("label", "pred", "message"), [
    (3, 0, r"^run a-run-id \(arm a\): label 3 of sample 5 is outside the 3 classes \(0\.\.2\); 1 such samples$"),
    (-1, 0, r"^run a-run-id \(arm a\): label -1 of sample 5 is outside the 3 classes \(0\.\.2\)"),
    (1, 7, r"^run b-run-id \(arm b\): pred 7 of sample 5 is outside the 3 classes"),
])  # fmt: skip
def test_labels_and_predictions_outside_the_classes_are_one_line(label: int, pred: int, message: str) -> None:
    frames = [predictions(LABELS, LABELS > 0), predictions(LABELS, LABELS > 1)]
    for frame in frames:  # both arms agree on the bad label, so the guard lets it through to the input check
        frame.loc[5, "label"] = label
    frames[1].loc[5, "pred"] = pred
    with pytest.raises(ComparisonError, match=message):
        analyse(build_config({}), [make_arm("a", frames[0]), make_arm("b", frames[1])])


def test_an_empty_test_set_is_one_line() -> None:
    empty = predictions(LABELS[:0], LABELS[:0] > 0)
    with pytest.raises(ComparisonError, match=r"^run a-run-id \(arm a\) has an empty test set \(0 predictions\)"):
        analyse(build_config({}), [make_arm("a", empty), make_arm("b", empty.copy())])


# --------------------------------------------------------------------------- metrics beyond accuracy, groups


def digits_arms(**prob_columns: bool) -> tuple[list[Arm], object]:
    """Two real classifiers (logistic regression, Gaussian naive Bayes) on the digits test split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import GaussianNB

    from lab.data import resolve_dataset

    info = resolve_dataset(build_config({"data": "digits"}))
    x_train, x_test = (s.images[..., 0].reshape(len(s), -1) / 255.0 for s in (info.train, info.test))
    arms = []
    for name, model in (("lr", LogisticRegression(max_iter=300)), ("nb", GaussianNB())):
        probs = model.fit(x_train, info.train.labels).predict_proba(x_test)
        frame = pd.DataFrame({"sample_id": info.test.sample_ids, "label": info.test.labels,
                              "pred": probs.argmax(1), "confidence": probs.max(1)})  # fmt: skip
        frame = frame.assign(**{f"prob_{k}": probs[:, k] for k in range(10)})
        tags = TAGS | {"ab.num_classes": "10", "ab.dataset_fingerprint": info.fingerprint}
        arms.append(Arm(name, f"{name}-run", name, tags, {}, frame))
    return arms, info


def test_macro_f1_and_top5_decide_end_to_end_on_digits(tmp_path: Path) -> None:
    arms, info = digits_arms()
    summary = analyse(build_config({"metric": "macro_f1", "n_resamples": 2000}), arms)
    pair = summary["pairs"][0]
    from sklearn.metrics import f1_score

    f1 = [f1_score(info.test.labels, a.predictions["pred"], average="macro") for a in arms]
    assert [a["metrics"]["macro_f1"] for a in summary["arms"]] == pytest.approx(f1)
    assert pair["metric"] == "macro_f1" and pair["decision_method"] == "bootstrap"
    assert pair["metric_diff"] == pytest.approx(f1[1] - f1[0]) and pair["verdict"] == "a_better"
    md = render(summary, tmp_path)["report.md"].read_text()
    assert "the metric that decided: macro-F1" in md and "in macro-F1 by" in md
    top5 = analyse(build_config({"metric": "top5_accuracy", "n_resamples": 500}), arms)
    assert top5["pairs"][0]["metric"] == "top5_accuracy" and top5["arms"][0]["metrics"]["top5_accuracy"] > 0.99
    arms[1].predictions = arms[1].predictions[["sample_id", "label", "pred", "confidence"]]
    with pytest.raises(ComparisonError, match=r"metric=top5_accuracy needs prob_<k> or top1\.\.5_class columns; "
                                              r"run nb-run \(arm nb\) has neither"):
        analyse(build_config({"metric": "top5_accuracy"}), arms)


def test_grouped_samples_widen_the_interval_on_digits(tmp_path: Path) -> None:
    from lab import data

    arms, info = digits_arms()
    table = pd.DataFrame({"sample_id": info.test.sample_ids, "group": info.test.sample_ids // 20})
    table.to_csv(tmp_path / "groups.csv", index=False)
    cfg = build_config({"data": "digits", "groups": str(tmp_path / "groups.csv"), "metric": "macro_f1",
                        "n_resamples": 2000})
    groups = data.test_groups(cfg)
    summary = analyse(cfg, arms, groups=groups)
    pair = summary["pairs"][0]
    assert pair["decision_method"] == "cluster_bootstrap" and summary["groups"]["n_groups"] == pair["n_groups"]
    assert np.isfinite(pair["design_effect"]) and pair["clustered_pvalue"] is not None
    with pytest.raises(ComparisonError, match="the config asks for groups"):
        analyse(cfg, arms)
    with pytest.raises(ComparisonError, match=r"groups: 1 test samples have no group \(first: sample"):
        analyse(cfg, arms, groups=dict(list(groups.items())[1:]))
