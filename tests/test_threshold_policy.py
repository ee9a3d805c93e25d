"""The one threshold policy of evaluate, predict and metrics (`resolve_threshold`), every branch."""

from __future__ import annotations

import numpy as np
import pytest

from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.evaluation.thresholds import LabelledScores, resolve_threshold

POINTS = {"split": "val", "epoch": 7, "points": {
    "eer": {"threshold": 0.42, "apcer": 0.1, "bpcer": 0.1},
    "max-apcer10": {"threshold": 0.61, "apcer": 0.1, "bpcer": 0.2},
    "max-bpcer1": {"threshold": None, "reason": "needs >= 100 bona fide images, split has 12"}}}
EARLIER = {**POINTS, "points": {"eer": POINTS["points"]["eer"], "apcer10": POINTS["points"]["max-apcer10"]}}
# 12 bona fide at 0.05..0.4, 24 morphs at 0.6..0.95: every criterion separates them
LABELS = np.array([0] * 12 + [1] * 24)
SCORES = np.concatenate([np.linspace(0.05, 0.4, 12), np.linspace(0.6, 0.95, 24)])


class Labelled:
    """Labelled scores that count how often they were asked for (the validation split is scored lazily)."""

    def __init__(self, groups: list[str] | None = None) -> None:
        self.calls, self.groups = 0, groups

    def __call__(self) -> LabelledScores:
        self.calls += 1
        return LabelledScores(LABELS, SCORES, "the validation split", self.groups)


def test_a_number_is_fixed_and_mapped_to_the_score_units() -> None:
    labelled = Labelled()
    chosen = resolve_threshold("0.3", stored=POINTS, labelled=labelled)
    assert (chosen.value, chosen.source) == (0.3, "fixed")
    chosen = resolve_threshold("2.5", probability=False, fixed=lambda t: -t)
    assert (chosen.value, chosen.source) == (-2.5, "fixed") and labelled.calls == 0
    with pytest.raises(UsageError, match=r"lies in \[0, 1\]"):
        resolve_threshold("2.5")


@pytest.mark.parametrize(("text", "value", "source"), [
    ("stored", 0.42, "stored val D-EER, epoch 7"),
    ("max-apcer10", 0.61, "stored val APCER <= 10 %, epoch 7"),
    ("apcer10", 0.61, "stored val APCER <= 10 %, epoch 7"),  # the criterion's earlier name
])
@pytest.mark.parametrize("points", [POINTS, EARLIER], ids=["stored", "stored-by-earlier-versions"])
def test_stored_points_are_read_without_scoring(text: str, value: float, source: str, points: dict) -> None:
    labelled = Labelled()
    chosen = resolve_threshold(text, stored=points, labelled=labelled)
    assert (chosen.value, chosen.source, labelled.calls) == (value, source, 0)


def test_a_stored_point_that_is_missing_or_not_estimable_is_an_error() -> None:
    with pytest.raises(SmadlrpError, match="stores no operating point 'max-bpcer10' \\(it has: eer, max-apcer10, "
                                           "max-bpcer1\\)"):
        resolve_threshold("bpcer10", stored=POINTS, stored_in="ck.safetensors")
    with pytest.raises(SmadlrpError, match="max-bpcer1 was not estimable on the validation split \\(needs >= 100"):
        resolve_threshold("bpcer1", stored=POINTS)


def test_without_stored_points_stored_falls_back_with_a_notice() -> None:
    said: list[str] = []
    labelled = Labelled()
    chosen = resolve_threshold("stored", stored={}, stored_in="old.safetensors", labelled=labelled,
                               notify=said.append)
    assert labelled.calls == 1 and chosen.source == "validation D-EER" and 0.4 <= chosen.value <= 0.6
    assert said == ["old.safetensors stores no operating points (written by an older smadlrp, or imported): using "
                    "--threshold val-eer"]
    fixed = resolve_threshold("stored", stored={}, without_stored=0.5)
    assert (fixed.value, fixed.source) == (0.5, "fixed: no stored operating points")
    with pytest.raises(SmadlrpError, match="--threshold max-apcer10: old.safetensors stores no operating points"):
        resolve_threshold("max-apcer10", stored={}, stored_in="old.safetensors")
    with pytest.raises(UsageError, match="no stored operating points here"):
        resolve_threshold("stored")  # score files: no checkpoint


def test_criteria_are_chosen_on_the_labelled_scores() -> None:
    labelled = Labelled()
    chosen = resolve_threshold("val-max-apcer10", stored=POINTS, labelled=labelled, labelled_in="dev")
    # APCER <= 10 % of 24 morphs lets 2 pass: the threshold is the third-lowest morph score
    assert labelled.calls == 1 and chosen.source == "dev APCER <= 10 %" and chosen.value == SCORES[12 + 2]
    worst = resolve_threshold("val-apcer10", labelled=Labelled(["-"] * 12 + ["a", "b"] * 12))
    assert worst.source == "validation APCER <= 10 %, worst species"
    with pytest.raises(UsageError, match="--threshold val-eer needs labelled validation scores"):
        resolve_threshold("val-eer", stored=POINTS)
