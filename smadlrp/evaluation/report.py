"""Renderings of results: rich tables, a Markdown summary, and JSON-ready values. Nothing is printed here."""

from __future__ import annotations

import dataclasses
import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from smadlrp.evaluation.breakdown import Aggregate, Breakdown
from smadlrp.evaluation.gates import GateResult
from smadlrp.evaluation.intervals import Interval
from smadlrp.evaluation.rates import ConfusionMatrix
from smadlrp.evaluation.registry import BREAKDOWN_METRICS, BY_KEY, CONDITION_METRICS, GATE_METRICS, ORACLE_METRICS
from smadlrp.evaluation.summary import MetricsSummary
from smadlrp.evaluation.thresholds import CRITERIA, describe

# What each gate metric means (its registry formula), in table order.
METRIC_MEANINGS: Mapping[str, str] = {name: BY_KEY[name].explanation for name in GATE_METRICS}
# The ISO/IEC 20059:2025 (and NIST FATE MORPH) names of the ISO/IEC 30107-3 rates, for table captions.
VOCABULARY_NOTE = "APCER = MACER, BPCER = BSCER (ISO/IEC 20059, NIST FATE MORPH)"
ORACLE_NOTE = "oracle: read off this split's own scores; choose thresholds on the validation split"


def percent(value: float | None) -> str:
    """A rate in [0, 1] as "12.34 %"; "n/a" for None."""
    return "n/a" if value is None else f"{100.0 * value:.2f} %"


def threshold_text(value: float | None) -> str:
    """A score threshold with 4 decimals ("+inf"/"-inf" for the extremes, "n/a" for None)."""
    if value is None:
        return "n/a"
    return f"{value:+}" if math.isinf(value) else f"{value:.4f}"


def value_text(summary: MetricsSummary, name: str) -> str:
    """A metric's value in % (the AUC as a number) with its confidence interval when it has one:
    "7.05 % [4.1, 11.2]", or "[CI n/a]" when the interval is not estimable; "n/a" when the value is not."""
    value = summary.value(name)
    if value is None:
        return "n/a"
    interval = summary.intervals.get(name)
    if BY_KEY[name].unit != "rate":
        text, bounds = f"{value:.4f}", (lambda i: f" [{i.low:.3f}, {i.high:.3f}]")
    else:
        text, bounds = percent(value), (lambda i: f" [{100 * i.low:.1f}, {100 * i.high:.1f}]")
    if isinstance(interval, str):
        return text + " [CI n/a]"  # the JSON's NAME_ci_note and the metrics table say why
    return text + (bounds(interval) if isinstance(interval, Interval) else "")


def interval_note(summaries: Sequence[MetricsSummary]) -> str:
    """What the bracketed intervals are, e.g. "[95 % CI: clopper-pearson; bootstrap over images]"; "" without."""
    found = [i for summary in summaries for i in summary.intervals.values() if isinstance(i, Interval)]
    if not found:
        return ""
    methods = {i.method for i in found}
    pieces = ["Clopper-Pearson (exact binomial) at the threshold"] if "clopper-pearson" in methods else []
    units = sorted(m.removeprefix("bootstrap over ") for m in methods if m.startswith("bootstrap over "))
    if units:
        pieces.append(f"bootstrap over {' or '.join(units)} for the curve figures")
    methods_text = "; ".join(pieces)
    return f"[{100 * found[0].confidence:g} % confidence intervals: {methods_text}]"


def metric_cells(summary: MetricsSummary, name: str) -> tuple[str, str]:
    """Value and note of one gate metric: the value (with its interval) and the threshold behind it, or "n/a"
    with why it is not estimable."""
    if summary.value(name) is None:
        return "n/a", str(summary.reason(name))
    note = _metric_note(summary, name)
    interval = summary.intervals.get(name)
    if isinstance(interval, str):
        note += f"; no interval: {interval}"
    return value_text(summary, name), note


def _metric_note(summary: MetricsSummary, name: str) -> str:
    """Threshold and reached rate behind an estimable metric, when it has them."""
    if BY_KEY[name].basis == "threshold":
        return f"t = {threshold_text(summary.threshold)} ({summary.threshold_source})"
    if name == "d-eer":
        return f"t = {threshold_text(summary.eer.threshold)}"
    point = summary.operating_points.get(name)
    if point is not None:
        return f"t = {threshold_text(point.threshold)} ({point.fixed.upper()} {percent(point.reached)})"
    return ""


