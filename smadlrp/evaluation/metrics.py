"""S-MAD metrics over score arrays: confusion matrix, APCER/BPCER, D-EER, operating points, gates.

Convention (ISO/IEC 30107-3 vocabulary): the attack class is *morph* = label 1 = positive, bona fide =
label 0. A score is s = P(morph) and an image is called a morph when s >= t. Rates are fractions in [0, 1].
A value that the data cannot support is `None` together with a one-line reason, never a number.
Pure functions over 1-D numpy arrays: no torch, no printing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.evaluation.intervals import Interval, bootstrap_intervals, clopper_pearson

MORPH = 1
BONAFIDE = 0

# Names a gate can check; the same keys appear in `MetricsSummary.as_dict()`.
GATE_METRICS: tuple[str, ...] = (
    "accuracy",
    "apcer",
    "bpcer",
    "d-eer",
    "bpcer10",
    "bpcer20",
    "bpcer100",
    "apcer@bpcer10",
    "apcer@bpcer1",
    "auc",
)
# Metrics read off the evaluated split's own curve: optimistic ("oracle") when that split is the test split.
ORACLE_METRICS: tuple[str, ...] = ("d-eer", "bpcer10", "bpcer20", "bpcer100", "apcer@bpcer10", "apcer@bpcer1")
# Operating points reported by `summarize`: name -> (rate held fixed, its target).
OPERATING_POINTS: Mapping[str, tuple[str, float]] = {
    "bpcer10": ("apcer", 0.10),
    "bpcer20": ("apcer", 0.05),
    "bpcer100": ("apcer", 0.01),
    "apcer@bpcer10": ("bpcer", 0.10),
    "apcer@bpcer1": ("bpcer", 0.01),
}
_ROUNDING = 1e-9  # absorbs float error in alpha * N (0.29 * 100 = 28.999999999999996)

FloatArray = npt.NDArray[np.float64]


def _as_arrays(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[npt.NDArray[np.int64], FloatArray]:
    """Validate and convert: labels (N,) in {0, 1}, scores (N,) finite floats."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"labels and scores must be 1-D arrays of one length, got {y.shape} and {s.shape}")
    if y.size and not np.isin(y, (BONAFIDE, MORPH)).all():
        raise ValueError("labels must be 0 (bona fide) or 1 (morph)")
    if not np.isfinite(s).all():
        raise SmadlrpError("scores contain NaN or infinity: the model output cannot be evaluated")
    return y.astype(np.int64), s


