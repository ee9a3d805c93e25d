"""One split's metrics at one threshold: MetricsSummary, `summarize` and its confidence intervals."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from smadlrp.evaluation.intervals import Interval, bootstrap_intervals, clopper_pearson
from smadlrp.evaluation.rates import (
    BONAFIDE,
    EER,
    MORPH,
    ConfusionMatrix,
    FloatArray,
    OperatingPoint,
    apcer_at_bpcer_sorted,
    as_arrays,
    bpcer_at_apcer_sorted,
    check_threshold,
    class_scores,
    d_eer_sorted,
    missing_class,
    roc_auc_sorted,
)
from smadlrp.evaluation.registry import GATE_METRICS, OPERATING_POINTS


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
        missing = missing_class(self.n_morph, self.n_bonafide)
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
    return {name: (bpcer_at_apcer_sorted if fixed == "apcer" else apcer_at_bpcer_sorted)(morph, bona, target)
            for name, (fixed, target) in OPERATING_POINTS.items()}


def curve_figures(labels: npt.ArrayLike, scores: npt.ArrayLike) -> dict[str, float | None]:
    """The threshold-free figures of one score set: D-EER, the OPERATING_POINTS and the AUC (None: n/a)."""
    morph, bona = class_scores(labels, scores)
    figures = {name: point.value for name, point in _operating_points(morph, bona).items()}
    return {"d-eer": d_eer_sorted(morph, bona).value, **figures, "auc": roc_auc_sorted(morph, bona)}


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
    y, s = as_arrays(labels, scores)
    confusion = ConfusionMatrix.from_scores(y, s, threshold)
    morph, bona = np.sort(s[y == MORPH]), np.sort(s[y == BONAFIDE])
    eer, points, auc = d_eer_sorted(morph, bona), _operating_points(morph, bona), roc_auc_sorted(morph, bona)
    values = {"d-eer": eer.value, **{name: point.value for name, point in points.items()}, "auc": auc}
    return MetricsSummary(
        threshold=check_threshold(threshold),
        threshold_source=threshold_source,
        confusion=confusion,
        eer=eer,
        operating_points=points,
        auc=auc,
        intervals=_intervals(y, s, confusion, values, intervals) if intervals is not None else {},
    )
