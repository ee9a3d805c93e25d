"""Decision thresholds chosen by a criterion on labelled scores (a validation split, a dev file, a training run).

One function per question: `criterion_threshold` turns scores, labels and a criterion name into a threshold;
everything that picks a threshold by name (evaluate's `val-*`, metrics' `--dev`, thresholds stored at training
time) calls it. Criteria: `eer` (the D-EER threshold), `max-apcerN` (the conservative threshold with APCER <= N %,
as for BPCER_N) and `max-bpcerN` (BPCER <= N %). Their earlier names, `apcerN` and `bpcerN`, are still read
(`CRITERION_ALIASES`): as a metric, BPCER10 is the BPCER at APCER 10 %, another thing than the criterion
"BPCER <= 10 %", so the criteria carry the `max-` prefix. With `groups`, an APCER criterion holds for the worst
group (Bob PAD's `apcer` criterion): the smallest of the groups' thresholds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.evaluation.metrics import BONAFIDE, ConfusionMatrix, apcer_at_bpcer, bpcer_at_apcer, d_eer

# criterion -> (rate held, its target); None for the D-EER.
CRITERIA: Mapping[str, tuple[str, float] | None] = {
    "eer": None,
    "max-apcer10": ("apcer", 0.10),
    "max-apcer5": ("apcer", 0.05),
    "max-apcer1": ("apcer", 0.01),
    "max-bpcer10": ("bpcer", 0.10),
    "max-bpcer1": ("bpcer", 0.01),
}
# the criteria's earlier names (and the keys of operating points stored by earlier versions): still accepted
CRITERION_ALIASES: Mapping[str, str] = {name.removeprefix("max-"): name for name in CRITERIA if name != "eer"}


def criterion_name(text: str) -> str | None:
    """The criterion `text` names, by its name or its earlier spelling (`apcer10` -> `max-apcer10`); None when it
    names none."""
    return text if text in CRITERIA else CRITERION_ALIASES.get(text)
VALIDATION_PREFIX = "val-"  # evaluate --threshold val-<criterion>: the criterion on the validation split


def describe(criterion: str) -> str:
    """Human name of a criterion (or of its earlier spelling): "D-EER", "APCER <= 10 %"."""
    held = CRITERIA[criterion_name(criterion) or criterion]
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
    name = criterion_name(text.removeprefix(VALIDATION_PREFIX)) if text.startswith(VALIDATION_PREFIX) else None
    if name is not None:
        return name
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
    name = criterion_name(criterion)
    if name is None:
        raise UsageError(f"unknown threshold criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    held = CRITERIA[name]
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
    """`--threshold stored` -> "eer", a criterion (`max-apcer10`, or its earlier name `apcer10`) -> its name: an
    operating point stored in the checkpoint; None for anything else (a number, a `val-` criterion)."""
    if text == STORED:
        return "eer"
    return criterion_name(text)


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


@dataclass(frozen=True)
class Threshold:
    """A decision threshold on the score and where it came from, e.g. "stored val D-EER, epoch 7" or "fixed"."""

    value: float
    source: str


@dataclass(frozen=True)
class LabelledScores:
    """Scores with labels (1 = attack) to choose a threshold on, where they come from (for messages: "the
    validation split", a file name), and one group name per score for the worst-species rule (None without it)."""

    labels: npt.ArrayLike
    scores: npt.ArrayLike
    where: str
    groups: Sequence[str] | None = None


def resolve_threshold(text: str, *, stored: Mapping[str, Any] | None = None, stored_in: str = "the checkpoint",
                      labelled: Callable[[], LabelledScores] | None = None, labelled_in: str = "validation",
                      without_stored: str | float = VALIDATION_PREFIX + "eer", probability: bool = True,
                      fixed: Callable[[float], float] = float, notify: Callable[[str], None] = lambda message: None
                      ) -> Threshold:
    """The one threshold policy of evaluate, predict and metrics: `text` is a number (`fixed` maps it to the score
    units), `stored` or a stored operating point (`apcer10`, ...: read from the `stored` operating points of
    `stored_in`; None: the command has none), or a `val-` criterion chosen now on the `labelled` scores (computed
    only when needed).

    A checkpoint that stores no operating points (older or imported) falls back to `without_stored` with a notice;
    a stored point that is missing or was not estimable, or a criterion without labelled scores, is an error
    naming the option."""
    name = stored_point_name(text)
    if name is not None and stored is None:
        raise UsageError(f"--threshold {text}: there are no stored operating points here; use a number or a "
                         f"{VALIDATION_PREFIX} criterion")
    if name is not None:
        points = (stored or {}).get("points")
        if points:
            return Threshold(_stored_point(points, name, stored_in), _stored_source(stored or {}, name))
        if text != STORED:
            raise SmadlrpError(f"--threshold {text}: {stored_in} stores no operating points (it was written by an "
                               f"older smadlrp or imported); use --threshold {VALIDATION_PREFIX}{name} or a number")
        notify(f"{stored_in} stores no operating points (written by an older smadlrp, or imported): using "
               f"--threshold {without_stored}")
        if isinstance(without_stored, float):
            return Threshold(without_stored, "fixed: no stored operating points")
        text = without_stored
    wanted = parse_threshold(text, probability=probability)
    if isinstance(wanted, float):
        return Threshold(fixed(wanted), "fixed")
    if labelled is None:
        raise UsageError(f"--threshold {text} needs labelled {labelled_in} scores, which this command does not have")
    data = labelled()
    value = criterion_threshold(data.labels, data.scores, wanted, groups=data.groups, where=data.where)
    return Threshold(value, ThresholdChoice(value, wanted, data.groups is not None).source(labelled_in))


def _stored_point(points: Mapping[str, Any], name: str, stored_in: str) -> float:
    """The stored threshold of criterion `name`, under its name or (checkpoints of earlier versions) its earlier
    spelling."""
    earlier = {canonical: alias for alias, canonical in CRITERION_ALIASES.items()}
    point = points.get(name, points.get(earlier.get(name, name)))
    if point is None:
        raise SmadlrpError(f"{stored_in} stores no operating point {name!r} (it has: {', '.join(points)})")
    if point.get("threshold") is None:
        raise SmadlrpError(f"{stored_in}: the stored operating point {name} was not estimable on the validation "
                           f"split ({point.get('reason')})")
    return float(point["threshold"])


def _stored_source(stored: Mapping[str, Any], name: str) -> str:
    return f"stored {stored.get('split', 'val')} {describe(name)}, epoch {stored.get('epoch', '?')}"
