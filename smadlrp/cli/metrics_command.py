"""`smadlrp metrics`: the evaluate report from score files, without a model (one system or a comparison)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from smadlrp.cli import app
from smadlrp.cli.common import (
    AttackLabelOption,
    BonafideLabelOption,
    BootstrapOption,
    CiOption,
    JsonOption,
    SeedOption,
    WorstSpeciesOption,
    command,
    console,
    file_plan,
    show_summary,
    write_json,
)
from smadlrp.cli.defaults import (
    worst_species_column,
)
from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.core.fileio import write_text_atomic
from smadlrp.evaluation.metrics import (
    Breakdown,
    IntervalOptions,
    MetricsSummary,
    det_points,
    group_breakdown,
    summarize,
)
from smadlrp.evaluation.plots import plot_det
from smadlrp.evaluation.report import breakdown_markdown, breakdown_table, summary_markdown, to_jsonable
from smadlrp.evaluation.scores import DIRECTIONS, ScoreSet, read_scores
from smadlrp.evaluation.thresholds import LabelledScores, Threshold, parse_threshold, resolve_threshold


def _threshold(text: str, system: ScoreSet, dev: ScoreSet | None, worst: str | None) -> Threshold:
    """A number in the file's score units, or a criterion on the system's dev scores."""
    def labelled() -> LabelledScores:
        if dev is None:
            raise UsageError(f"--threshold {text} needs the system's development scores: give --dev FILE")
        for label, name in ((0, "bona fide"), (1, "attack")):
            if not (dev.labels == label).any():
                raise SmadlrpError(f"--dev {dev.file}: no {name} rows; choosing a threshold needs both classes")
        return LabelledScores(dev.labels, dev.scores, str(dev.file),
                              list(_groups(dev, worst)) if worst is not None else None)

    return resolve_threshold(text, labelled=labelled, labelled_in="dev", probability=False, fixed=system.threshold)


def _groups(system: ScoreSet, column: str) -> tuple[str, ...]:
    if column not in system.groups:
        raise UsageError(f"--by {column}: {system.file} has no such column "
                         f"(group columns: {', '.join(system.groups) or 'none'})")
    return system.groups[column]


@app.command()
@command()
def metrics(
    scores: Annotated[list[Path], typer.Argument(help="Score files, one per system: smadlrp's --scores CSV, a "
                                                      "path,label,score CSV or Bob PAD's score CSV.",
                                                 dir_okay=False)],
    dev: Annotated[
        list[Path] | None, typer.Option("--dev", help="Development scores to choose a val-* threshold on: one file, "
                                                      "or one per system in the same order.", dir_okay=False)
    ] = None,
    threshold: Annotated[
        str, typer.Option(help="Decision threshold in the files' score units, or a criterion on --dev: val-eer, "
                               "val-max-apcer10, val-max-apcer5, val-max-apcer1, val-max-bpcer10, val-max-bpcer1 "
                               "(the names without max- also work).")
    ] = "0.5",
    by: Annotated[
        list[str] | None, typer.Option("--by", help="Group column (repeatable; Bob files: attack_type, the default)."
                                       )
    ] = None,
    worst_species: WorstSpeciesOption = False,
    score_direction: Annotated[
        str, typer.Option("--score-direction", help="higher-is-morph or higher-is-bonafide; auto: Bob files are "
                                                    "higher-is-bonafide, others higher-is-morph.")
    ] = "auto",
    bonafide_label: BonafideLabelOption = "bonafide",
    attack_label: AttackLabelOption = "morph",
    ci: CiOption = 0.95,
    bootstrap: BootstrapOption = 1000,
    seed: SeedOption = 0,
    det_out: Annotated[Path | None, typer.Option("--det", help="Write the DET curves (one per system) as PNG.",
                                                 dir_okay=False)] = None,
    markdown_out: Annotated[Path | None, typer.Option("--markdown", help="Write a Markdown report.",
                                                      dir_okay=False)] = None,
    json_out: JsonOption = None,
) -> None:
    """APCER, BPCER, D-EER, BPCER10/100 with confidence intervals, per group and per system, from score files of
    smadlrp or other tools (no model needed)."""
    if score_direction not in DIRECTIONS:
        raise UsageError(f"--score-direction {score_direction!r}: choose {', '.join(DIRECTIONS[1:])}")
    parse_threshold(threshold, probability=False)  # refuse a bad value before reading any file
    plan = file_plan({"--det": det_out, "--markdown": markdown_out, "--json": json_out})
    plan.reads("a score file", scores)
    plan.reads("a --dev score file", dev)
    if dev and len(dev) not in (1, len(scores)):
        raise UsageError(f"--dev: give one file, or one per score file ({len(scores)}), not {len(dev)}")
    worst_column = worst_species_column(worst_species, threshold, by)
    read = {"direction": score_direction, "bonafide_label": bonafide_label, "attack_label": attack_label}
    systems = [read_scores(path, **read) for path in scores]
    names = [system.name for system in systems]
    if len(set(names)) < len(names):  # two files of one name in different folders: name them by their path
        names = [str(system.file) for system in systems]
    devs = [read_scores(path, **read) for path in dev or []]
    results: list[tuple[str, MetricsSummary, list[Breakdown]]] = []
    for i, (name, system) in enumerate(zip(names, systems, strict=True)):
        choice = _threshold(threshold, system, devs[min(i, len(devs) - 1)] if devs else None, worst_column)
        source = choice.source
        options = IntervalOptions.over_subjects(ci, bootstrap, seed, system.subjects)
        summary = summarize(system.labels, system.scores, choice.value, threshold_source=source, intervals=options)
        columns = by or [c for c in ("attack_type",) if c in system.groups]
        breakdowns = [group_breakdown(system.labels, system.scores, _groups(system, c), choice.value, column=c,
                                      threshold_source=source, intervals=options) for c in columns]
        results.append((name, summary, breakdowns))
        note = " (scores negated: higher is bona fide)" if system.negated else ""
        show_summary(summary, breakdowns, f"{name}: {summary.n_bonafide} bona fide, {summary.n_morph} morphs{note}")
    comparison = Breakdown("system", tuple((name, summary) for name, summary, _ in results), species=False)
    if len(results) > 1:
        console.print(breakdown_table(comparison, title="Systems", aggregates=False))
    if det_out is not None:
        curves = {name: det_points(system.labels, system.scores) for name, system in zip(names, systems, strict=True)}
        plot_det(curves, det_out, eer={name: summary.eer.value for name, summary, _ in results
                                       if summary.eer.value is not None})
    if markdown_out is not None:
        text = "".join(summary_markdown(summary, breakdowns, name) + "\n" for name, summary, breakdowns in results)
        if len(results) > 1:
            text += "\n".join(["## Systems", "", *breakdown_markdown(comparison, None, aggregates=False)]) + "\n"
        write_text_atomic(markdown_out, text)
    write_json(json_out, to_jsonable({"systems": [
        {"name": name, "file": str(system.file), "format": system.format, "negated": system.negated,
         "metrics": summary, "groups": {b.label: b for b in breakdowns}}
        for (name, summary, breakdowns), system in zip(results, systems, strict=True)]}))
