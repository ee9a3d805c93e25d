"""The report page: sections from the collected run files, figures inlined as base64 PNG, rendered with Jinja2.

`build_report` is what `smadlrp report` does, as one call; it returns the page as text and writes nothing. It
reads only what the commands wrote (a DET is redrawn from score files), and loads no model.
"""

from __future__ import annotations

import base64
import functools
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from markupsafe import Markup

from smadlrp.evaluation.breakdown import Breakdown
from smadlrp.evaluation.plots import plot_det, plot_training_curves
from smadlrp.evaluation.rates import det_points
from smadlrp.evaluation.scores import read_scores
from smadlrp.evaluation.summary import MetricsSummary
from smadlrp.explain.heatmaps import HEATMAP_PERCENTILE
from smadlrp.report import tables
from smadlrp.report.collect import RunFiles, collect_runs
from smadlrp.report.numbers import FILTERS, breakdown_from_dict, summary_from_dict

CSS = "report.css"
COLOUR_SCALE = (f"Heatmaps: red marks pixels whose relevance speaks for the explained class, blue pixels that speak "
                f"against it, white pixels that do not matter; the deeper the colour, the larger the relevance. Each "
                f"map is scaled on its own: full colour is its {HEATMAP_PERCENTILE:g}th percentile of |relevance|, so "
                f"colours compare places within one map, not between maps.")


@dataclass(frozen=True)
class Figure:
    """An inlined image: a data: URI, its alt text, and a caption."""

    src: str
    alt: str
    caption: str
    kind: str = "figure"


@dataclass
class Section:
    """A part of the page: tables and figures in order, and lines saying which command would add what is missing."""

    id: str
    title: str
    intro: str = ""
    items: list[Any] = field(default_factory=list)  # tables.PageTable, Figure, or errors.ErrorGroup
    missing: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Report:
    """The page and what it was built from."""

    title: str
    html: str
    runs: list[RunFiles]
    sections: list[Section]
    left_out: list[str]

    def as_json(self) -> dict[str, Any]:
        """What `report --json` writes: the runs and the files read, the sections shown, those left out."""
        return {"title": self.title, "runs": [{"name": r.name, "folder": str(r.folder), "found": r.found()}
                                              for r in self.runs],
                "sections": [s.id for s in self.sections], "left_out": self.left_out, "bytes": len(self.html.encode())}


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def drawn(draw: Callable[[Path], Any]) -> str:
    """A figure drawn by one of the package's plotting functions (which write a file), as a data: URI."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "figure.png"
        draw(path)
        return png_uri(path.read_bytes())


def _missing(runs: Sequence[RunFiles], has: Callable[[RunFiles], Any], command: str) -> list[str]:
    """A line per run that lacks an input, naming the command that writes it."""
    return [f"{run.name}: no {command} output found." for run in runs if not has(run)]


@dataclass(frozen=True)
class EvaluatedSet:
    """One test set of a run's evaluate JSON, one column of the evaluation tables: the column's label, the run, the
    set's name (as evaluate named it) and its document (metrics, groups, perturbed conditions)."""

    label: str
    run: RunFiles
    name: str
    doc: dict[str, Any]


def evaluated_sets(runs: Sequence[RunFiles]) -> list[EvaluatedSet]:
    """Every test set of every evaluated run, in order: a run's one set is labelled by the run; several sets (evaluate
    --data A --data B) by their names, after the run's when there are several runs."""
    evaluated = [r for r in runs if r.evaluate is not None]
    found = []
    for run in evaluated:
        doc: dict[str, Any] = run.evaluate  # type: ignore[assignment]
        sets = doc["test_sets"] if isinstance(doc.get("test_sets"), list) else [doc]
        parts = (doc.get("across_sets") or {}).get("parts") or []
        for i, one in enumerate(sets):
            name = str(parts[i].get("name") if i < len(parts) else one.get("data", f"set {i + 1}"))
            label = run.name if len(sets) == 1 else f"{run.name}: {name}" if len(evaluated) > 1 else name
            found.append(EvaluatedSet(label, run, name, one))
    labels = [t.label for t in found]
    return [replace(t, label=f"{t.label} ({i + 1})") if labels.count(t.label) > 1 else t for i, t in enumerate(found)]


def _settings(run: RunFiles) -> dict[str, str]:
    """The detector's rows: architecture, classes, preprocessing, data and training settings."""
    meta, history = run.meta, run.history or {}
    training: dict[str, Any] = dict(history.get("config", {}))
    rows: dict[str, str] = {}
    if meta is not None:
        training.update(meta.training)
        rows.update({"architecture": meta.architecture, "classes": ", ".join(meta.class_names),
                     "attack class": meta.attack_class, "input size": f"{meta.input_size} px",
                     "weights": meta.weights_source,
                     "normalisation": f"mean {meta.mean}, std {meta.std}", "smadlrp version": meta.version})
    for key in ("data", "protocol", "epochs", "batch_size", "optimizer", "lr", "schedule", "weight_decay", "full",
                "augment", "select_by", "seed", "world_size"):
        if training.get(key) not in (None, ""):
            rows[key.replace("_", " ")] = str(training[key])
    best = history.get("best_epoch", (meta.metrics.get("epoch") if meta is not None else None))
    if best is not None:
        rows["selected epoch"] = str(best)
    return rows