def confusion_table(cm: ConfusionMatrix, *, title: str = "Confusion matrix (morph = attack = positive)") -> Table:
    """Rows: true class; columns: predicted class. Cells name TP/FN/FP/TN; the last column is the row's error
    rate (APCER for morphs, BPCER for bona fide)."""
    table = Table(title=title)
    table.add_column("true \\ called")
    table.add_column("morph", justify="right")
    table.add_column("bona fide", justify="right")
    table.add_column("error rate", justify="right")
    table.add_row("morph (attack)", f"TP {cm.tp}", f"FN {cm.fn}", f"APCER {percent(cm.apcer)}")
    table.add_row("bona fide", f"FP {cm.fp}", f"TN {cm.tn}", f"BPCER {percent(cm.bpcer)}")
    return table


def metrics_table(summary: MetricsSummary, *, title: str = "S-MAD metrics") -> Table:
    """One row per gate metric (its gate name) with its value and the threshold behind it; oracle rows are
    marked with *. The metric registry (and docs/metrics.md, generated from it) defines each metric."""
    table = Table(
        title=title,
        caption=(
            f"{summary.n_morph} morphs, {summary.n_bonafide} bona fide. "
            f"* {ORACLE_NOTE}. {VOCABULARY_NOTE}. ACER is not reported (not ISO/IEC 30107-3 conformant). "
            f"{interval_note([summary])}"
        ).strip(),
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("threshold / note")
    for name in GATE_METRICS:
        table.add_row(name + (" *" if name in ORACLE_METRICS else ""), *metric_cells(summary, name))
    return table


def _rate_cell(summary: MetricsSummary, name: str) -> str:
    """One rate of a summary in % with its interval, or "n/a (why)"."""
    return value_text(summary, name) if summary.value(name) is not None else f"n/a ({summary.reason(name)})"


def _aggregate_cell(aggregate: Aggregate, *, with_part: bool) -> str:
    """An Average or Worst value in % (the worst part named); "n/a" when a part's value is (its row says why)."""
    if aggregate.value is None:
        return "n/a"
    return percent(aggregate.value) + (f" ({aggregate.part})" if with_part and aggregate.part else "")


def _breakdown_columns(breakdown: Breakdown) -> list[str]:
    """The metrics a breakdown table shows: BPCER only when the parts have bona fide images of their own."""
    return [name for name in BREAKDOWN_METRICS if name != "bpcer" or not breakdown.shared_bonafide]


def breakdown_rows(breakdown: Breakdown, aggregates: bool = True) -> tuple[list[str], list[list[str]]]:
    """Header and rows (parts, then Average and Worst unless `aggregates` is False) of a breakdown, as plain
    cells."""
    metrics = _breakdown_columns(breakdown)
    header = [breakdown.label, "morphs", "bona fide",
              *(BY_KEY[name].heading + (" *" if name in ORACLE_METRICS else "") for name in metrics)]
    rows = []
    for part, summary in breakdown.parts:
        cells = [_rate_cell(summary, name) for name in metrics]
        if summary.n_morph:
            cells[0] += f" ({summary.confusion.fn} missed)"
        rows.append([part, str(summary.n_morph), str(summary.n_bonafide), *cells])
    if aggregates:
        rows.append(["Average", "", "", *(_aggregate_cell(breakdown.average(n), with_part=False) for n in metrics)])
        rows.append(["Worst", "", "", *(_aggregate_cell(breakdown.worst(n), with_part=True) for n in metrics)])
    return header, rows


def breakdown_caption(breakdown: Breakdown, pooled: MetricsSummary | None, aggregates: bool = True) -> str:
    """APCER_AP beside the pooled APCER and the shared threshold (with `aggregates`), what the * means and the
    intervals."""
    first = breakdown.parts[0][1] if breakdown.parts else None
    pieces = []
    if aggregates and breakdown.species:
        pieces.append(f"APCER_AP (worst {breakdown.label}) {_aggregate_cell(breakdown.apcer_ap, with_part=True)}"
                      + (f", pooled APCER {_rate_cell(pooled, 'apcer')}" if pooled is not None else ""))
    if aggregates and first is not None:
        pieces.append(f"t = {threshold_text(first.threshold)} ({first.threshold_source})")
    if breakdown.shared_bonafide and first is not None:
        pieces.append(f"every {breakdown.label} against the same {first.n_bonafide} bona fide images")
    note = interval_note([summary for _, summary in breakdown.parts])
    return "; ".join(pieces) + (". " if pieces else "") + f"* {ORACLE_NOTE}." + (f" {note}" if note else "")


def breakdown_table(breakdown: Breakdown, pooled: MetricsSummary | None = None, *, title: str,
                    aggregates: bool = True) -> Table:
    """One row per part (group, test set or system) with APCER at its threshold and the oracle D-EER, BPCER10
    and BPCER100, then (with `aggregates`) the Average and the Worst row, and a caption giving APCER_AP beside
    the pooled APCER."""
    header, rows = breakdown_rows(breakdown, aggregates)
    table = Table(title=title, caption=breakdown_caption(breakdown, pooled, aggregates))
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i == 0 else "right")
    last_part = len(rows) - (3 if aggregates else 1)
    for i, row in enumerate(rows):
        table.add_row(*row, style="bold" if i > last_part else None, end_section=i == last_part and aggregates)
    return table


