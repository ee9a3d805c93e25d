"""`smadlrp evaluate`: score a split, print ISO/IEC 30107-3 metrics, write machine outputs, gate CI."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated

import typer

from smadlrp.cli import app
from smadlrp.cli.common import (
    AttackLabelOption,
    BatchSizeOption,
    BonafideLabelOption,
    BootstrapOption,
    CheckpointOption,
    CiOption,
    DeviceOption,
    JsonOption,
    SeedOption,
    WorkersOption,
    WorstSpeciesOption,
    console,
    data_source,
    detail,
    fail_line,
    file_plan,
    find_checkpoint,
    handle_errors,
    notice,
    on_ranks,
    pick_device,
    progress_bar,
    project_config,
    rank_line,
    stored_threshold,
    threshold_text,
    worst_species_column,
    write_json,
)
from smadlrp.core import distributed
from smadlrp.core.config import ProjectConfig
from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.core.fileio import write_text_atomic
from smadlrp.core.outputs import FilePlan
from smadlrp.data.loading import DataSource, ImageDataset, SplitIndex
from smadlrp.data.perturb import SPEC_HELP, Perturbation, parse_perturbations
from smadlrp.detector.checkpoint import CheckpointMeta, load_checkpoint
from smadlrp.detector.inference import Predictions, predict_dataset
from smadlrp.evaluation.metrics import (
    Breakdown,
    Gate,
    GateResult,
    IntervalOptions,
    MetricsSummary,
    det_points,
    gate_results,
    group_breakdown,
    parse_gate,
    summarize,
)
from smadlrp.evaluation.plots import plot_conditions, plot_det
from smadlrp.evaluation.report import (
    breakdown_markdown,
    breakdown_table,
    conditions_table,
    confusion_table,
    gates_markdown,
    github_error,
    junit_xml,
    metrics_table,
    summary_markdown,
    to_jsonable,
)
from smadlrp.evaluation.scores import scores_csv
from smadlrp.evaluation.thresholds import (
    VALIDATION_PREFIX,
    ThresholdChoice,
    criterion_threshold,
    parse_threshold,
    stored_point_name,
)


def _score_split(model: object, meta: CheckpointMeta, source: DataSource, split: str, batch_size: int,
                 workers: int, device: object, plan: FilePlan, perturbation: Perturbation | None = None,
                 seed: int = 0) -> tuple[Predictions, SplitIndex]:
    index = source.split(split, meta.class_names, meta.attack_class, warn=notice)
    plan.reads(f"an image of the {split} split", (s.path for s in index.samples), keep=False)
    plan.reads("the group file", index.groups_file)
    dataset = ImageDataset(index.samples, meta.input_size, meta.mean, meta.std, perturb=perturbation,
                           perturb_seed=seed)
    with progress_bar() as bar:
        task = bar.add_task(f"scoring {split}" + (f" under {perturbation.spec}" if perturbation else ""), total=None)

        def start(share: int) -> None:
            rank_line(f"scoring {share} of {len(dataset)} {split} images")
            bar.update(task, total=share)

        preds = predict_dataset(model, dataset, batch_size, device, meta.attack_index,  # type: ignore[arg-type]
                                workers=workers, on_start=start, on_batch=lambda n: bar.advance(task, n))
    return preds, index


def _group_values(index: SplitIndex, preds: Predictions, column: str) -> list[str]:
    """The `column` value of each scored image (in score order); UsageError naming the columns the data has."""
    if column not in index.groups:
        have = ", ".join(index.groups) or "none (folders without a manifest.csv, or a protocol without extra columns)"
        raise UsageError(f"--by {column}: the data has no such column (group columns: {have})")
    values = index.groups[column]
    return [values[i] for i in preds.indices]


def interval_options(ci: float, bootstrap: int, seed: int, index: SplitIndex, preds: Predictions
                     ) -> IntervalOptions | None:
    """--ci/--bootstrap/--seed as IntervalOptions; the bootstrap resamples subjects (each image's first subject
    id) when the data names them, else images. None with --ci 0."""
    subjects = index.subjects()
    first = [subjects[i][0] if subjects[i] else "" for i in preds.indices]
    return IntervalOptions.over_subjects(ci, bootstrap, seed, first)


def show_summary(summary: MetricsSummary, breakdowns: Sequence[Breakdown], title: str) -> None:
    """Print the confusion matrix, the metrics table and one table per group breakdown."""
    console.print(confusion_table(summary.confusion))
    console.print(metrics_table(summary, title=title))
    for breakdown in breakdowns:
        console.print(breakdown_table(breakdown, summary, title=f"By {breakdown.label}"))


def _choose_threshold(wanted: float | str, worst_species: str | None, val: tuple[Predictions, SplitIndex] | None
                      ) -> ThresholdChoice:
    """A fixed number, or a criterion on the validation split's scores (per species with `worst_species`)."""
    if isinstance(wanted, float):
        return ThresholdChoice(wanted, None)
    assert val is not None
    preds, index = val
    groups = _group_values(index, preds, worst_species) if worst_species is not None else None
    t = criterion_threshold(preds.labels, preds.scores, wanted, groups=groups, where="the validation split")
    detail(f"threshold {t:.6f} chosen on the validation split ({wanted})")
    return ThresholdChoice(t, wanted, worst_species is not None)


