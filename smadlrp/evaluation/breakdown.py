"""Metrics per part (groups of a column, test sets, systems) at one threshold, with Average, Worst and APCER_AP."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from smadlrp.evaluation.rates import BONAFIDE, as_arrays
from smadlrp.evaluation.registry import BREAKDOWN_METRICS
from smadlrp.evaluation.summary import IntervalOptions, MetricsSummary, summarize


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
    y, s = as_arrays(labels, scores)
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
