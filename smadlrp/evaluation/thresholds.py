"""Decision thresholds chosen by a criterion on labelled scores (a validation split, a dev file, a training run).

One function per question: `criterion_threshold` turns scores, labels and a criterion name into a threshold;
everything that picks a threshold by name (evaluate's `val-*`, metrics' `--dev`, thresholds stored at training
time) calls it. Criteria: `eer` (the D-EER threshold), `apcerN` (the conservative threshold with APCER <= N %,
as for BPCER_N) and `bpcerN` (BPCER <= N %). With `groups`, an APCER criterion holds for the worst group
(Bob PAD's `apcer` criterion): the smallest of the groups' thresholds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.evaluation.metrics import BONAFIDE, ConfusionMatrix, apcer_at_bpcer, bpcer_at_apcer, d_eer

# criterion -> (rate held, its target); None for the D-EER.
CRITERIA: Mapping[str, tuple[str, float] | None] = {
    "eer": None,
    "apcer10": ("apcer", 0.10),
    "apcer5": ("apcer", 0.05),
    "apcer1": ("apcer", 0.01),
    "bpcer10": ("bpcer", 0.10),
    "bpcer1": ("bpcer", 0.01),
}
VALIDATION_PREFIX = "val-"  # evaluate --threshold val-<criterion>: the criterion on the validation split


def describe(criterion: str) -> str:
    """Human name of a criterion: "D-EER", "APCER <= 10 %"."""
    held = CRITERIA[criterion]
    return "D-EER" if held is None else f"{held[0].upper()} <= {100 * held[1]:g} %"


@dataclass(frozen=True)
class ThresholdChoice:
    """A threshold on the score and how it was chosen ("fixed", or a criterion on some labelled scores)."""

    value: float
    criterion: str | None  # None for a fixed number
    worst_species: bool = False

    def source(self, where: str) -> str:
        """E.g. "fixed", "validation APCER <= 10 %", "validation APCER <= 10 %, worst species"."""
        if self.criterion is None:
            return "fixed"
        text = f"{where} {describe(self.criterion)}"
        return text + ", worst species" if self.worst_species else text


def parse_threshold(text: str, *, probability: bool = True) -> float | str:
    """`--threshold`: a number (in [0, 1] for a P(morph) score), or `val-<criterion>` (returned as the
    criterion name)."""
    if text.startswith(VALIDATION_PREFIX) and text[len(VALIDATION_PREFIX):] in CRITERIA:
        return text[len(VALIDATION_PREFIX):]
    try:
        value = float(text)
    except ValueError:
        names = ", ".join(VALIDATION_PREFIX + name for name in CRITERIA)
        raise UsageError(f"--threshold {text!r}: use a number or one of {names}") from None
    if not np.isfinite(value) or (probability and not 0.0 <= value <= 1.0):
        raise UsageError(f"--threshold {text}: a P(morph) threshold lies in [0, 1]")
    return value


def criterion_threshold(labels: npt.ArrayLike, scores: npt.ArrayLike, criterion: str, *,
                        groups: Sequence[str] | None = None, where: str = "the scores") -> float:
    """The threshold `criterion` picks on these labelled scores (labels 1 = morph, s = P(morph)).

    `groups` (one name per image; ignored for bona fide): for an APCER criterion, the threshold at which the
    worst group's APCER meets the target, i.e. the minimum over groups of each group's conservative threshold
    (APCER only grows with the threshold). SmadlrpError, naming `where`, when the data cannot support it.
    """
    if criterion not in CRITERIA:
        raise UsageError(f"unknown threshold criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    held = CRITERIA[criterion]
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if groups is not None:
        if held is None or held[0] != "apcer":
            raise UsageError(f"the worst-species rule applies to APCER criteria, not {criterion}")
        g = np.asarray(groups, dtype=str)
        names = sorted(set(g[y != BONAFIDE].tolist()))
        if not names:
            raise SmadlrpError(f"{where}: no morphs to choose a per-species threshold on")
        return min(criterion_threshold(y[(g == name) | (y == BONAFIDE)], s[(g == name) | (y == BONAFIDE)],
                                       criterion, where=f"{where}, species {name!r}") for name in names)
    if held is None:
        eer = d_eer(y, s)
        if eer.threshold is None:
            raise SmadlrpError(f"{where}: the D-EER threshold is not estimable ({eer.reason})")
        return eer.threshold
    fixed, target = held
    point = (bpcer_at_apcer if fixed == "apcer" else apcer_at_bpcer)(y, s, target)
    if point.threshold is None:
        raise SmadlrpError(f"{where}: no threshold for {describe(criterion)} ({point.reason})")
    return point.threshold


STORED = "stored"  # evaluate --threshold stored: the checkpoint's own validation D-EER threshold


def stored_point_name(text: str) -> str | None:
    """`--threshold stored` -> "eer", a criterion name (`apcer10`, ...) -> itself: an operating point stored in
    the checkpoint; None for anything else (a number, a `val-` criterion)."""
    if text == STORED:
        return "eer"
    return text if text in CRITERIA else None


def operating_points(labels: npt.ArrayLike, scores: npt.ArrayLike) -> dict[str, Any]:
    """Every criterion's threshold on these labelled scores, with the APCER and BPCER it gives on them, and the
    counts they come from: {"n_bonafide", "n_morph", "points": {criterion: {"threshold", "apcer", "bpcer"}}}.
    A criterion the data cannot support has threshold None and a "reason"."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    points: dict[str, dict[str, Any]] = {}
    for name in CRITERIA:
        try:
            t = criterion_threshold(y, s, name)
        except SmadlrpError as exc:
            points[name] = {"threshold": None, "reason": exc.message.removeprefix("the scores: ")}
            continue
        if not np.isfinite(t):
            points[name] = {"threshold": None, "reason": "the threshold is infinite"}
            continue
        cm = ConfusionMatrix.from_scores(y, s, t)
        points[name] = {"threshold": t, "apcer": cm.apcer, "bpcer": cm.bpcer}
    return {"n_bonafide": int(np.sum(y == BONAFIDE)), "n_morph": int(np.sum(y != BONAFIDE)), "points": points}