def conditions_table(summaries: Mapping[str, MetricsSummary], *, title: str = "Robustness") -> Table:
    """One row per image condition (clean first, then each perturbation): D-EER, APCER and BPCER at the shared
    threshold, BPCER10 and APCER@BPCER10, with their intervals when the summaries have them."""
    first = next(iter(summaries.values()))
    table = Table(title=title, caption=f"APCER and BPCER at t = {threshold_text(first.threshold)} "
                                       f"({first.threshold_source}) for every condition; the others are oracle numbers")
    table.add_column("condition", no_wrap=True)
    for name in CONDITION_METRICS:
        table.add_column(name, justify="right")
    for condition, summary in summaries.items():
        table.add_row(condition, *(metric_cells(summary, name)[0] for name in CONDITION_METRICS))
    return table


def _optional(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def epoch_table(history: Sequence[Mapping[str, Any]], *, title: str = "Training") -> Table:
    """One row per epoch from dicts with keys epoch, train_loss, train_acc, val_loss, val_acc, apcer, bpcer,
    d_eer (rates as fractions; a missing key or None shows "n/a"). Losses are shown as numbers, rates in %."""
    table = Table(title=title, caption="APCER, BPCER and D-EER on the validation split")
    for column in ("epoch", "train loss", "train acc", "val loss", "val acc", "APCER", "BPCER", "D-EER"):
        table.add_column(column, justify="right")
    for row in history:
        table.add_row(
            str(row["epoch"]),
            _optional(row.get("train_loss")),
            percent(row.get("train_acc")),
            _optional(row.get("val_loss")),
            percent(row.get("val_acc")),
            percent(row.get("apcer")),
            percent(row.get("bpcer")),
            percent(row.get("d_eer")),
        )
    return table


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str]) -> list[str]:
    """GitHub-flavoured Markdown table lines; align holds "l" or "r" per column."""
    rule = ["---:" if a == "r" else ":---" for a in align]
    return [_md_row(header), _md_row(rule), *(_md_row(row) for row in rows)]


def summary_markdown(summary: MetricsSummary, breakdowns: Sequence[Breakdown], title: str) -> str:
    """GitHub-flavoured Markdown (e.g. for a CI job summary): metrics, confusion matrix, one table per group
    breakdown."""
    cm = summary.confusion
    lines = [
        f"## {title}",
        "",
        f"{summary.n_morph} morphs, {summary.n_bonafide} bona fide; threshold t = "
        f"{threshold_text(summary.threshold)} ({summary.threshold_source}). Morph = attack = positive; "
        "an image is called a morph when P(morph) >= t.",
        "",
    ]
    metric_rows = [
        [f"`{name}`" + (" \\*" if name in ORACLE_METRICS else ""), METRIC_MEANINGS[name], *metric_cells(summary, name)]
        for name in GATE_METRICS
    ]
    lines += _md_table(["metric", "meaning", "value", "threshold / note"], metric_rows, "llrl")
    lines += ["", f"\\* {ORACLE_NOTE}. {interval_note([summary])}".rstrip(), "",
              "**Confusion matrix** (rows: true class, columns: called)", ""]
    lines += _md_table(
        ["true \\ called", "morph", "bona fide", "error rate"],
        [
            ["morph (attack)", f"TP {cm.tp}", f"FN {cm.fn}", f"APCER {percent(cm.apcer)}"],
            ["bona fide", f"FP {cm.fp}", f"TN {cm.tn}", f"BPCER {percent(cm.bpcer)}"],
        ],
        "lrrr",
    )
    for breakdown in breakdowns:
        lines += ["", f"**By {breakdown.label}**", ""]
        lines += breakdown_markdown(breakdown, summary)
    return "\n".join(lines) + "\n"


