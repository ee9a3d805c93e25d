"""The metric registry: docs/metrics.md shows it, gates accept every name in it, and the JSON uses only its keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from smadlrp.evaluation.breakdown import group_breakdown
from smadlrp.evaluation.gates import Gate, parse_gate
from smadlrp.evaluation.registry import (
    BREAKDOWN_METRICS,
    BY_KEY,
    CONDITION_METRICS,
    GATE_METRICS,
    METRICS,
    OPERATING_POINTS,
    ORACLE_METRICS,
    TABLE_END,
    TABLE_START,
    Metric,
    gate_metric,
    metrics_markdown,
)
from smadlrp.evaluation.summary import IntervalOptions, summarize

PAGE = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
GATED = [metric for metric in METRICS if metric.gateable]


def _labels_and_scores(n: int = 240) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, n)
    return labels, np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1)


def test_docs_metric_table_is_generated_from_the_registry() -> None:
    text = PAGE.read_text(encoding="utf-8")
    start, end = text.index(TABLE_START), text.index(TABLE_END) + len(TABLE_END)
    assert text[start:end] == metrics_markdown(), \
        "docs/metrics.md: stale metric table; run `python -m smadlrp.evaluation.registry docs/metrics.md`"
    for metric in METRICS:
        assert f"| `{metric.key}` |" in text


def test_keys_and_gate_names_are_unique_and_lower_case() -> None:
    keys = [metric.key for metric in METRICS]
    assert len(keys) == len(set(keys)) == len(BY_KEY)
    names = [name for metric in GATED for name in metric.names]
    assert len(names) == len(set(names)), "a gate name means two metrics"
    assert all(name == name.strip().lower() and "=" not in name for name in names)
    assert "eer" not in names  # the criterion `eer` is a threshold, not a metric


def test_derived_lists_read_the_registry() -> None:
    assert GATE_METRICS == ("accuracy", "apcer", "bpcer", "d-eer", "bpcer10", "bpcer20", "bpcer100",
                            "apcer@bpcer10", "apcer@bpcer1", "auc")
    assert ORACLE_METRICS == tuple(key for key in GATE_METRICS if BY_KEY[key].oracle)
    assert dict(OPERATING_POINTS) == {"bpcer10": ("apcer", 0.10), "bpcer20": ("apcer", 0.05),
                                      "bpcer100": ("apcer", 0.01), "apcer@bpcer10": ("bpcer", 0.10),
                                      "apcer@bpcer1": ("bpcer", 0.01)}
    assert set(BREAKDOWN_METRICS) | set(CONDITION_METRICS) <= set(GATE_METRICS)
    assert all(BY_KEY[key].direction == "lower" for key in BREAKDOWN_METRICS)  # Worst is the highest value


@pytest.mark.parametrize("metric", GATED, ids=lambda metric: metric.key)
def test_every_gate_metric_parses_by_key_and_alias(metric: Metric) -> None:
    for name in metric.names:
        assert parse_gate(f"{name}=0.25") == Gate(metric.key, 0.25)
        assert parse_gate(f" {name.upper()} = 25% ") == Gate(metric.key, 0.25)
        assert gate_metric(name) is metric


def test_standard_names_are_aliases() -> None:
    assert parse_gate("macer=0.1").metric == "apcer" and parse_gate("BSCER=0.1").metric == "bpcer"
    assert parse_gate("bpcer@apcer10=0.1").metric == "bpcer10"
    assert parse_gate("macer@bscer1=0.1").metric == "apcer@bpcer1"
    assert gate_metric("n_morph") is None and gate_metric("bpcer1") is None


def test_every_json_key_of_a_summary_is_in_the_registry() -> None:
    labels, scores = _labels_and_scores()
    intervals = IntervalOptions(0.9, resamples=20, seed=0)
    keys = set(summarize(labels, scores, 0.5, threshold_source="fixed", intervals=intervals).as_dict())
    keys |= set(summarize(labels[labels == 1], scores[labels == 1], 0.5, threshold_source="fixed",
                          intervals=intervals).as_dict())  # one class: n/a values and no intervals
    with_interval = {f"{m.key}_{suffix}" for m in METRICS if m.has_interval for suffix in ("ci", "ci_note")}
    unknown = keys - set(BY_KEY) - with_interval
    assert not unknown, f"JSON keys missing from the registry: {sorted(unknown)}"
    assert {m.key for m in METRICS if m.scope == "summary"} <= keys


def test_breakdown_json_keys_are_in_the_registry() -> None:
    labels, scores = _labels_and_scores()
    groups = np.where(labels == 1, np.array(["a", "b"])[np.arange(labels.size) % 2], "")
    out = group_breakdown(labels, scores, groups, 0.5, column="morph_type", threshold_source="fixed").as_dict()
    assert {m.key for m in METRICS if m.scope == "breakdown"} <= set(out)
    assert set(out["average"]) == set(BREAKDOWN_METRICS)