def detector_section(runs: Sequence[RunFiles]) -> Section:
    section = Section("detector", "The detector", "Architecture, data and training settings from the checkpoint's "
                      "metadata and finetune's history.json.")
    section.missing = _missing(runs, lambda r: r.meta, "checkpoint (run/best.safetensors, written by finetune)")
    section.items.append(tables.settings_table([r.name for r in runs], [_settings(r) for r in runs]))
    for run in runs:
        if run.training_curves is not None:
            src = png_uri(run.training_curves.read_bytes())
        elif run.history is not None and run.history.get("epochs"):
            src = drawn(functools.partial(plot_training_curves, run.history["epochs"]))
        else:
            continue
        section.items.append(Figure(src, f"Training curves of {run.name}: loss, accuracy and the validation APCER, "
                                         "BPCER and D-EER per epoch.", f"Training curves: {run.name}"))
    if not any(isinstance(item, Figure) for item in section.items):
        section.missing.append("No training curves: finetune writes history.json and training-curves.png.")
    return section


def _curves(runs: Sequence[RunFiles], sets: Sequence[EvaluatedSet]) -> dict[str, tuple[Any, Any]]:
    """(labels, scores) per DET curve: one per test set of a run whose score file has the test_set column of
    several sets, else one per run's score file (named as its one test set's column)."""
    curves = {}
    for run in runs:
        if run.scores is None:
            continue
        found, own = read_scores(run.scores), [t for t in sets if t.run is run]
        column = found.groups.get("test_set")
        if column is not None and len(own) > 1:
            names = np.array(column)
            curves.update({t.label: (found.labels[names == t.name], found.scores[names == t.name]) for t in own
                           if (names == t.name).any()})
        else:
            curves[own[0].label if len(own) == 1 else run.name] = (found.labels, found.scores)
    return curves


def _det_figures(runs: Sequence[RunFiles], sets: Sequence[EvaluatedSet], summaries: dict[str, MetricsSummary]
                 ) -> list[Figure]:
    """One DET with a curve per run (per test set) that has a score file, and the DET image of each run that has
    none."""
    curves = _curves(runs, sets)
    figures = []
    if curves:
        eer = {name: s.eer.value for name, s in summaries.items() if name in curves and s.eer.value is not None}
        src = drawn(lambda path: plot_det({name: det_points(*c) for name, c in curves.items()}, path, eer=eer,
                                          title="DET curve"))
        figures.append(Figure(src, f"DET curves of {', '.join(curves)}: BPCER against APCER on probit axes, one "
                                   "curve per run; a dot marks each run's D-EER on the diagonal.",
                              "DET, redrawn from the score files (evaluate --scores)"))
    for run in runs:
        if run.scores is None and run.det is not None:
            figures.append(Figure(png_uri(run.det.read_bytes()), f"DET curve of {run.name}: BPCER against APCER on "
                                  "probit axes, as evaluate --det drew it.", f"DET: {run.name} (evaluate --det)"))
    return figures


def _across(runs: Sequence[RunFiles]) -> list[tables.PageTable]:
    """The test sets side by side (evaluate's across_sets: a row per set, Average and Worst), per run that has
    several."""
    several = [r for r in runs if r.evaluate is not None and isinstance(r.evaluate.get("across_sets"), dict)]
    if not several:
        return []
    found = [{"test set": breakdown_from_dict(r.evaluate["across_sets"],  # type: ignore[index]
                                              f"{r.name}: evaluate JSON, across_sets")} for r in several]
    return tables.breakdown_tables([r.name for r in several], found, [None] * len(several))


