"""The report's tables as plain cells, one column per run, formatted as the terminal tables format them.

Every number goes through the formatters of `report.numbers` (rates, thresholds and intervals through
`evaluation.report`'s helpers, the terminal's own cells), so a number on the page reads exactly as `evaluate` prints
it; the explanation tables round as `compare-rules`, `regions` and `explain` print theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from smadlrp.evaluation.breakdown import Breakdown
from smadlrp.evaluation.registry import BY_KEY, CONDITION_METRICS, GATE_METRICS, ORACLE_METRICS
from smadlrp.evaluation.report import ORACLE_NOTE, breakdown_caption, breakdown_rows, metric_cells
from smadlrp.evaluation.summary import MetricsSummary
from smadlrp.evaluation.thresholds import CRITERIA, describe
from smadlrp.report.numbers import MISSING, fixed, logit, percent, share, threshold_text


@dataclass(frozen=True)
class Cell:
    """One table cell: its text, shown bold when `strong`, with an optional smaller `note` under it."""

    text: str
    strong: bool = False
    note: str = ""


@dataclass(frozen=True)
class Row:
    """A row: its header cell (with an optional explanation under it) and one cell per column and run."""

    header: str
    cells: list[Cell]
    strong: bool = False
    explanation: str = ""


@dataclass(frozen=True)
class PageTable:
    """A table of the page. `columns` are the top header cells, each spanning one sub-column per run in `runs`
    (empty `columns`: one column per run, headed by the run's name). Cells are column-major: every run of the
    first column, then every run of the next."""

    title: str
    corner: str
    runs: list[str]
    rows: list[Row]
    columns: list[str] = field(default_factory=list)
    caption: str = ""
    numeric: bool = True  # False: the cells are words (left-aligned, wrapped)
    kind: str = "table"

    @property
    def sub_header(self) -> bool:
        """Whether the run names need a header row of their own under the columns."""
        return bool(self.columns) and len(self.runs) > 1


def side_by_side(title: str, corner: str, runs: Sequence[str], per_run: Sequence[Mapping[str, Sequence[Cell]]], *,
                 columns: Sequence[str] = (), caption: str = "", strong: Sequence[str] = (),
                 explanations: Mapping[str, str] | None = None) -> PageTable:
    """One table from each run's rows (row header -> one cell per column): rows in the order they first appear,
    "—" where a run lacks a row; the rows named in `strong` bold."""
    order = list(dict.fromkeys(key for rows in per_run for key in rows))
    width = max(len(columns), 1)
    rows = []
    for key in order:
        cells = [per_run[r][key][c] if key in per_run[r] else Cell(MISSING)
                 for c in range(width) for r in range(len(runs))]
        rows.append(Row(key, cells, key in strong, (explanations or {}).get(key, "")))
    return PageTable(title, corner, list(runs), rows, list(columns), caption)


def _per_run_captions(runs: Sequence[str], captions: Sequence[str]) -> str:
    """One caption, or each run's caption after its name when they differ."""
    if len(set(captions)) <= 1:
        return captions[0] if captions else ""
    return " ".join(f"{run}: {caption}" for run, caption in zip(runs, captions, strict=True))


def confusion_table(runs: Sequence[str], summaries: Sequence[MetricsSummary]) -> PageTable:
    """The confusion matrix cells, APCER, BPCER and the threshold of each run."""
    per_run = []
    for s in summaries:
        cm = s.confusion
        per_run.append({"TP: morph called morph": [Cell(str(cm.tp))], "FN: morph called bona fide": [Cell(str(cm.fn))],
                        "FP: bona fide called morph": [Cell(str(cm.fp))],
                        "TN: bona fide called bona fide": [Cell(str(cm.tn))],
                        "APCER: FN / morphs": [Cell(percent(cm.apcer), strong=True)],
                        "BPCER: FP / bona fide": [Cell(percent(cm.bpcer), strong=True)],
                        "threshold t": [Cell(threshold_text(s.threshold), note=s.threshold_source)]})
    return side_by_side("Confusion matrix (morph = attack = positive)", "cell", runs, per_run,
                        caption="An image is called a morph when P(morph) >= t.")


def metrics_table(runs: Sequence[str], summaries: Sequence[MetricsSummary]) -> PageTable:
    """Every gate metric of the registry with its interval and the threshold behind it, per run."""
    per_run = []
    for s in summaries:
        rows = {}
        for name in GATE_METRICS:
            value, note = metric_cells(s, name)
            rows[name + (" *" if name in ORACLE_METRICS else "")] = [Cell(value, note=note)]
        per_run.append(rows)
    counts = "; ".join(f"{run}: {s.n_morph} morphs, {s.n_bonafide} bona fide" for run, s in
                       zip(runs, summaries, strict=True))
    return side_by_side("ISO/IEC 30107-3 rates", "metric", runs, per_run, explanations={
        name + (" *" if name in ORACLE_METRICS else ""): BY_KEY[name].explanation for name in GATE_METRICS},
        caption=f"{counts}. * {ORACLE_NOTE}. Brackets: the confidence interval evaluate computed (Clopper-Pearson "
                "at the threshold, a bootstrap for the curve figures), in %.")


def breakdown_tables(runs: Sequence[str], breakdowns: Sequence[Mapping[str, Breakdown]],
                     pooled: Sequence[MetricsSummary | None]) -> list[PageTable]:
    """One table per group column (evaluate --by): each part, then the Average and Worst rows."""
    labels = list(dict.fromkeys(label for found in breakdowns for label in found))
    tables = []
    for label in labels:
        per_run: list[dict[str, list[Cell]]] = []
        captions, header = [], [label]
        for found, summary in zip(breakdowns, pooled, strict=True):
            if label not in found:
                per_run.append({})
                continue
            header, rows = breakdown_rows(found[label])
            per_run.append({row[0]: [Cell(cell) for cell in row[1:]] for row in rows})
            # the caption without the note on the intervals' level and method, which the JSON does not keep
            parts = tuple((part, replace(s, intervals={})) for part, s in found[label].parts)
            bare = replace(found[label], parts=parts)
            captions.append(breakdown_caption(bare, summary))
        shown = [run for run, found in zip(runs, breakdowns, strict=True) if label in found]
        tables.append(side_by_side(f"By {label}", header[0], runs, per_run, columns=header[1:],
                                   strong=("Average", "Worst"), caption=_per_run_captions(shown, captions)))
    return tables


def operating_points_table(runs: Sequence[str], stored: Sequence[Mapping[str, Any]]) -> PageTable:
    """The operating points each checkpoint stores: per criterion its threshold and the APCER and BPCER it gave on
    the split it was chosen on."""
    per_run, captions, explanations = [], [], {}
    for found in stored:
        points: Mapping[str, Any] = found.get("points", {})
        rows = {}
        for name in [n for n in CRITERIA if n in points] + [n for n in points if n not in CRITERIA]:
            point = points[name]
            explanations[name] = describe(name)
            if point.get("threshold") is None:
                rows[name] = [Cell("n/a"), Cell(f"({point.get('reason')})"), Cell("")]
            else:
                rows[name] = [Cell(threshold_text(point["threshold"])), Cell(percent(point.get("apcer"))),
                              Cell(percent(point.get("bpcer")))]
        per_run.append(rows)
        captions.append(f"{found.get('split', 'val')} split, epoch {found.get('epoch')}: {found.get('n_bonafide')} "
                        f"bona fide, {found.get('n_morph')} morphs")
    return side_by_side("Stored operating points", "criterion", runs, per_run, columns=["threshold", "APCER", "BPCER"],
                        explanations=explanations, caption=_per_run_captions(runs, captions) + ". evaluate "
                        "--threshold stored uses eer; --threshold NAME another point; predict likewise.")


def conditions_table(runs: Sequence[str], conditions: Sequence[Mapping[str, MetricsSummary]]) -> PageTable:
    """Per image condition (clean, then each perturbation) the robustness metrics of each run."""
    per_run = [{condition: [Cell(metric_cells(s, name)[0]) for name in CONDITION_METRICS]
                for condition, s in found.items()} for found in conditions]
    captions = [f"APCER and BPCER at t = {threshold_text(s.threshold)} ({s.threshold_source}) for every condition; "
                "the others are oracle numbers" for found in conditions for s in list(found.values())[:1]]
    return side_by_side("Robustness: evaluate --perturb", "condition", runs, per_run,
                        columns=[name.upper() for name in CONDITION_METRICS], caption=_per_run_captions(
                            [r for r, c in zip(runs, conditions, strict=True) if c], captions))


def settings_table(runs: Sequence[str], settings: Sequence[Mapping[str, str]]) -> PageTable:
    """The detector's architecture, data and training settings, one column per run."""
    table = side_by_side("Detector", "setting", runs, [{key: [Cell(value)] for key, value in found.items()}
                                                      for found in settings])
    return replace(table, numeric=False)


Getter = Callable[[Mapping[str, Any]], Any]


def _localisation(key: str) -> Getter:
    return lambda m: (m.get("localisation") or {}).get(key)


# The compare-rules table's columns: header, value, higher is better, decimals (as `compare-rules` prints them).
COMPARE_COLUMNS: tuple[tuple[str, Getter, bool, int], ...] = (
    ("ms / image", lambda m: m.get("ms_per_image"), False, 2),
    ("AOPC", lambda m: m.get("aopc"), True, 4),
    ("AOPC - random", lambda m: m.get("aopc_vs_random"), True, 4),
    ("mass acc.", _localisation("mass_accuracy"), True, 4),
    ("rank acc.", _localisation("rank_accuracy"), True, 4),
    ("pointing", _localisation("pointing_game"), True, 4),
)
RANDOM = "random"  # the baseline left out when the best value of a column is marked


def compare_table(runs: Sequence[str], docs: Sequence[Mapping[str, Any]]) -> PageTable:
    """One row per rule and baseline; the best value of each column (random map aside) in bold, per run."""
    per_run, captions = [], []
    for doc in docs:
        methods = doc["methods"]
        rows = {}
        bests = []
        for _, get, higher, _ in COMPARE_COLUMNS:
            values = [v for m in methods if m.get("name") != RANDOM and (v := get(m)) is not None]
            bests.append((max(values) if higher else min(values)) if values else None)
        for m in methods:
            rows[f"{m.get('name')} ({m.get('kind')})"] = [
                Cell(fixed(get(m), digits), strong=best is not None and get(m) == best)
                for (_, get, _, digits), best in zip(COMPARE_COLUMNS, bests, strict=True)]
        per_run.append(rows)
        captions.append(f"AOPC: mean drop of the {doc.get('score')} over {doc.get('steps')} steps of "
                        f"{doc.get('patch_size')}x{doc.get('patch_size')}-pixel patches on {doc.get('n_images')} "
                        f"images (higher = more faithful); localisation on morphs with artifact masks (higher = "
                        "better); bold: the best of a column, the random map aside")
    return side_by_side("Rule comparison (compare-rules)", "method", runs, per_run,
                        columns=[c[0] for c in COMPARE_COLUMNS], caption=_per_run_captions(runs, captions))


def _row_name(row: Mapping[str, Any]) -> str:
    return str(row.get("class")) + (f" / {row['group']}" if row.get("group") else "")


def region_table(runs: Sequence[str], docs: Sequence[Mapping[str, Any]]) -> PageTable:
    """Per face region the share of positive relevance of each class (and group), and the region's area share."""
    names = list(dict.fromkeys(_row_name(row) for doc in docs for row in doc["rows"]))
    columns = [*(f"R+ {name}" for name in names), "area"]
    per_run = []
    for doc in docs:
        by_name = {_row_name(row): row for row in doc["rows"]}
        first = doc["rows"][0] if doc["rows"] else {}
        per_run.append({region: [*((Cell(share(by_name[n]["positive"].get(region))) if n in by_name else Cell(MISSING))
                                   for n in names), Cell(share(first.get("area", {}).get(region)))]
                        for region in doc.get("regions", [])})
    subjects = [f"{doc.get('rule')}, relevance for {doc.get('target')}, {doc.get('images')} images of the "
                f"{doc.get('split')} split" for doc in docs]
    return side_by_side("Share of relevance per face region (%)", "region", runs, per_run, columns=columns,
                        caption=_per_run_captions(runs, subjects) + ". R+: the mean over the images of each image's "
                        "share of positive relevance; area: the share a uniform map would get (the reference). "
                        "Each column sums to 100.")


def spray_table(runs: Sequence[str], docs: Sequence[Mapping[str, Any]]) -> PageTable:
    """The SpRAy clusters of each run: their size, classes and mean P(attack)."""
    per_run = [{f"cluster {c.get('cluster')}": [
        Cell(str(c.get("images"))), Cell(", ".join(f"{n} {name}" for name, n in c.get("classes", {}).items())),
        Cell(fixed(c.get("mean_p_attack"), 3))] for c in doc["spray"].get("per_cluster", [])} for doc in docs]
    captions = [f"{doc['spray'].get('clusters')} clusters ({doc['spray'].get('chosen_by')})" for doc in docs]
    return side_by_side("SpRAy strategy clusters", "cluster", runs, per_run,
                        columns=["images", "classes", "mean P(attack)"], caption=_per_run_captions(runs, captions))


def explain_table(runs: Sequence[str], docs: Sequence[Sequence[Mapping[str, Any]]]) -> PageTable:
    """The explained images of each run: P(attack), the explained class and its logit (as `explain` prints)."""
    per_run = [{str(image.get("name") or image.get("path")): [
        Cell(fixed(image.get("p_attack"), 4)), Cell(str(image.get("target"))), Cell(logit(image.get("target_logit")))]
        for doc in found for image in doc["images"]} for found in docs]
    return side_by_side("Explained images", "image", runs, per_run, columns=["P(attack)", "target", "logit"])
