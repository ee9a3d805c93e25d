"""Gates: limits on metrics (`--fail-above`/`--fail-below NAME=LIMIT`), parsed by name and checked on a summary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from smadlrp.core.errors import UsageError
from smadlrp.evaluation.registry import GATE_METRICS, gate_metric
from smadlrp.evaluation.summary import MetricsSummary


@dataclass(frozen=True)
class Gate:
    """A limit on one metric: `metric` is a key from GATE_METRICS (never an alias), `limit` a fraction in [0, 1]."""

    metric: str
    limit: float


def parse_gate(text: str) -> Gate:
    """Parse "NAME=VALUE" (e.g. "d-eer=0.05" or "d-eer=5%"); NAME is a gateable metric's key or alias (any case)
    and the Gate holds its key. UsageError for an unknown name or a bad value."""
    name, sep, value_text = text.partition("=")
    name = name.strip().lower()
    value_text = value_text.strip()
    if not sep or not name or not value_text:
        raise UsageError(f"gate {text!r} must look like NAME=VALUE, e.g. d-eer=0.05")
    metric = gate_metric(name)
    if metric is None:
        raise UsageError(f"gate {text!r}: unknown metric {name!r}; valid metrics: {', '.join(GATE_METRICS)}")
    percent = value_text.endswith("%")
    try:
        limit = float(value_text.removesuffix("%")) / (100.0 if percent else 1.0)
    except ValueError:
        raise UsageError(f"gate {text!r}: {value_text!r} is not a number") from None
    if not 0.0 <= limit <= 1.0:
        raise UsageError(f"gate {text!r}: the limit must be a rate between 0 and 1 (or 0% and 100%)")
    return Gate(metric.key, limit)


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