def _split(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Sorted morph scores (Nm,) and sorted bona fide scores (Nb,)."""
    y, s = _as_arrays(labels, scores)
    return np.sort(s[y == MORPH]), np.sort(s[y == BONAFIDE])


def _check_threshold(threshold: float) -> float:
    if math.isnan(threshold):
        raise ValueError("threshold must not be NaN")
    return float(threshold)


def _rates(morph_sorted: FloatArray, bona_sorted: FloatArray, thresholds: FloatArray) -> tuple[FloatArray, FloatArray]:
    """APCER(t) and BPCER(t) for each threshold; both classes must be non-empty. Shapes (T,), (T,)."""
    missed = np.searchsorted(morph_sorted, thresholds, side="left")
    below = np.searchsorted(bona_sorted, thresholds, side="left")
    return missed / morph_sorted.size, (bona_sorted.size - below) / bona_sorted.size


def _missing_class(n_morph: int, n_bonafide: int) -> str | None:
    """A reason when a class is absent, else None."""
    if n_morph == 0 and n_bonafide == 0:
        return "the split is empty"
    if n_morph == 0:
        return "the split has no morphs"
    if n_bonafide == 0:
        return "the split has no bona fide images"
    return None


@dataclass(frozen=True)
class ConfusionMatrix:
    """Counts at one threshold with morph as the positive class.

    tp: morph called morph; tn: bona fide called bona fide; fp: bona fide called morph (BPCER);
    fn: morph called bona fide (APCER).
    """

    tp: int
    tn: int
    fp: int
    fn: int

    @classmethod
    def from_scores(cls, labels: npt.ArrayLike, scores: npt.ArrayLike, threshold: float) -> ConfusionMatrix:
        """Call an image a morph when its score >= threshold and count the four outcomes."""
        y, s = _as_arrays(labels, scores)
        called_morph = s >= _check_threshold(threshold)
        is_morph = y == MORPH
        return cls(
            tp=int(np.sum(is_morph & called_morph)),
            tn=int(np.sum(~is_morph & ~called_morph)),
            fp=int(np.sum(~is_morph & called_morph)),
            fn=int(np.sum(is_morph & ~called_morph)),
        )

    @property
    def n_morph(self) -> int:
        return self.tp + self.fn

    @property
    def n_bonafide(self) -> int:
        return self.tn + self.fp

    @property
    def total(self) -> int:
        return self.n_morph + self.n_bonafide

    @property
    def apcer(self) -> float | None:
        """FN / (TP + FN): share of morphs accepted as bona fide; None without morphs."""
        return self.fn / self.n_morph if self.n_morph else None

    @property
    def bpcer(self) -> float | None:
        """FP / (TN + FP): share of bona fide images called morphs; None without bona fide images."""
        return self.fp / self.n_bonafide if self.n_bonafide else None

    @property
    def accuracy(self) -> float | None:
        """(TP + TN) / total; None for an empty split."""
        return (self.tp + self.tn) / self.total if self.total else None


def apcer(labels: npt.ArrayLike, scores: npt.ArrayLike, t: float) -> float | None:
    """Share of morphs with score < t; None when there are no morphs."""
    return ConfusionMatrix.from_scores(labels, scores, t).apcer


def bpcer(labels: npt.ArrayLike, scores: npt.ArrayLike, t: float) -> float | None:
    """Share of bona fide images with score >= t; None when there are none."""
    return ConfusionMatrix.from_scores(labels, scores, t).bpcer


@dataclass(frozen=True)
class EER:
    """Detection equal error rate: `value` (fraction) at `threshold`, or None with `reason`."""

    value: float | None
    threshold: float | None
    reason: str | None = None

    @property
    def estimable(self) -> bool:
        return self.value is not None


def d_eer(labels: npt.ArrayLike, scores: npt.ArrayLike) -> EER:
    """D-EER: the rate where APCER(t) = BPCER(t).

    t sweeps the unique scores plus one point just above the largest (APCER 1, BPCER 0). APCER - BPCER is
    non-decreasing in t and starts at -1, so it changes sign exactly once. At the first t where it is >= 0:
    if it is 0 there, that t and its rate are returned; otherwise the two operating points on either side
    are joined by a straight line (rates and threshold interpolated with one weight) and its crossing is
    returned. Ties make the curve jump, so no threshold may reach the interpolated rate exactly. A perfect
    detector gives 0 (threshold = lowest morph score), one scoring every image alike 0.5, and an inverted one
    (every morph below every bona fide image) 1.
    """
    return _d_eer_sorted(*_split(labels, scores))


def _d_eer_sorted(morph: FloatArray, bona: FloatArray) -> EER:
    """`d_eer` on sorted morph (Nm,) and bona fide (Nb,) scores."""
    reason = _missing_class(morph.size, bona.size)
    if reason is not None:
        return EER(None, None, f"needs both classes: {reason}")
    grid = np.unique(np.concatenate([morph, bona]))
    thresholds = np.append(grid, np.nextafter(grid[-1], np.inf))
    a, b = _rates(morph, bona, thresholds)
    diff = a - b
    i = int(np.argmax(diff >= 0))
    if diff[i] == 0:
        return EER(float(a[i]), float(thresholds[i]))
    w = -diff[i - 1] / (diff[i] - diff[i - 1])
    value = a[i - 1] + w * (a[i] - a[i - 1])
    threshold = thresholds[i - 1] + w * (thresholds[i] - thresholds[i - 1])
    return EER(float(value), float(threshold))


@dataclass(frozen=True)
class OperatingPoint:
    """One rate read at a threshold that holds the other rate at or below a target, without interpolation.

    fixed: the rate held ("apcer" or "bpcer"); target: its limit (fraction); value: the other rate at the
    threshold; reached: the fixed rate actually reached (<= target); required: how many samples of the
    fixed class the target needs (ceil(1 / target)). value/reached/threshold are None when not estimable.
    """

    fixed: str
    target: float
    value: float | None
    reached: float | None
    threshold: float | None
    required: int
    reason: str | None = None

    @property
    def estimable(self) -> bool:
        return self.value is not None


def _check_target(name: str, target: float) -> tuple[int, float]:
    """Validate a target rate in (0, 1]; return the sample count it needs and the target."""
    if not 0.0 < target <= 1.0:
        raise UsageError(f"{name} must be a rate in (0, 1], got {target}")
    return math.ceil(1.0 / target - _ROUNDING), float(target)


def _not_estimable(fixed: str, required: int, n_fixed: int, n_other: int) -> str | None:
    """Why an operating point cannot be read, or None when it can."""
    classes = ("morphs", "bona fide")
    fixed_class, other_class = classes if fixed == "apcer" else classes[::-1]
    if n_fixed < required:
        return f"needs >= {required} {fixed_class}, split has {n_fixed}"
    if n_other == 0:
        return f"needs {other_class}, split has none"
    return None


def bpcer_at_apcer(labels: npt.ArrayLike, scores: npt.ArrayLike, alpha: float) -> OperatingPoint:
    """BPCER at the conservative threshold for APCER <= alpha (BPCER_N with N = 1 / alpha).

    Morph scores sorted m(1) <= ... <= m(N), k = floor(alpha N), t* = m(k+1) or +inf when k = N: the largest
    threshold with at most k morphs below it. Not estimable with fewer than 1/alpha morphs or no bona fide.
    """
    return _bpcer_at_apcer_sorted(*_split(labels, scores), alpha)


def _bpcer_at_apcer_sorted(morph: FloatArray, bona: FloatArray, alpha: float) -> OperatingPoint:
    required, alpha = _check_target("alpha", alpha)
    reason = _not_estimable("apcer", required, morph.size, bona.size)
    if reason is not None:
        return OperatingPoint("apcer", alpha, None, None, None, required, reason)
    k = math.floor(alpha * morph.size + _ROUNDING)
    t = float(morph[k]) if k < morph.size else math.inf
    a, b = _rates(morph, bona, np.array([t]))
    return OperatingPoint("apcer", alpha, float(b[0]), float(a[0]), t, required)


def apcer_at_bpcer(labels: npt.ArrayLike, scores: npt.ArrayLike, beta: float) -> OperatingPoint:
    """APCER at the conservative threshold for BPCER <= beta (NIST's "APCER at BPCER = beta").

    Bona fide scores sorted b(1) >= ... >= b(N), k = floor(beta N), t* = the next float above b(k+1) (so
    that at most k bona fide scores are >= t*), or -inf when k = N. Not estimable with fewer than 1/beta
    bona fide images or no morphs.
    """
    return _apcer_at_bpcer_sorted(*_split(labels, scores), beta)


def _apcer_at_bpcer_sorted(morph: FloatArray, bona: FloatArray, beta: float) -> OperatingPoint:
    required, beta = _check_target("beta", beta)
    reason = _not_estimable("bpcer", required, bona.size, morph.size)
    if reason is not None:
        return OperatingPoint("bpcer", beta, None, None, None, required, reason)
    k = math.floor(beta * bona.size + _ROUNDING)
    t = float(np.nextafter(bona[::-1][k], np.inf)) if k < bona.size else -math.inf
    a, b = _rates(morph, bona, np.array([t]))
    return OperatingPoint("bpcer", beta, float(a[0]), float(b[0]), t, required)


def roc_auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float | None:
    """ROC AUC = P(morph score > bona fide score) + P(tie) / 2; None when a class is missing."""
    return _roc_auc_sorted(*_split(labels, scores))


def _roc_auc_sorted(morph: FloatArray, bona: FloatArray) -> float | None:
    if morph.size == 0 or bona.size == 0:
        return None
    below = np.searchsorted(bona, morph, side="left")
    at_or_below = np.searchsorted(bona, morph, side="right")
    return float(np.sum(below + at_or_below) / (2.0 * morph.size * bona.size))


def det_points(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """DET curve points (APCER, BPCER), each (T,), at every unique score and just above the largest.

    Ordered by increasing threshold (APCER rising, BPCER falling). SmadlrpError when a class is missing.
    """
    morph, bona = _split(labels, scores)
    reason = _missing_class(morph.size, bona.size)
    if reason is not None:
        raise SmadlrpError(f"a DET curve needs bona fide and morph scores: {reason}")
    grid = np.unique(np.concatenate([morph, bona]))
    return _rates(morph, bona, np.append(grid, np.nextafter(grid[-1], np.inf)))


@dataclass(frozen=True)
class MetricsSummary:
    """Everything `evaluate` reports for one split at one threshold.

    threshold_source says where the threshold came from (e.g. "validation D-EER"); the metrics in
    ORACLE_METRICS ignore it and are read off this split's own curve.
    """

    threshold: float
    threshold_source: str
    confusion: ConfusionMatrix
    eer: EER
    operating_points: Mapping[str, OperatingPoint]
    auc: float | None
    # confidence intervals by metric name: Clopper-Pearson for the rates at the threshold, bootstrap for the
    # curve figures; a string says why a metric with a value has no interval. Empty when none were asked for.
    intervals: Mapping[str, Interval | str] = field(default_factory=dict)

    @property
    def n_morph(self) -> int:
        return self.confusion.n_morph

    @property
    def n_bonafide(self) -> int:
        return self.confusion.n_bonafide

    def value(self, name: str) -> float | None:
        """The value of a gate metric (a name from GATE_METRICS); None when not estimable."""
        if name in self.operating_points:
            return self.operating_points[name].value
        simple: dict[str, float | None] = {
            "accuracy": self.confusion.accuracy,
            "apcer": self.confusion.apcer,
            "bpcer": self.confusion.bpcer,
            "d-eer": self.eer.value,
            "auc": self.auc,
        }
        if name not in simple:
            raise KeyError(name)
        return simple[name]

    def reason(self, name: str) -> str | None:
        """Why a gate metric is not estimable, or None when it has a value."""
        if self.value(name) is not None:
            return None
        if name in self.operating_points:
            return self.operating_points[name].reason
        if name == "d-eer":
            return self.eer.reason
        missing = _missing_class(self.n_morph, self.n_bonafide)
        return f"needs both classes: {missing}" if name == "auc" else missing

    def as_dict(self) -> dict[str, Any]:
        """Flat mapping for JSON: counts, confusion cells, every gate metric, thresholds, reached rates, and with
        intervals `NAME_ci` = [low, high] (or None and `NAME_ci_note` saying why)."""
        out: dict[str, Any] = {
            "n_bonafide": self.n_bonafide,
            "n_morph": self.n_morph,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "tp": self.confusion.tp,
            "tn": self.confusion.tn,
            "fp": self.confusion.fp,
            "fn": self.confusion.fn,
        }
        for name in GATE_METRICS:
            out[name] = self.value(name)
            if self.intervals:
                interval = self.intervals.get(name)
                out[f"{name}_ci"] = [interval.low, interval.high] if isinstance(interval, Interval) else None
                if isinstance(interval, str):
                    out[f"{name}_ci_note"] = interval
            if name == "d-eer":
                out["d-eer_threshold"] = self.eer.threshold
            elif name in self.operating_points:
                point = self.operating_points[name]
                out[f"{name}_threshold"] = point.threshold
                out[f"{name}_{point.fixed}"] = point.reached
        return out


def _operating_points(morph: FloatArray, bona: FloatArray) -> dict[str, OperatingPoint]:
    return {name: (_bpcer_at_apcer_sorted if fixed == "apcer" else _apcer_at_bpcer_sorted)(morph, bona, target)
            for name, (fixed, target) in OPERATING_POINTS.items()}


def curve_figures(labels: npt.ArrayLike, scores: npt.ArrayLike) -> dict[str, float | None]:
    """The threshold-free figures of one score set: D-EER, the OPERATING_POINTS and the AUC (None: n/a)."""
    morph, bona = _split(labels, scores)
    figures = {name: point.value for name, point in _operating_points(morph, bona).items()}
    return {"d-eer": _d_eer_sorted(morph, bona).value, **figures, "auc": _roc_auc_sorted(morph, bona)}


@dataclass(frozen=True)
class IntervalOptions:
    """What confidence intervals `summarize` adds: at `confidence` (e.g. 0.95); `resamples` bootstrap draws
    (0: Clopper-Pearson only) seeded with `seed`; over the clusters `clusters` (N,) names, else over images."""

    confidence: float = 0.95
    resamples: int = 1000
    seed: int = 0
    clusters: Sequence[str] | None = None

    @classmethod
    def over_subjects(cls, confidence: float, resamples: int, seed: int,
                      subjects: Sequence[str]) -> IntervalOptions | None:
        """Options that resample `subjects` (N,) (an image with "" is its own cluster), or images when none is
        known; None when `confidence` is 0 (no intervals)."""
        if confidence == 0:
            return None
        clusters = [s or f"\0image {i}" for i, s in enumerate(subjects)] if any(subjects) else None  # \0: no id
        return cls(confidence, resamples, seed, clusters)


def _intervals(y: npt.NDArray[np.int64], s: FloatArray, confusion: ConfusionMatrix,
               values: Mapping[str, float | None], options: IntervalOptions) -> dict[str, Interval | str]:
    """Clopper-Pearson for accuracy, APCER and BPCER at the threshold; a bootstrap for the curve figures."""
    c = options.confidence
    exact = {"accuracy": clopper_pearson(confusion.tp + confusion.tn, confusion.total, c),
             "apcer": clopper_pearson(confusion.fn, confusion.n_morph, c),
             "bpcer": clopper_pearson(confusion.fp, confusion.n_bonafide, c)}
    out: dict[str, Interval | str] = {name: interval for name, interval in exact.items() if interval is not None}
    if options.resamples > 0 and any(values[name] is not None for name in values):
        booted = bootstrap_intervals(y, s, curve_figures, clusters=options.clusters, resamples=options.resamples,
                                     confidence=c, seed=options.seed)
        out.update({name: booted[name] for name, value in values.items() if value is not None})
    return out


def summarize(
    labels: npt.ArrayLike, scores: npt.ArrayLike, threshold: float, *, threshold_source: str,
    intervals: IntervalOptions | None = None,
) -> MetricsSummary:
    """All metrics for one split: the confusion matrix at `threshold` plus the oracle (curve) ones, and their
    confidence intervals when `intervals` asks for them."""
    y, s = _as_arrays(labels, scores)
    confusion = ConfusionMatrix.from_scores(y, s, threshold)
    morph, bona = np.sort(s[y == MORPH]), np.sort(s[y == BONAFIDE])
    eer, points, auc = _d_eer_sorted(morph, bona), _operating_points(morph, bona), _roc_auc_sorted(morph, bona)
    values = {"d-eer": eer.value, **{name: point.value for name, point in points.items()}, "auc": auc}
    return MetricsSummary(
        threshold=_check_threshold(threshold),
        threshold_source=threshold_source,
        confusion=confusion,
        eer=eer,
        operating_points=points,
        auc=auc,
        intervals=_intervals(y, s, confusion, values, intervals) if intervals is not None else {},
    )


# Metrics of the per-group and per-test-set breakdowns, in table order.
BREAKDOWN_METRICS: tuple[str, ...] = ("apcer", "bpcer", "d-eer", "bpcer10", "bpcer100")


def _applies(summary: MetricsSummary, name: str) -> bool:
    """Whether a part has the classes `name` is about (a bona-fide-only group has no APCER to aggregate)."""
    if name == "apcer":
        return summary.n_morph > 0
    if name == "bpcer":
        return summary.n_bonafide > 0
    return summary.n_morph > 0 and summary.n_bonafide > 0


@dataclass(frozen=True)
class Aggregate:
    """The Average or Worst of one metric over the parts it applies to: `value` with `part` (the worst one), or
    None with `reason`."""

    value: float | None
    part: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Breakdown:
    """One MetricsSummary per part (the groups of a column, or several test sets) at one shared threshold.

    label: what a part is ("morph_type", "test set"); shared_bonafide: every group is compared against the same
    bona fide images (their column is empty), so BPCER is one number; species: the parts are attack species,
    whose worst APCER is ISO/IEC 30107-3's APCER_AP (not so for test sets or systems).
    """

    label: str
    parts: tuple[tuple[str, MetricsSummary], ...]
    shared_bonafide: bool = False
    species: bool = True

    def _values(self, name: str) -> tuple[list[tuple[str, float]], list[str]]:
        """(part, value) where estimable, and the parts where `name` applies but is not estimable."""
        found, missing = [], []
        for part, summary in self.parts:
            if _applies(summary, name):
                value = summary.value(name)
                if value is None:
                    missing.append(part)
                else:
                    found.append((part, value))
        return found, missing

    def _not_estimable(self, name: str, missing: list[str]) -> str:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        return f"{name} is not estimable for {', '.join(missing[:3])}{more}"

    def average(self, name: str) -> Aggregate:
        """Mean of `name` over the parts it applies to; None unless every one of them has a value."""
        found, missing = self._values(name)
        if missing or not found:
            return Aggregate(None, reason=self._not_estimable(name, missing) if missing else "no part applies")
        return Aggregate(float(np.mean([value for _, value in found])))

    def worst(self, name: str) -> Aggregate:
        """The highest `name` (every breakdown metric is an error rate) and its part (the first on ties)."""
        found, missing = self._values(name)
        if missing or not found:
            return Aggregate(None, reason=self._not_estimable(name, missing) if missing else "no part applies")
        part, value = max(found, key=lambda item: item[1])
        return Aggregate(value, part)

    @property
    def apcer_ap(self) -> Aggregate:
        """ISO/IEC 30107-3's APCER_AP: the highest APCER over the attack species (parts with morphs)."""
        return self.worst("apcer")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: every part's metrics, the Average and Worst of each breakdown metric, and APCER_AP."""
        def aggregate(agg: Aggregate) -> dict[str, Any]:
            return {"value": agg.value, "part": agg.part, "reason": agg.reason}

        return {
            "label": self.label,
            "shared_bonafide": self.shared_bonafide,
            "parts": [{"name": name, **summary.as_dict()} for name, summary in self.parts],
            "average": {name: aggregate(self.average(name)) for name in BREAKDOWN_METRICS},
            "worst": {name: aggregate(self.worst(name)) for name in BREAKDOWN_METRICS},
            **({"apcer_ap": self.apcer_ap.value, "apcer_ap_part": self.apcer_ap.part} if self.species else {}),
        }


def group_breakdown(labels: npt.ArrayLike, scores: npt.ArrayLike, groups: Sequence[str] | npt.ArrayLike,
                    threshold: float, *, column: str, threshold_source: str,
                    intervals: IntervalOptions | None = None) -> Breakdown:
    """Metrics per value of a group column (groups (N,): each image's value) at one threshold.

    A group holds the images with its value plus the bona fide images with no value: a column that only morphs
    carry (the morphing method, an attack species) compares every group with all bona fide images, as ISO/IEC
    30107-3 counts APCER per species against one BPCER. `intervals` as for `summarize` (clusters (N,) are
    taken per group).
    """
    y, s = _as_arrays(labels, scores)
    g = np.asarray(groups, dtype=str)
    if g.shape != y.shape:
        raise ValueError(f"groups must have one entry per image, got {g.shape} for {y.shape}")
    shared = (y == BONAFIDE) & (g == "")
    names = sorted(set(g[~shared].tolist()))
    parts = []
    for name in names:
        member = (g == name) | shared
        options = intervals
        if intervals is not None and intervals.clusters is not None:
            options = replace(intervals, clusters=list(np.asarray(intervals.clusters, dtype=str)[member]))
        parts.append((name or "(none)", summarize(y[member], s[member], threshold,
                                                  threshold_source=threshold_source, intervals=options)))
    return Breakdown(column, tuple(parts), shared_bonafide=bool(shared.any()) and not bool(
        ((y == BONAFIDE) & (g != "")).any()))


@dataclass(frozen=True)
class Gate:
    """A limit on one metric: `metric` is a name from GATE_METRICS, `limit` a fraction in [0, 1]."""

    metric: str
    limit: float


def parse_gate(text: str) -> Gate:
    """Parse "NAME=VALUE" (e.g. "d-eer=0.05" or "d-eer=5%"); UsageError for an unknown name or a bad value."""
    name, sep, value_text = text.partition("=")
    name = name.strip().lower()
    value_text = value_text.strip()
    if not sep or not name or not value_text:
        raise UsageError(f"gate {text!r} must look like NAME=VALUE, e.g. d-eer=0.05")
    if name not in GATE_METRICS:
        raise UsageError(f"gate {text!r}: unknown metric {name!r}; valid metrics: {', '.join(GATE_METRICS)}")
    percent = value_text.endswith("%")
    try:
        limit = float(value_text.removesuffix("%")) / (100.0 if percent else 1.0)
    except ValueError:
        raise UsageError(f"gate {text!r}: {value_text!r} is not a number") from None
    if not 0.0 <= limit <= 1.0:
        raise UsageError(f"gate {text!r}: the limit must be a rate between 0 and 1 (or 0% and 100%)")
    return Gate(name, limit)


def _gate_failure(summary: MetricsSummary, gate: Gate, above: bool) -> str | None:
    """The message for one failed gate, or None when it passes."""
    value = summary.value(gate.metric)
    side = "above" if above else "below"
    if value is None:
        return (
            f"{gate.metric}: cannot check the limit ({side} {gate.limit:.4g} fails): not estimable, "
            f"{summary.reason(gate.metric)}"
        )
    if (value > gate.limit) if above else (value < gate.limit):
        return f"{gate.metric} = {value:.4g} is {side} the limit {gate.limit:.4g}"
    return None


@dataclass(frozen=True)
class GateResult:
    """One gate checked on a summary: the measured value (None when not estimable) and, when it fails, why."""

    gate: Gate
    above: bool  # True: fails when the value is above the limit; False: when it is below
    value: float | None
    failure: str | None  # None when the gate passes

    @property
    def passed(self) -> bool:
        return self.failure is None

    @property
    def name(self) -> str:
        """What the gate requires, e.g. "d-eer <= 0.05"."""
        return f"{self.gate.metric} {'<=' if self.above else '>='} {self.gate.limit:.4g}"


def gate_results(summary: MetricsSummary, fail_above: Sequence[Gate], fail_below: Sequence[Gate]) -> list[GateResult]:
    """Every gate with its measured value, fail_above gates first, each in the order given."""
    checks = [(gate, True) for gate in fail_above] + [(gate, False) for gate in fail_below]
    return [GateResult(gate, above, summary.value(gate.metric), _gate_failure(summary, gate, above))
            for gate, above in checks]


def check_gates(summary: MetricsSummary, fail_above: Sequence[Gate], fail_below: Sequence[Gate]) -> list[str]:
    """One message per failed gate: a value strictly above a fail_above limit or strictly below a fail_below
    limit, or a gated metric that is not estimable. An empty list means every gate passed."""
    return [r.failure for r in gate_results(summary, fail_above, fail_below) if r.failure is not None]