DEFAULT_SPLIT = "test"


def _gates(cli_above: list[str] | None, cli_below: list[str] | None, config: ProjectConfig) -> tuple[
        list[Gate], list[Gate]]:
    """The configured gates with the command line's on top (a metric given on the command line replaces the
    configured limit on the same side)."""
    sides = []
    for key, configured, given in (("fail-above", config.fail_above, cli_above),
                                   ("fail-below", config.fail_below, cli_below)):
        gates: dict[str, Gate] = {}
        for name, limit in configured.items():
            try:
                gates[name.lower()] = parse_gate(f"{name}={limit}")
            except UsageError as exc:
                raise config.error(f"{key}.{name}", exc.message) from None
        for text in given or []:
            gate = parse_gate(text)
            gates[gate.metric] = gate
        sides.append(list(gates.values()))
    return sides[0], sides[1]


@app.command()
@handle_errors
@on_ranks
def evaluate(
    checkpoint: CheckpointOption = None,
    data: Annotated[
        list[Path] | None,
        typer.Option("--data", file_okay=False, help="Data folder with train/val/test splits (repeatable: one test "
                                                     "set each); default: the configured data, else the "
                                                     "checkpoint's training data, else the embedded synthetic set."),
    ] = None,
    protocol: Annotated[
        list[Path] | None,
        typer.Option("--protocol", dir_okay=False, help="A protocol CSV (path,label,split[,group columns]) instead of "
                                                        "split folders (repeatable: one test set each); paths "
                                                        "relative to the file, or to --data when given."),
    ] = None,
    bonafide_label: BonafideLabelOption = "bonafide",
    attack_label: AttackLabelOption = "morph",
    split: Annotated[str | None, typer.Option(help=f"Split to evaluate; default: the configured split, else "
                                                   f"{DEFAULT_SPLIT}.")] = None,
    batch_size: BatchSizeOption = 64,
    threshold: Annotated[
        str | None, typer.Option(help="Decision threshold on P(morph): a number; stored (the checkpoint's validation "
                                      "D-EER threshold) or another stored operating point (apcer10, apcer5, apcer1, "
                                      "bpcer10, bpcer1); or a criterion computed on the validation split now: "
                                      "val-eer, val-apcer10, val-apcer5, val-apcer1, val-bpcer10, val-bpcer1. "
                                      "Default: the configured one, else stored (val-eer for checkpoints without "
                                      "stored points).")
    ] = None,
    by: Annotated[
        list[str] | None, typer.Option("--by", help="Group column (repeatable): APCER, D-EER, BPCER10/100 per "
                                                    "group, Average and Worst rows, APCER_AP; default: morph_type "
                                                    "when the data has it.")
    ] = None,
    worst_species: WorstSpeciesOption = False,
    fail_above: Annotated[
        list[str] | None, typer.Option("--fail-above", help="Gate METRIC=LIMIT: exit 1 if the metric is above "
                                                            "(repeatable; adds to the configured gates).")
    ] = None,
    fail_below: Annotated[
        list[str] | None, typer.Option("--fail-below", help="Gate METRIC=LIMIT: exit 1 if the metric is below "
                                                            "(repeatable; adds to the configured gates).")
    ] = None,
    scores_out: Annotated[Path | None, typer.Option("--scores", dir_okay=False,
                                                    help="Write path,label,score and the group columns as CSV.")]
    = None,
    det_out: Annotated[Path | None, typer.Option("--det", help="Write the DET curve as PNG.", dir_okay=False)] = None,
    markdown_out: Annotated[
        Path | None, typer.Option("--markdown", help="Write a Markdown summary (e.g. for a CI job summary).",
                                  dir_okay=False)
    ] = None,
    junit_out: Annotated[
        Path | None, typer.Option("--junit", help="Write the gates as JUnit XML (one testcase per gate).",
                                  dir_okay=False)
    ] = None,
    perturb: Annotated[
        list[str] | None, typer.Option("--perturb", metavar="SPEC", help=f"Also score the split under this "
                                       f"perturbation (repeatable; random ones seeded by --seed): {SPEC_HELP}. "
                                       "Same threshold as the clean images.")
    ] = None,
    robustness_out: Annotated[
        Path | None, typer.Option("--robustness", help="With --perturb: write D-EER and APCER@BPCER10 per "
                                  "condition as a PNG bar chart.", dir_okay=False)
    ] = None,
    ci: CiOption = 0.95,
    bootstrap: BootstrapOption = 1000,
    seed: SeedOption = 0,
    workers: WorkersOption = 0,
    device: DeviceOption = None,
    json_out: JsonOption = None,
) -> None:
    """Score a split with a checkpoint and report APCER, BPCER, D-EER, BPCER10/20/100 and more (under torchrun:
    each process scores a share of the images; rank 0 reports on all of them).

    Exit code 1 when a gate fails (each failed gate is named). With GITHUB_ACTIONS set, failed gates are also
    ::error annotations and the Markdown report is appended to $GITHUB_STEP_SUMMARY.
    """
    config = project_config()
    above, below = _gates(fail_above, fail_below, config)
    configured_split = split is None and config.split is not None
    split = split or config.split or DEFAULT_SPLIT
    text = threshold_text(threshold)
    worst_column = worst_species_column(worst_species, text, by)
    conditions = parse_perturbations(perturb or [])
    if robustness_out is not None and not conditions:
        raise UsageError("--robustness needs at least one --perturb condition")
    checkpoint = find_checkpoint(checkpoint)
    plan = file_plan({"--scores": scores_out, "--det": det_out, "--markdown": markdown_out, "--junit": junit_out,
                      "--robustness": robustness_out, "--json": json_out})
    plan.reads("the checkpoint", checkpoint)
    plan.reads("a protocol file", protocol)
    torch_device = pick_device(device)
    model, meta = load_checkpoint(checkpoint, torch_device)
    sources = _test_sets(data or [], protocol or [], bonafide_label, attack_label, meta)
    stored = stored_threshold(text, meta, checkpoint)
    if stored is not None:
        t, threshold_source = stored
    else:
        if stored_point_name(text) is not None:
            notice(f"{checkpoint} stores no operating points (written by an older smadlrp, or imported): using "
                   f"--threshold {VALIDATION_PREFIX}eer")
            text = f"{VALIDATION_PREFIX}eer"
        wanted = parse_threshold(text)
        val = _score_split(model, meta, next(iter(sources.values())), "val", batch_size, workers, torch_device,
                           plan) \
            if isinstance(wanted, str) else None
        choice = _choose_threshold(wanted, worst_column, val)
        t, threshold_source = choice.value, choice.source("validation")
    results = []
    for name, source in sources.items():
        try:
            preds, index = _score_split(model, meta, source, split, batch_size, workers, torch_device, plan)
        except SmadlrpError as exc:
            if configured_split and f"{split!r}" in str(exc):  # the loaders name a missing split quoted
                raise config.error("split", str(exc)) from None
            raise
        perturbed = {c.spec: _score_split(model, meta, source, split, batch_size, workers, torch_device, plan, c,
                                            seed)[0]
                     for c in conditions}
        if distributed.current().is_main:
            results.append(_report_set(name, source, preds, index, t, threshold_source, by,
                                       interval_options(ci, bootstrap, seed, index, preds)))
            results[-1].perturbed.update({spec: (p, summarize(
                p.labels, p.scores, t, threshold_source=threshold_source,
                intervals=interval_options(ci, bootstrap, seed, index, p))) for spec, p in perturbed.items()})
    if not distributed.current().is_main:
        return  # every score is on rank 0, which reports and writes the files
    title = f"{checkpoint.name} on {split}"
    for result in results:
        show_summary(result.summary, result.breakdowns, f"{title} of {result.name} ({result.counts(meta)})"
                     if len(results) > 1 else f"{title} ({result.counts(meta)})")
    across = Breakdown("test set", tuple((r.name, r.summary) for r in results), species=False)
    if len(results) > 1:
        console.print(breakdown_table(across, title=f"{checkpoint.name}: {len(results)} test sets"))
    for result in results if conditions else []:
        console.print(conditions_table({name: s for name, (_, s) in result.conditions().items()},
                                       title=f"Robustness: {checkpoint.name} on {split}"
                                             + (f" of {result.name}" if len(results) > 1 else "")))
    # one entry per test set and image condition, named by what distinguishes them
    named = {" ".join(part for part in (r.name if len(results) > 1 else "",
                                        condition if conditions else "") if part) or checkpoint.stem: scored
             for r in results for condition, scored in r.conditions().items()}
    if scores_out is not None:
        write_text_atomic(scores_out, _scores_file(results))
    if det_out is not None:
        plot_det({name: det_points(p.labels, p.scores) for name, (p, _) in named.items()}, det_out,
                 eer={name: s.eer.value for name, (_, s) in named.items() if s.eer.value is not None})
    if robustness_out is not None:
        plot_conditions({name: {"D-EER": s.eer.value, "APCER@BPCER10": s.value("apcer@bpcer10")}
                         for name, (_, s) in named.items()}, robustness_out,
                        title=f"{checkpoint.stem} on {split}: error per image condition")
    several = len(results) > 1
    per_set = {r.name: gate_results(r.summary, above, below) for r in results}  # test-set names are unique
    gates = [_named_gate(gate, name if several else None) for name, checked in per_set.items() for gate in checked]
    report = "".join(summary_markdown(r.summary, r.breakdowns, f"{title} of {r.name}" if len(results) > 1 else
                                      f"{title} ({r.counts(meta)})") for r in results)
    if len(results) > 1:
        report += "\n".join(["", "## Test sets", "", *breakdown_markdown(across, None)]) + "\n"
    report += f"\n{gates_markdown(gates)}" if gates else ""
    if markdown_out is not None:
        write_text_atomic(markdown_out, report)
    if junit_out is not None:  # one testsuite per test set: testcase names are unique within each
        write_text_atomic(junit_out, junit_xml({f"{title} of {name}" if several else title: checked
                                                for name, checked in per_set.items()}))
    failures = [g.failure for g in gates if g.failure is not None]
    sets = [{"data": r.source.name, "metrics": r.summary, "groups": {b.label: b for b in r.breakdowns},
             **({"perturbed": {spec: s for spec, (_, s) in r.perturbed.items()}} if conditions else {})}
            for r in results]
    payload = {"checkpoint": str(checkpoint), "split": split, **sets[0]} if len(sets) == 1 else \
        {"checkpoint": str(checkpoint), "split": split, "test_sets": sets, "across_sets": across}
    write_json(json_out, to_jsonable({**payload, "gates": {"failed": failures}}))
    if os.environ.get("GITHUB_ACTIONS") == "true":
        _github_outputs(report, failures)
    for message in failures:
        fail_line(f"gate failed: {message}")
    if failures:
        raise typer.Exit(1)


