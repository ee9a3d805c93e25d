"""S-MAD metrics against hand computations and sklearn; morph = label 1 = positive, morph when s >= t."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, det_curve, roc_auc_score, roc_curve

from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.evaluation.metrics import (
    GATE_METRICS,
    ConfusionMatrix,
    Gate,
    apcer,
    apcer_at_bpcer,
    bpcer,
    bpcer_at_apcer,
    check_gates,
    d_eer,
    det_points,
    parse_gate,
    per_group,
    roc_auc,
    summarize,
)

# 3 morphs (0.9, 0.6, 0.2) and 4 bona fide (0.1, 0.5, 0.7, 0.3); at t = 0.5:
# morphs 0.9, 0.6 -> TP; 0.2 -> FN; bona fide 0.5 (on the threshold), 0.7 -> FP; 0.1, 0.3 -> TN.
HAND_LABELS = np.array([1, 1, 1, 0, 0, 0, 0])
HAND_SCORES = np.array([0.9, 0.6, 0.2, 0.1, 0.5, 0.7, 0.3])


def _random_split(seed: int, n: int = 400, decimals: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = rng.normal(loc=labels * 1.5, scale=1.0)
    return labels, (np.round(scores, decimals) if decimals is not None else scores)


def test_confusion_matrix_hand_case_morph_is_positive() -> None:
    cm = ConfusionMatrix.from_scores(HAND_LABELS, HAND_SCORES, 0.5)
    assert (cm.tp, cm.tn, cm.fp, cm.fn) == (2, 2, 2, 1)
    assert cm.apcer == pytest.approx(1 / 3)
    assert cm.bpcer == pytest.approx(2 / 4)
    assert cm.accuracy == pytest.approx(4 / 7)
    assert (cm.n_morph, cm.n_bonafide, cm.total) == (3, 4, 7)


def test_confusion_matrix_agrees_with_sklearn_ordering() -> None:
    labels, scores = _random_split(0, n=200)
    cm = ConfusionMatrix.from_scores(labels, scores, 0.7)
    tn, fp, fn, tp = confusion_matrix(labels, (scores >= 0.7).astype(int), labels=[0, 1]).ravel()
    assert (cm.tn, cm.fp, cm.fn, cm.tp) == (tn, fp, fn, tp)


def test_apcer_bpcer_functions_and_missing_class() -> None:
    assert apcer(HAND_LABELS, HAND_SCORES, 0.5) == pytest.approx(1 / 3)
    assert bpcer(HAND_LABELS, HAND_SCORES, 0.5) == pytest.approx(0.5)
    # A score equal to the threshold is called morph: raising t just above 0.6 misses that morph too.
    assert apcer(HAND_LABELS, HAND_SCORES, 0.6) == pytest.approx(1 / 3)
    assert apcer(HAND_LABELS, HAND_SCORES, 0.6000001) == pytest.approx(2 / 3)
    assert apcer([0, 0], [0.1, 0.9], 0.5) is None
    assert bpcer([1, 1], [0.1, 0.9], 0.5) is None
    assert ConfusionMatrix.from_scores([], [], 0.5).accuracy is None


def test_d_eer_with_ties_is_interpolated() -> None:
    # bona fide {0.2, 0.5}, morph {0.5, 0.8}. t=0.5: APCER 0, BPCER 1/2; t=0.8: APCER 1/2, BPCER 0.
    # APCER - BPCER goes from -1/2 to +1/2: half way, D-EER 1/4 at t = 0.65.
    eer = d_eer([0, 0, 1, 1], [0.2, 0.5, 0.5, 0.8])
    assert eer.value == pytest.approx(0.25)
    assert eer.threshold == pytest.approx(0.65)


def test_d_eer_exact_crossing_returns_the_grid_threshold() -> None:
    # bona fide {0.4, 0.6}, morph {0.3, 0.7}. t=0.4: APCER 1/2, BPCER 1; t=0.6: APCER 1/2 (0.3),
    # BPCER 1/2 (0.6) -> equal on the grid, no interpolation.
    eer = d_eer([0, 0, 1, 1], [0.4, 0.6, 0.3, 0.7])
    assert (eer.value, eer.threshold) == (0.5, 0.6)


def test_d_eer_perfect_inverted_and_constant_detectors() -> None:
    perfect = d_eer([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert (perfect.value, perfect.threshold) == (0.0, 0.8)
    inverted = d_eer([0, 0, 1, 1], [0.8, 0.9, 0.1, 0.2])
    assert inverted.value == 1.0
    constant = d_eer([0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5])
    assert constant.value == pytest.approx(0.5)
    assert constant.threshold == pytest.approx(0.5)


@pytest.mark.parametrize("decimals", [None, 1])
def test_d_eer_matches_a_sweep_over_sklearn_roc_points(decimals: int | None) -> None:
    labels, scores = _random_split(1, decimals=decimals)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    miss = 1.0 - tpr  # APCER; thresholds decrease along the arrays, so miss - fpr falls from +1 to -1
    diff = miss - fpr
    j = int(np.argmax(diff <= 0))
    w = diff[j - 1] / (diff[j - 1] - diff[j])
    expected = miss[j - 1] + w * (miss[j] - miss[j - 1])
    assert d_eer(labels, scores).value == pytest.approx(expected, abs=1e-12)


def test_one_class_split_is_not_estimable_without_crashing() -> None:
    labels, scores = np.ones(30, dtype=int), np.linspace(0, 1, 30)
    eer = d_eer(labels, scores)
    assert not eer.estimable and eer.threshold is None
    assert "no bona fide" in (eer.reason or "")
    assert roc_auc(labels, scores) is None
    summary = summarize(labels, scores, 0.5, threshold_source="fixed")
    values = summary.as_dict()
    assert values["d-eer"] is None and values["auc"] is None and values["bpcer"] is None
    assert values["apcer"] == pytest.approx(15 / 30)
    assert "no bona fide" in (summary.reason("auc") or "")
    with pytest.raises(SmadlrpError, match="no bona fide"):
        det_points(labels, scores)


def test_roc_auc_matches_sklearn_with_ties() -> None:
    labels, scores = _random_split(2, decimals=1)
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert roc_auc([0, 1], [0.3, 0.3]) == pytest.approx(0.5)


def test_det_points_follow_the_convention_of_sklearn_det_curve() -> None:
    labels, scores = _random_split(3, n=120, decimals=2)
    fpr, fnr, thresholds = det_curve(labels, scores)
    for f_bpcer, f_apcer, t in zip(fpr, fnr, thresholds, strict=True):
        assert apcer(labels, scores, t) == pytest.approx(f_apcer)
        assert bpcer(labels, scores, t) == pytest.approx(f_bpcer)
    a, b = det_points(labels, scores)
    assert a.shape == b.shape == (len(np.unique(scores)) + 1,)
    assert (a[0], b[0], a[-1], b[-1]) == (0.0, 1.0, 1.0, 0.0)
    assert np.all(np.diff(a) >= 0) and np.all(np.diff(b) <= 0)
    points = set(zip(a.round(12), b.round(12), strict=True))
    assert set(zip(fnr.round(12), fpr.round(12), strict=True)) <= points


def _operating_split() -> tuple[np.ndarray, np.ndarray]:
    morph = [0.30, 0.35, 0.35, 0.45, 0.50, 0.60, 0.70, 0.80, 0.90, 0.95]
    bona = [0.05, 0.10, 0.15, 0.20, 0.32, 0.36, 0.40, 0.55, 0.80, 0.90]
    return np.array([1] * 10 + [0] * 10), np.array(morph + bona)


def test_bpcer_at_apcer_hand_example() -> None:
    labels, scores = _operating_split()
    # alpha 0.1, N 10: k = 1, t* = m(2) = 0.35; one morph (0.30) below -> APCER 0.1;
    # bona fide >= 0.35: 0.36, 0.40, 0.55, 0.80, 0.90 -> BPCER 0.5.
    point = bpcer_at_apcer(labels, scores, 0.1)
    assert (point.threshold, point.reached, point.value) == (0.35, pytest.approx(0.1), pytest.approx(0.5))
    # alpha 0.2: k = 2, t* = m(3) = 0.35 again (tie): the APCER reached stays 0.1 < 0.2 (conservative).
    tied = bpcer_at_apcer(labels, scores, 0.2)
    assert (tied.threshold, tied.reached) == (0.35, pytest.approx(0.1))
    # alpha 0.3: k = 3, t* = m(4) = 0.45; APCER 3/10; BPCER: 0.55, 0.80, 0.90 -> 0.3.
    wider = bpcer_at_apcer(labels, scores, 0.3)
    assert (wider.threshold, wider.reached, wider.value) == (0.45, pytest.approx(0.3), pytest.approx(0.3))
    everything = bpcer_at_apcer(labels, scores, 1.0)
    assert (everything.threshold, everything.reached, everything.value) == (math.inf, 1.0, 0.0)


def test_apcer_at_bpcer_hand_example() -> None:
    labels, scores = _operating_split()
    # beta 0.1, N 10: k = 1; bona fide descending 0.90, 0.80, ...: t* just above b(2) = 0.80, so only 0.90
    # stays >= t* (BPCER 0.1); morphs below t*: all but 0.90 and 0.95 -> APCER 0.8.
    point = apcer_at_bpcer(labels, scores, 0.1)
    assert point.threshold is not None and 0.80 < point.threshold < 0.80 + 1e-12
    assert (point.reached, point.value) == (pytest.approx(0.1), pytest.approx(0.8))
    assert apcer_at_bpcer(labels, scores, 1.0).threshold == -math.inf


@pytest.mark.parametrize("fixed_rate", [0.01, 0.05, 0.1, 0.29])
def test_operating_points_reproduce_under_their_own_threshold(fixed_rate: float) -> None:
    labels, scores = _random_split(4, n=400, decimals=2)
    for point, reached_name, value_name in (
        (bpcer_at_apcer(labels, scores, fixed_rate), "apcer", "bpcer"),
        (apcer_at_bpcer(labels, scores, fixed_rate), "bpcer", "apcer"),
    ):
        assert point.threshold is not None and point.reached is not None
        cm = ConfusionMatrix.from_scores(labels, scores, point.threshold)
        assert getattr(cm, reached_name) == pytest.approx(point.reached)
        assert getattr(cm, value_name) == pytest.approx(point.value)
        assert point.reached <= fixed_rate + 1e-12


def test_floor_of_alpha_times_n_is_not_fooled_by_float_rounding() -> None:
    # 0.29 * 100 = 28.999999999999996 in floating point; k must be 29, so t* = m(30) and APCER reached 0.29.
    labels = np.array([1] * 100 + [0] * 5)
    scores = np.concatenate([np.arange(100) / 100.0, np.full(5, 0.5)])
    point = bpcer_at_apcer(labels, scores, 0.29)
    assert point.threshold == pytest.approx(0.29)
    assert point.reached == pytest.approx(0.29)


def test_split_too_small_for_bpcer100_is_not_estimable() -> None:
    labels, scores = _random_split(5, n=120)
    n_morph = int(labels.sum())
    point = bpcer_at_apcer(labels, scores, 0.01)
    assert point.value is None and point.threshold is None and point.required == 100
    assert point.reason == f"needs >= 100 morphs, split has {n_morph}"
    summary = summarize(labels, scores, 0.5, threshold_source="fixed")
    assert summary.as_dict()["bpcer100"] is None
    assert summary.as_dict()["bpcer10"] is not None
    assert summary.reason("bpcer100") == point.reason
    assert "needs morphs" in (apcer_at_bpcer([0] * 20, np.linspace(0, 1, 20), 0.1).reason or "")


def test_operating_point_target_must_be_a_rate() -> None:
    with pytest.raises(UsageError, match=r"alpha must be a rate in \(0, 1\]"):
        bpcer_at_apcer(HAND_LABELS, HAND_SCORES, 0.0)
    with pytest.raises(UsageError, match="beta"):
        apcer_at_bpcer(HAND_LABELS, HAND_SCORES, 1.5)


def test_summary_collects_every_gate_metric() -> None:
    labels, scores = _random_split(6, n=300)
    summary = summarize(labels, scores, 0.75, threshold_source="validation D-EER")
    values = summary.as_dict()
    assert set(GATE_METRICS) <= set(values)
    assert values["threshold_source"] == "validation D-EER"
    assert values["n_morph"] == int(labels.sum()) and values["n_bonafide"] == int((labels == 0).sum())
    assert values["apcer"] == apcer(labels, scores, 0.75)
    assert values["d-eer"] == d_eer(labels, scores).value
    assert values["bpcer20"] == bpcer_at_apcer(labels, scores, 0.05).value
    assert values["bpcer20_apcer"] == bpcer_at_apcer(labels, scores, 0.05).reached
    assert values["apcer@bpcer10"] == apcer_at_bpcer(labels, scores, 0.1).value
    assert values["apcer@bpcer10_bpcer"] == apcer_at_bpcer(labels, scores, 0.1).reached
    assert values["auc"] == roc_auc(labels, scores)
    assert summary.confusion == ConfusionMatrix.from_scores(labels, scores, 0.75)


def test_per_group_apcer_and_worst_species() -> None:
    labels = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    scores = [0.9, 0.8, 0.2, 0.1, 0.3, 0.7, 0.1, 0.6, 0.2, 0.4]
    groups = ["complete", "complete", "complete", "splicing", "splicing", "partial", "-", "-", "-", "-"]
    result = per_group(labels, scores, groups, 0.5)
    by_name = {row.group: row for row in result.rows}
    assert list(by_name) == ["complete", "partial", "splicing"]
    assert (by_name["complete"].n_morph, by_name["complete"].missed) == (3, 1)
    assert by_name["complete"].apcer == pytest.approx(1 / 3)
    assert by_name["splicing"].apcer == 1.0 and by_name["partial"].apcer == 0.0
    assert result.worst is by_name["splicing"] and result.max_apcer == 1.0
    assert (result.n_bonafide, result.bpcer) == (4, pytest.approx(0.25))
    # splicing {0.1, 0.3} against bona fide {0.1, 0.6, 0.2, 0.4}: its own D-EER from the shared bona fide.
    assert by_name["splicing"].eer.value == d_eer([1, 1, 0, 0, 0, 0], [0.1, 0.3, 0.1, 0.6, 0.2, 0.4]).value
    assert per_group([0, 0], [0.1, 0.2], ["-", "-"], 0.5).worst is None


def test_parse_gate_names_values_and_errors() -> None:
    assert parse_gate("d-eer=0.05") == Gate("d-eer", 0.05)
    assert parse_gate(" APCER@BPCER1 = 12.5% ") == Gate("apcer@bpcer1", 0.125)
    with pytest.raises(UsageError, match="unknown metric 'eer'; valid metrics: accuracy, apcer") as info:
        parse_gate("eer=0.1")
    assert info.value.exit_code == 2 and "bpcer100" in info.value.message
    with pytest.raises(UsageError, match="is not a number"):
        parse_gate("auc=high")
    with pytest.raises(UsageError, match="between 0 and 1"):
        parse_gate("bpcer=1.5")
    with pytest.raises(UsageError, match="NAME=VALUE"):
        parse_gate("d-eer")


def test_check_gates_pass_fail_and_not_estimable() -> None:
    labels, scores = _random_split(7, n=60)
    summary = summarize(labels, scores, 0.75, threshold_source="fixed")
    eer = summary.eer.value
    assert eer is not None and summary.auc is not None
    assert check_gates(summary, [Gate("d-eer", eer)], [Gate("auc", summary.auc)]) == []  # equal passes
    failures = check_gates(summary, [Gate("d-eer", 0.01)], [Gate("auc", 0.999)])
    assert failures == [
        f"d-eer = {eer:.4g} is above the limit 0.01",
        f"auc = {summary.auc:.4g} is below the limit 0.999",
    ]
    (message,) = check_gates(summary, [Gate("bpcer100", 0.5)], [])
    assert message.startswith("bpcer100: cannot check the limit (above 0.5 fails): not estimable")
    assert "needs >= 100 morphs" in message


def test_invalid_inputs() -> None:
    with pytest.raises(SmadlrpError, match="NaN or infinity"):
        d_eer([0, 1], [0.1, math.nan])
    with pytest.raises(ValueError, match="0 \\(bona fide\\) or 1 \\(morph\\)"):
        ConfusionMatrix.from_scores([0, 2], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError, match="one length"):
        roc_auc([0, 1, 1], [0.1, 0.2])
