"""The S-MAD metrics API in one import: re-exports rates, summaries, breakdowns, gates and the metric registry.

Each name lives in the module with its one job: `rates` (confusion matrix, APCER/BPCER, D-EER, operating
points, AUC, DET points), `summary` (MetricsSummary with intervals), `breakdown` (per-group tables, Average,
Worst, APCER_AP), `gates` (parse_gate, gate_results) and `registry` (every metric's key, meaning and names).
"""

from __future__ import annotations

from smadlrp.evaluation.breakdown import Aggregate, Breakdown, group_breakdown
from smadlrp.evaluation.gates import Gate, GateResult, check_gates, gate_results, parse_gate
from smadlrp.evaluation.rates import (
    BONAFIDE,
    EER,
    MORPH,
    ConfusionMatrix,
    FloatArray,
    OperatingPoint,
    apcer,
    apcer_at_bpcer,
    bpcer,
    bpcer_at_apcer,
    d_eer,
    det_points,
    roc_auc,
)
from smadlrp.evaluation.registry import (
    BREAKDOWN_METRICS,
    GATE_METRICS,
    METRICS,
    OPERATING_POINTS,
    ORACLE_METRICS,
    Metric,
)
from smadlrp.evaluation.summary import IntervalOptions, MetricsSummary, curve_figures, summarize

__all__ = [
    "BONAFIDE",
    "BREAKDOWN_METRICS",
    "EER",
    "GATE_METRICS",
    "METRICS",
    "MORPH",
    "OPERATING_POINTS",
    "ORACLE_METRICS",
    "Aggregate",
    "Breakdown",
    "ConfusionMatrix",
    "FloatArray",
    "Gate",
    "GateResult",
    "IntervalOptions",
    "Metric",
    "MetricsSummary",
    "OperatingPoint",
    "apcer",
    "apcer_at_bpcer",
    "bpcer",
    "bpcer_at_apcer",
    "check_gates",
    "curve_figures",
    "d_eer",
    "det_points",
    "gate_results",
    "group_breakdown",
    "parse_gate",
    "roc_auc",
    "summarize",
]