def evaluation_sections(runs: Sequence[RunFiles]) -> list[Section]:
    """The evaluation (confusion matrix, rates, groups, DET, operating points) and robustness sections, one column
    per test set of each run."""
    sets = {t.label: t for t in evaluated_sets(runs)}
    names = list(sets)
    summaries = {name: summary_from_dict(t.doc["metrics"], f"{t.run.name}: evaluate JSON" + (
        f", test set {t.name}" if name != t.run.name else "")) for name, t in sets.items()}
    several = len(names) > len({t.run.name for t in sets.values()})
    section = Section("evaluation", "The evaluation", "From evaluate --json: the test split at one threshold" + (
        ", one column per test set, then the test sets side by side with their Average and Worst." if several
        else "."))
    section.missing = _missing(runs, lambda r: r.evaluate, "evaluate --json")
    if names:
        listed = [summaries[n] for n in names]
        groups: list[dict[str, Breakdown]] = [
            {label: breakdown_from_dict(b, f"{n}: evaluate JSON, groups {label}")
             for label, b in sets[n].doc.get("groups", {}).items()} for n in names]
        section.items += [tables.confusion_table(names, listed), tables.metrics_table(names, listed),
                          *tables.breakdown_tables(names, groups, listed), *_across(runs)]
    section.items += _det_figures(runs, list(sets.values()), summaries)
    stored = [r for r in runs if r.meta is not None and r.meta.operating_points.get("points")]
    if stored:
        section.items.append(tables.operating_points_table([r.name for r in stored],
                                                           [r.meta.operating_points for r in stored]))  # type: ignore
    else:
        section.missing.append("No stored operating points: finetune stores them in the checkpoint.")
    perturbed = [n for n in names if sets[n].doc.get("perturbed")]
    robustness = Section("robustness", "Robustness", "From evaluate --perturb: the same threshold under each image "
                         "condition.")
    if perturbed:
        conditions = [{"clean": summaries[n], **{spec: summary_from_dict(doc, f"{n}: evaluate JSON, {spec}")
                                                 for spec, doc in sets[n].doc["perturbed"].items()}} for n in perturbed]
        robustness.items.append(tables.conditions_table(perturbed, conditions))
    else:
        robustness.missing.append("evaluate --perturb SPEC (jpeg, print-scan, ...) --json adds this section.")
    return [section, robustness]


def explanation_section(runs: Sequence[RunFiles]) -> Section:
    """The rule comparison, region shares, mean maps, SpRAy clusters and explained images."""
    section = Section("explanations", "Explanations", COLOUR_SCALE)
    section.missing = _missing(runs, lambda r: r.compare, "compare-rules --json") + _missing(
        runs, lambda r: r.regions, "regions --json") + _missing(runs, lambda r: r.explain or r.grids, "explain")
    compared = [r for r in runs if r.compare is not None]
    if compared:
        section.items.append(tables.compare_table([r.name for r in compared], [r.compare for r in compared]))  # type: ignore[misc]
    for run in compared:
        if run.compare_figure is not None:
            section.items.append(Figure(png_uri(run.compare_figure.read_bytes()), f"Region-perturbation curves of "
                                        f"{run.name}: the drop of the score as the most relevant patches of each "
                                        "method are replaced, one line per method.", f"Faithfulness: {run.name}"))
    mapped = [r for r in runs if r.regions is not None]
    if mapped:
        docs: list[dict[str, Any]] = [r.regions for r in mapped]  # type: ignore[misc]
        section.items += [tables.region_table([r.name for r in mapped], docs),
                          tables.spray_table([r.name for r in mapped], docs)]
    alts = {"shares": "bars of the relevance share per face region and class against the region's area",
            "means": "mean relevance maps per class and group, and their difference (red: more relevance for "
                     "the attack class, blue: less)",
            "clusters": "SpRAy: each cluster's prototype map and its most central images",
            "embedding": "SpRAy spectral embedding of the maps, one point per image, coloured by cluster"}
    for run in mapped:
        for key, path in run.region_figures.items():
            section.items.append(Figure(png_uri(path.read_bytes()), f"{run.name}: {alts[key]}.",
                                        f"{run.name}: {path.name}"))
    explained = [r for r in runs if r.explain]
    if explained:
        section.items.append(tables.explain_table([r.name for r in explained], [r.explain for r in explained]))
    for run in runs:
        for grid in run.grids:
            stem = grid.name.removesuffix(".grid.png")
            section.items.append(Figure(png_uri(grid.read_bytes()), f"{run.name}: the image {stem} and its heatmap "
                                        "under each rule (red: for the explained class, blue: against).",
                                        f"{run.name}: {grid.name}"))
    return section


def environment() -> jinja2.Environment:
    """The templates of this package, HTML autoescaped, with the number formatters of `numbers.FILTERS` as filters;
    undefined names are errors."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("smadlrp.report", "templates"),
                             autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters.update(FILTERS)
    return env


def stylesheet() -> Markup:
    """The page's CSS (inlined into <style>; shared with every page that extends base.html)."""
    return Markup(resources.files("smadlrp.report").joinpath("templates", CSS).read_text(encoding="utf-8"))


def build_report(folders: Sequence[Path], *, title: str | None = None) -> Report:
    """The report of the run folders (one column per run in the tables, one curve per run in the DET)."""
    return build_page(collect_runs(list(folders)), title=title)


def build_page(runs: Sequence[RunFiles], *, title: str | None = None, extra: Sequence[Section] = ()) -> Report:
    """The report of runs already collected (`collect.collect_runs`); `extra` sections (the Errors section of
    `report --explain-errors`) come after the explanations."""
    title = title or "smadlrp report: " + ", ".join(r.name for r in runs)
    sections = [detector_section(runs), *evaluation_sections(runs), explanation_section(runs), *extra]
    shown = [s for s in sections if s.items]
    left_out = [f"{s.title}: " + (" ".join(s.missing) or "nothing found.") for s in sections if not s.items]
    html = environment().get_template("report.html").render(title=title, css=stylesheet(), runs=runs, sections=shown,
                                                             left_out=left_out)
    return Report(title, html, list(runs), shown, left_out)