def breakdown_markdown(breakdown: Breakdown, pooled: MetricsSummary | None, aggregates: bool = True) -> list[str]:
    """A breakdown as Markdown table lines (Average and Worst in bold) and its caption."""
    header, rows = breakdown_rows(breakdown, aggregates)
    if aggregates:
        rows = rows[:-2] + [[f"**{cell}**" if cell else "" for cell in row] for row in rows[-2:]]
    caption = breakdown_caption(breakdown, pooled, aggregates)
    return [*_md_table(header, rows, "l" + "r" * (len(header) - 1)), "", caption]


def operating_points_table(stored: Mapping[str, Any]) -> Table:
    """The operating points a checkpoint stores (see CheckpointMeta.operating_points): per criterion its
    threshold and the APCER and BPCER it gave on the split it was chosen on."""
    table = Table(title=f"Stored operating points ({stored.get('split', 'val')} split, epoch {stored.get('epoch')}: "
                        f"{stored.get('n_bonafide')} bona fide, {stored.get('n_morph')} morphs)",
                  caption="evaluate --threshold stored uses eer; --threshold NAME another point; predict likewise")
    for column in ("name", "criterion", "threshold", "APCER", "BPCER"):
        table.add_column(column, justify="left" if column in ("name", "criterion") else "right")
    points: Mapping[str, Any] = stored.get("points", {})
    order = [name for name in CRITERIA if name in points] + [name for name in points if name not in CRITERIA]
    for name in order:
        point = points[name]
        if point.get("threshold") is None:
            table.add_row(name, describe(name), "n/a", f"({point.get('reason')})", "")
        else:
            table.add_row(name, describe(name), threshold_text(point["threshold"]), percent(point.get("apcer")),
                          percent(point.get("bpcer")))
    return table


def gates_markdown(results: Sequence[GateResult]) -> str:
    """A Markdown table of the gates: requirement, measured value, pass or FAIL with the reason."""
    rows = [[f"`{r.name}`", "n/a" if r.value is None else f"{r.value:.4g}",
             "pass" if r.passed else f"**FAIL**: {r.failure}"] for r in results]
    return "\n".join(["**Gates**", "", *_md_table(["gate", "measured", "result"], rows, "lrl")]) + "\n"


def junit_xml(suites: Mapping[str, Sequence[GateResult]]) -> str:
    """JUnit XML with one testsuite per test set (name -> its gates) and one testcase per gate; a failed gate's
    <failure> carries the measured value in its message and text."""
    total = sum(len(results) for results in suites.values())
    failed = sum(not r.passed for results in suites.values() for r in results)
    root = ET.Element("testsuites", name="smadlrp", tests=str(total), failures=str(failed))
    for suite, results in suites.items():
        failures = sum(not r.passed for r in results)
        node = ET.SubElement(root, "testsuite", name=suite, tests=str(len(results)), failures=str(failures),
                             errors="0", skipped="0")
        for result in results:
            case = ET.SubElement(node, "testcase", classname="smadlrp.gates", name=result.name)
            measured = "not estimable" if result.value is None else f"{result.value:.6g}"
            ET.SubElement(case, "properties").append(ET.Element("property", name="measured", value=measured))
            if result.failure is not None:
                failure = ET.SubElement(case, "failure", message=result.failure, type="gate")
                failure.text = f"{result.name}: measured {measured}"
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def github_error(title: str, message: str) -> str:
    """A GitHub Actions `::error` workflow command (its data and title escaped as the runner expects)."""
    def escape(text: str, *, prop: bool = False) -> str:
        text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
        return text.replace(":", "%3A").replace(",", "%2C") if prop else text
    return f"::error title={escape(title, prop=True)}::{escape(message)}"


def to_jsonable(obj: Any) -> Any:
    """Turn dataclasses, mappings, sequences, numpy values and paths into JSON-serialisable values.

    An object with an `as_dict()` method (MetricsSummary, Breakdown) is rendered through it. NaN becomes
    None and +-inf the strings "inf"/"-inf", so the output is strict JSON.
    """
    if callable(getattr(obj, "as_dict", None)) and not isinstance(obj, type):
        return to_jsonable(obj.as_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(key): to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, np.ndarray):
        return [to_jsonable(value) for value in obj.tolist()]
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        return ("inf" if obj > 0 else "-inf") if math.isinf(obj) else obj
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(value) for value in obj]
    raise TypeError(f"cannot turn {type(obj).__name__} into JSON")
