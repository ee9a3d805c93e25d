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
    group_breakdown,
    parse_gate,
    roc_auc,
    summarize,
)
from smadlrp.evaluation.thresholds import criterion_threshold, parse_threshold

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


def test_group_breakdown_per_species_average_worst_and_apcer_ap_by_hand() -> None:
    # morphs: A {0.9, 0.8, 0.2}, B {0.1, 0.3}, C {0.7}; bona fide (no group) {0.1, 0.6, 0.2, 0.4}; t = 0.5
    labels = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    scores = [0.9, 0.8, 0.2, 0.1, 0.3, 0.7, 0.1, 0.6, 0.2, 0.4]
    groups = ["A", "A", "A", "B", "B", "C", "", "", "", ""]
    result = group_breakdown(labels, scores, groups, 0.5, column="method", threshold_source="fixed")
    parts = dict(result.parts)
    assert list(parts) == ["A", "B", "C"] and result.shared_bonafide
    assert [parts[g].n_bonafide for g in parts] == [4, 4, 4]  # every species against all bona fide images
    assert [parts[g].confusion.fn for g in parts] == [1, 2, 0]
    assert [parts[g].value("apcer") for g in parts] == [pytest.approx(1 / 3), 1.0, 0.0]
    # D-EER by hand: A crosses between t = 0.4 (APCER 1/3, BPCER 1/2) and 0.6 (1/3, 1/4): 1/3;
    # B meets exactly at t = 0.3 (1/2, 1/2); C at t = 0.7 (0, 0).
    assert [parts[g].eer.value for g in parts] == [pytest.approx(1 / 3), 0.5, 0.0]
    assert result.average("apcer").value == pytest.approx(4 / 9)
    assert result.average("d-eer").value == pytest.approx(5 / 18)
    assert (result.worst("apcer").value, result.worst("apcer").part) == (1.0, "B")
    assert (result.worst("d-eer").value, result.worst("d-eer").part) == (0.5, "B")
    assert (result.apcer_ap.value, result.apcer_ap.part) == (1.0, "B")
    assert summarize(labels, scores, 0.5, threshold_source="fixed").value("apcer") == 0.5  # pooled APCER
    assert result.average("bpcer10").value is None
    assert result.average("bpcer10").reason == "bpcer10 is not estimable for A, B, C"


def test_group_breakdown_with_bona_fide_groups_and_a_bona_fide_only_group() -> None:
    # column "source": bona fide and morphs both carry it; source "z" has no morphs, so no APCER to aggregate
    labels = [1, 1, 0, 0, 1, 0, 0]
    scores = [0.9, 0.2, 0.6, 0.1, 0.8, 0.3, 0.7]
    groups = ["x", "x", "x", "x", "y", "y", "z"]
    result = group_breakdown(labels, scores, groups, 0.5, column="source", threshold_source="fixed")
    parts = dict(result.parts)
    assert not result.shared_bonafide
    assert [(parts[g].n_morph, parts[g].n_bonafide) for g in parts] == [(2, 2), (1, 1), (0, 1)]
    assert [parts[g].value("bpcer") for g in parts] == [0.5, 0.0, 1.0]
    assert result.apcer_ap.value == 0.5 and result.apcer_ap.part == "x"  # z does not count as a species
    assert result.worst("bpcer").part == "z" and result.average("bpcer").value == pytest.approx(0.5)


def test_threshold_criteria_by_hand() -> None:
    # 20 morphs, 10 per species; A's two lowest 0.30 and 0.50, B's 0.10 and 0.20
    morph_a = [0.30, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90]
    morph_b = [0.10, 0.20, 0.62, 0.64, 0.66, 0.68, 0.72, 0.74, 0.76, 0.78]
    bona = [0.05 * i for i in range(10)]  # 0.00 .. 0.45
    labels = [1] * 20 + [0] * 10
    scores = morph_a + morph_b + bona
    groups = ["A"] * 10 + ["B"] * 10 + [""] * 10
    # pooled APCER <= 10 %: k = floor(0.1 * 20) = 2, t = third lowest morph score = 0.30
    assert criterion_threshold(labels, scores, "apcer10") == 0.30
    # worst species: A's k = 1 gives 0.50, B's gives 0.20; the smallest holds both at <= 10 %
    worst = criterion_threshold(labels, scores, "apcer10", groups=groups)
    assert worst == 0.20
    for name in ("A", "B"):
        member = [g == name for g in groups[:20]]
        assert apcer([1] * sum(member), [s for s, m in zip(scores[:20], member, strict=True) if m], worst) <= 0.10
    assert apcer([1] * 10, morph_b, 0.30) == 0.2  # the pooled threshold leaves species B at 20 %
    # BPCER <= 10 %: k = floor(0.1 * 10) = 1 bona fide may reach t: just above the second highest (0.40)
    assert criterion_threshold(labels, scores, "bpcer10") == np.nextafter(0.40, 1.0)
    assert criterion_threshold(labels, scores, "eer") == d_eer(labels, scores).threshold
    with pytest.raises(SmadlrpError, match="species 'A': no threshold for APCER <= 1 % .needs >= 100 morphs"):
        criterion_threshold(labels, scores, "apcer1", groups=groups, where="dev")
    with pytest.raises(SmadlrpError, match="needs both classes"):
        criterion_threshold([1, 1], [0.2, 0.3], "eer")
    with pytest.raises(UsageError, match="worst-species rule applies to APCER criteria"):
        criterion_threshold(labels, scores, "bpcer10", groups=groups)


def test_parse_threshold() -> None:
    assert parse_threshold("0.25") == 0.25 and parse_threshold("val-max-apcer5") == "max-apcer5"
    assert parse_threshold("val-apcer5") == "max-apcer5"  # the criterion's earlier name
    assert parse_threshold("val-eer") == "eer"
    with pytest.raises(UsageError, match="val-eer, val-max-apcer10, val-max-apcer5, val-max-apcer1, "
                                         "val-max-bpcer10, val-max-bpcer1"):
        parse_threshold("val-apcer7")
    with pytest.raises(UsageError, match="lies in"):
        parse_threshold("1.5")


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
