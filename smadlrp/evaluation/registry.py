"""The one table of every metric smadlrp reports: key, meaning, unit, direction, gate, interval and other names.

JSON keys (`MetricsSummary.as_dict()`, `Breakdown.as_dict()`), gate names (`--fail-above`/`--fail-below`), the
tables of `evaluation.report` and the metric table of docs/metrics.md all read METRICS. A key is lower case; a
gate accepts a gateable metric by its key or any of its aliases, in any case.

Metrics and threshold criteria have distinct names: the metric `bpcer10` is the BPCER at APCER <= 10 % (BPCER_10
of ISO/IEC 30107-3); the criterion `max-bpcer10` (`--threshold max-bpcer10`, `val-max-bpcer10`, see
`evaluation.thresholds`) is the threshold where BPCER <= 10 %, the one the metric `apcer@bpcer10` is read at.
Earlier versions named the criteria without `max-`, and those names are still read, so `bpcer10` in a
`--threshold` means the criterion. Each entry's `note` says so.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Unit = Literal["rate", "probability", "threshold", "count", "text"]
Direction = Literal["lower", "higher", ""]  # which way is better; "" for values that are not a figure of merit
Basis = Literal["threshold", "oracle", "threshold-free", ""]  # where a value is read; "" for counts of the split
IntervalMethod = Literal["clopper-pearson", "bootstrap", ""]  # "" when the metric has no confidence interval
Scope = Literal["summary", "breakdown"]  # the JSON object that holds the key


@dataclass(frozen=True)
class Metric:
    """One reported value: `key` in JSON and gates, `meaning` (one line), `formula` (the short definition the
    tables show), and how to read it. `operating_point` is (rate held fixed, its target as a fraction) for the
    metrics read at a conservative threshold; `aliases` are the other names a gate accepts (lower case);
    `iso20059` the metric's name in ISO/IEC 20059:2025 and NIST FATE MORPH (MACER, BSCER), when it has one."""

    key: str
    meaning: str
    unit: Unit
    direction: Direction = ""
    basis: Basis = ""
    formula: str = ""
    gateable: bool = False
    interval: IntervalMethod = ""
    operating_point: tuple[str, float] | None = None
    aliases: tuple[str, ...] = ()
    note: str = ""
    scope: Scope = "summary"
    iso20059: str = ""

    @property
    def oracle(self) -> bool:
        """Read off the evaluated split's own curve: optimistic when that split is the test split."""
        return self.basis == "oracle"

    @property
    def has_interval(self) -> bool:
        return bool(self.interval)

    @property
    def names(self) -> tuple[str, ...]:
        """The key and every alias."""
        return (self.key, *self.aliases)

    @property
    def heading(self) -> str:
        """A column heading: the key in capitals with its ISO/IEC 20059 name, e.g. "BPCER (BSCER)"."""
        return self.key.upper() + (f" ({self.iso20059})" if self.iso20059 else "")

    @property
    def explanation(self) -> str:
        """The formula with the ISO/IEC 20059 name, e.g. "FN / morphs; ISO/IEC 20059: MACER"."""
        return self.formula + (f"; ISO/IEC 20059: {self.iso20059}" if self.iso20059 else "")


def _criterion_note(criterion: str) -> str:
    """The note of a metric read at the threshold of a criterion of `evaluation.thresholds`."""
    return f"its threshold is the criterion `{criterion}`"


def _point(key: str, fixed: str, target: float, aliases: tuple[str, ...], note: str = "", iso20059: str = ""
           ) -> Metric:
    """An operating point: the other rate at the conservative threshold for `fixed` <= `target`."""
    other = "bpcer" if fixed == "apcer" else "apcer"
    criterion = f"max-{fixed}{100 * target:g}"
    return Metric(key, f"oracle {other.upper()} at the conservative threshold for {fixed.upper()} <= "
                       f"{100 * target:g} %", "rate", "lower", "oracle",
                  f"{other.upper()} @ {fixed.upper()} {100 * target:g} %", gateable=True, interval="bootstrap",
                  operating_point=(fixed, target), aliases=aliases,
                  note="; ".join(filter(None, (_criterion_note(criterion), note))), iso20059=iso20059)


# The gateable metrics, in table order.
_GATED: tuple[Metric, ...] = (
    Metric("accuracy", "share of images called correctly at the threshold (depends on the class balance)", "rate",
           "higher", "threshold", "(TP + TN) / all", gateable=True, interval="clopper-pearson"),
    Metric("apcer", "share of morphs accepted as bona fide at the threshold", "rate", "lower", "threshold",
           "FN / morphs", gateable=True, interval="clopper-pearson", aliases=("macer",), iso20059="MACER"),
    Metric("bpcer", "share of bona fide images called morphs at the threshold", "rate", "lower", "threshold",
           "FP / bona fide", gateable=True, interval="clopper-pearson", aliases=("bscer",), iso20059="BSCER"),
    Metric("d-eer", "detection equal error rate: the rate where APCER = BPCER", "rate", "lower", "oracle",
           "APCER = BPCER", gateable=True, interval="bootstrap", aliases=("d_eer",),
           note=_criterion_note("eer") + ", which is not a gate name"),
    _point("bpcer10", "apcer", 0.10, ("bpcer@apcer10", "bscer@macer10"),
           "the criterion `max-bpcer10` (earlier `bpcer10`) is another threshold: BPCER <= 10 %"),
    _point("bpcer20", "apcer", 0.05, ("bpcer@apcer5", "bscer@macer5")),
    _point("bpcer100", "apcer", 0.01, ("bpcer@apcer1", "bscer@macer1")),
    _point("apcer@bpcer10", "bpcer", 0.10, ("macer@bscer10",), iso20059="MACER @ BSCER 10 %"),
    _point("apcer@bpcer1", "bpcer", 0.01, ("macer@bscer1",), iso20059="MACER @ BSCER 1 %"),
    Metric("auc", "ROC AUC: P(morph score > bona fide score) + P(tie) / 2", "probability", "higher",
           "threshold-free", "ROC area", gateable=True, interval="bootstrap"),
)