@dataclass(frozen=True)
class _SetResult:
    """One test set's scores and metrics."""

    name: str
    source: DataSource
    preds: Predictions
    index: SplitIndex
    summary: MetricsSummary
    breakdowns: list[Breakdown]
    perturbed: dict[str, tuple[Predictions, MetricsSummary]] = field(default_factory=dict)  # by perturbation spec

    def conditions(self) -> dict[str, tuple[Predictions, MetricsSummary]]:
        """The clean scores and those under each perturbation, clean first."""
        return {"clean": (self.preds, self.summary), **self.perturbed}

    def counts(self, meta: CheckpointMeta) -> str:
        return f"{self.summary.n_bonafide} {meta.class_names[1 - meta.attack_index]}, " \
               f"{self.summary.n_morph} {meta.attack_class}"


def _test_sets(data: list[Path], protocols: list[Path], bonafide_label: str, attack_label: str,
               meta: CheckpointMeta) -> dict[str, DataSource]:
    """The test sets by short name: one per --protocol (paths relative to the one --data when given), else one per
    --data, else the default data."""
    if protocols and len(data) > 1:
        raise UsageError("several --data with --protocol: give at most one --data (the folder the protocols' "
                         "relative paths start from)")
    if protocols:
        sources = [data_source(data[0] if data else None, p, bonafide_label, attack_label, meta) for p in protocols]
        names = [p.stem for p in protocols]
    else:
        sources = [data_source(d, None, bonafide_label, attack_label, meta) for d in data or [None]]  # type: ignore[list-item]
        names = [source.root.name for source in sources]
    if len(set(names)) < len(names):
        names = [source.name for source in sources]
    if len(set(names)) < len(names):
        raise UsageError(f"the same test set is given twice: {', '.join(names)}")
    return dict(zip(names, sources, strict=True))


