"""Numbers on the pages: the formatters every table and template uses (the terminal tables' rounding, in one place),
and the evaluation objects behind a JSON document, a MetricsSummary or Breakdown rebuilt from what `as_dict` wrote,
so the page formats every number with the terminal tables' own helpers (`evaluation.report`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from smadlrp.core.errors import SmadlrpError
from smadlrp.evaluation.breakdown import Breakdown
from smadlrp.evaluation.intervals import Interval
from smadlrp.evaluation.rates import EER, ConfusionMatrix, OperatingPoint
from smadlrp.evaluation.registry import BY_KEY, GATE_METRICS, OPERATING_POINTS
from smadlrp.evaluation.report import percent, threshold_text
from smadlrp.evaluation.summary import MetricsSummary

NOT_IN_JSON = "not estimable on this split"  # the JSON keeps a value of None, not the reason
MISSING = "—"  # a cell without a value (a run without this row, a region without pixels)

# The formatters of every page. Rates and thresholds are `evaluation.report`'s (what `evaluate` prints): a rate in %
# with two decimals ("12.34 %"), an interval's bounds in % with one, a threshold with four decimals; the others
# round as the terminal tables of predict, regions, compare-rules and explain round.


def fixed(value: Any, digits: int) -> str:
    """A float with `digits` decimals (compare-rules' columns, SpRAy's mean P(attack)); "n/a" for None (a JSON
    null)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def share(value: Any) -> str:
    """A share in [0, 1] in % with one decimal, "-" where it is undefined (None or NaN), as the regions table
    prints it."""
    return "-" if value is None or value != value else f"{100 * value:.1f}"


def probability(value: float) -> str:
    """A score such as P(morph) with four decimals, as predict's table prints it."""
    return f"{value:.4f}"


def signed(value: float) -> str:
    """A change of a score, signed, with four decimals."""
    return f"{value:+.4f}"


def logit(value: Any) -> str:
    """A logit with four significant digits, as explain prints it; "n/a" for None."""
    return "n/a" if value is None else f"{value:.4g}"


FILTERS = {"percent": percent, "threshold": threshold_text, "probability": probability, "signed": signed,
           "share": share}  # the Jinja filters of the templates


def _number(value: Any) -> float | None:
    """A JSON number (to_jsonable writes +-inf as strings); None stays None."""
    if value is None:
        return None
    if isinstance(value, str) and value in ("inf", "-inf"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not a number: {value!r}")
    return float(value)


def summary_from_dict(doc: Mapping[str, Any], where: str) -> MetricsSummary:
    """The MetricsSummary that `MetricsSummary.as_dict` turned into `doc`; SmadlrpError naming `where` when a key
    is missing or not a number. Intervals keep their bounds; their level is not in the JSON (NaN here)."""
    try:
        confusion = ConfusionMatrix(*(int(doc[key]) for key in ("tp", "tn", "fp", "fn")))
        eer_value = _number(doc["d-eer"])
        eer = EER(eer_value, _number(doc.get("d-eer_threshold")), None if eer_value is not None else NOT_IN_JSON)
        points = {}
        for name, (fixed, target) in OPERATING_POINTS.items():
            value = _number(doc[name])
            points[name] = OperatingPoint(fixed, target, value, _number(doc.get(f"{name}_{fixed}")),
                                          _number(doc.get(f"{name}_threshold")), 0,
                                          None if value is not None else NOT_IN_JSON)
        intervals: dict[str, Interval | str] = {}
        for name in GATE_METRICS:
            bounds, note = doc.get(f"{name}_ci"), doc.get(f"{name}_ci_note")
            if isinstance(bounds, list) and len(bounds) == 2:
                low, high = (_number(b) for b in bounds)
                if low is not None and high is not None:
                    intervals[name] = Interval(low, high, float("nan"), BY_KEY[name].interval)
            elif isinstance(note, str):
                intervals[name] = note
        threshold = _number(doc["threshold"])
        return MetricsSummary(threshold if threshold is not None else float("nan"), str(doc["threshold_source"]),
                              confusion, eer, points, _number(doc["auc"]), intervals)
    except (KeyError, TypeError, ValueError) as exc:
        raise SmadlrpError(f"{where}: not a metrics summary written by smadlrp ({exc.__class__.__name__}: "
                           f"{exc})") from None


def breakdown_from_dict(doc: Mapping[str, Any], where: str) -> Breakdown:
    """The Breakdown that `Breakdown.as_dict` turned into `doc` (its Average and Worst are recomputed from the
    parts, as the JSON's were)."""
    try:
        parts = tuple((str(part["name"]), summary_from_dict(part, f"{where}, part {part.get('name')}"))
                      for part in doc["parts"])
        return Breakdown(str(doc["label"]), parts, bool(doc.get("shared_bonafide")), species="apcer_ap" in doc)
    except (KeyError, TypeError, AttributeError) as exc:
        raise SmadlrpError(f"{where}: not a group breakdown written by smadlrp ({exc})") from None