def _companions(metric: Metric) -> tuple[Metric, ...]:
    """The JSON keys that come with a gateable metric: the threshold it is read at and the fixed rate reached."""
    if metric.key == "d-eer":
        return (Metric("d-eer_threshold", "the threshold at the D-EER (interpolated between two operating points)",
                       "threshold", basis="oracle"),)
    if metric.operating_point is None:
        return ()
    fixed, target = metric.operating_point
    return (Metric(f"{metric.key}_threshold", f"the conservative threshold {metric.key} is read at",
                   "threshold", basis="oracle"),
            Metric(f"{metric.key}_{fixed}", f"the {fixed.upper()} reached at {metric.key}_threshold "
                                            f"(<= {100 * target:g} %)", "rate", basis="oracle"))


METRICS: tuple[Metric, ...] = (
    Metric("n_bonafide", "bona fide images in the split", "count"),
    Metric("n_morph", "morphs in the split", "count"),
    Metric("threshold", "the decision threshold t: an image is called a morph when P(morph) >= t", "threshold",
           basis="threshold"),
    Metric("threshold_source", "where the threshold came from (e.g. validation D-EER, fixed)", "text",
           basis="threshold"),
    Metric("tp", "morphs called morph at the threshold", "count", basis="threshold"),
    Metric("tn", "bona fide images called bona fide at the threshold", "count", basis="threshold"),
    Metric("fp", "bona fide images called morph at the threshold (count toward BPCER)", "count", basis="threshold"),
    Metric("fn", "morphs called bona fide at the threshold (count toward APCER)", "count", basis="threshold"),
    *(entry for metric in _GATED for entry in (metric, *_companions(metric))),
    Metric("apcer_ap", "ISO/IEC 30107-3 APCER_AP: the highest APCER over the attack species (groups)", "rate",
           "lower", "threshold", "max APCER over species", scope="breakdown"),
    Metric("apcer_ap_part", "the group whose APCER is APCER_AP", "text", basis="threshold", scope="breakdown"),
)
BY_KEY: Mapping[str, Metric] = {metric.key: metric for metric in METRICS}

# Names a gate can check, in table order; the same keys appear in `MetricsSummary.as_dict()`.
GATE_METRICS: tuple[str, ...] = tuple(metric.key for metric in METRICS if metric.gateable)
# Metrics read off the evaluated split's own curve: optimistic ("oracle") when that split is the test split.
ORACLE_METRICS: tuple[str, ...] = tuple(key for key in GATE_METRICS if BY_KEY[key].oracle)
# Operating points reported by `summarize`: name -> (rate held fixed, its target).
OPERATING_POINTS: Mapping[str, tuple[str, float]] = {
    metric.key: metric.operating_point for metric in METRICS if metric.operating_point is not None}
# The columns of the per-group and per-test-set breakdowns, and of the robustness (conditions) table.
BREAKDOWN_METRICS: tuple[str, ...] = ("apcer", "bpcer", "d-eer", "bpcer10", "bpcer100")
CONDITION_METRICS: tuple[str, ...] = ("d-eer", "apcer", "bpcer", "bpcer10", "apcer@bpcer10")

_GATE_NAMES: Mapping[str, str] = {name: key for key in GATE_METRICS for name in BY_KEY[key].names}


def gate_metric(name: str) -> Metric | None:
    """The gateable metric a name (key or alias, any case, surrounding spaces ignored) means; None if none."""
    key = _GATE_NAMES.get(name.strip().lower())
    return None if key is None else BY_KEY[key]


# docs/metrics.md holds the table between these two lines, generated by `metrics_markdown`.
TABLE_START = "<!-- metric table: generated from smadlrp.evaluation.registry -->"
TABLE_END = "<!-- end of metric table -->"


def metrics_markdown() -> str:
    """The metric table of docs/metrics.md: one row per key of METRICS, with its markers (Markdown text)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = ["| key | meaning | unit | better | read | gate | interval | other names |",
            "| :--- | :--- | :--- | :--- | :--- | :--- | :--- | :--- |"]
    for m in METRICS:
        meaning = m.meaning + (f"; {m.note}" if m.note else "")
        rows.append("| " + " | ".join(cell(c) for c in (
            f"`{m.key}`", meaning, m.unit, m.direction or "-", m.basis or "-", "yes" if m.gateable else "-",
            m.interval or "-", ", ".join(f"`{a}`" for a in m.aliases) or "-")) + " |")
    return "\n".join([TABLE_START, "", *rows, "", TABLE_END])


def with_metrics_table(text: str) -> str:
    """A page's text with the part between TABLE_START and TABLE_END replaced by `metrics_markdown()`."""
    start, end = text.index(TABLE_START), text.index(TABLE_END) + len(TABLE_END)
    return text[:start] + metrics_markdown() + text[end:]


if __name__ == "__main__":  # python -m smadlrp.evaluation.registry docs/metrics.md: regenerate the table
    page = Path(sys.argv[1])
    page.write_text(with_metrics_table(page.read_text(encoding="utf-8")), encoding="utf-8")