def _report_set(name: str, source: DataSource, preds: Predictions, index: SplitIndex, t: float, threshold_source: str,
                by: list[str] | None, options: IntervalOptions | None) -> _SetResult:
    """The metrics of one test set at the shared threshold, with its group breakdowns."""
    summary = summarize(preds.labels, preds.scores, t, threshold_source=threshold_source, intervals=options)
    columns = by or (["morph_type"] if "morph_type" in index.groups else [])
    breakdowns = [group_breakdown(preds.labels, preds.scores, _group_values(index, preds, column), t, column=column,
                                  threshold_source=threshold_source, intervals=options) for column in columns]
    return _SetResult(name, source, preds, index, summary, breakdowns)


def _scores_file(results: Sequence[_SetResult]) -> str:
    """The scores of every test set as one CSV: path,label,score, the group columns, and test_set with several."""
    columns = list(dict.fromkeys(c for r in results for c in r.index.groups))
    paths, labels, scores = [], [], []
    groups: dict[str, list[str]] = {c: [] for c in columns}
    if len(results) > 1:
        groups["test_set"] = []
    for r in results:
        paths += [r.index.samples[i].path for i in r.preds.indices]
        labels += r.preds.labels.tolist()
        scores += r.preds.scores.tolist()
        for column in columns:
            values = r.index.groups.get(column)
            groups[column] += [values[i] if values is not None else "" for i in r.preds.indices]
        if len(results) > 1:
            groups["test_set"] += [r.name] * len(r.preds.indices)
    return scores_csv(paths, labels, scores, groups)


def _named_gate(gate: GateResult, test_set: str | None) -> GateResult:
    """A gate result whose failure names its test set (when there are several)."""
    if test_set is None or gate.failure is None:
        return gate
    return replace(gate, failure=f"{test_set}: {gate.failure}")


def _github_outputs(report: str, failures: list[str]) -> None:
    """::error annotations on stdout and the report appended to the job's step summary file."""
    for message in failures:
        console.print(github_error("smadlrp gate failed", message), highlight=False, markup=False, soft_wrap=True)
    summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_file:
        try:
            with open(summary_file, "a", encoding="utf-8") as handle:
                handle.write(report + "\n")
        except OSError as exc:
            raise SmadlrpError(f"cannot append to $GITHUB_STEP_SUMMARY {summary_file}: {exc.strerror}") from None
