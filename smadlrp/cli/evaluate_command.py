"""`smadlrp evaluate`: score a split, print ISO/IEC 30107-3 metrics, write machine outputs, gate CI."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from smadlrp.cli import app
from smadlrp.cli.common import (
    AttackLabelOption,
    BarProgress,
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
    command,
    console,
    fail_line,
    file_plan,
    notice,
    progress_bar,
    project_config,
    show_summary,
    write_json,
)
from smadlrp.cli.defaults import (
    data_source,
    find_checkpoint,
    open_model,
    threshold_text,
    worst_species_column,
)
from smadlrp.core.config import ProjectConfig
from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.core.fileio import write_text_atomic
from smadlrp.data.loading import DataSource, SplitIndex
from smadlrp.data.perturb import SPEC_HELP, parse_perturbations
from smadlrp.detector.checkpoint import CheckpointMeta
from smadlrp.evaluation.metrics import Gate, parse_gate
from smadlrp.evaluation.report import breakdown_table, conditions_table, github_error
from smadlrp.evaluation.run import Evaluation, evaluate_sets, interval_options

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
@command(ranks=True)
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
                                      "D-EER threshold) or another stored operating point (max-apcer10, max-apcer5, "
                                      "max-apcer1, max-bpcer10, max-bpcer1); or a criterion computed on the "
                                      "validation split now: val-eer, val-max-apcer10, val-max-apcer5, "
                                      "val-max-apcer1, val-max-bpcer10, val-max-bpcer1 (the names without max- "
                                      "also work). "
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
    model, meta, torch_device = open_model(checkpoint, device)
    sources = _test_sets(data or [], protocol or [], bonafide_label, attack_label, meta)

    def check_inputs(index: SplitIndex) -> None:
        plan.reads(f"an image of the {index.split} split", (s.path for s in index.samples), keep=False)
        plan.reads("the group file", index.groups_file)

    with progress_bar() as bar:
        try:
            result = evaluate_sets(
                model, meta, checkpoint, sources, split=split, threshold=text, by=by, worst_species=worst_column,
                perturbations=conditions, intervals=interval_options(ci, bootstrap, seed), batch_size=batch_size,
                workers=workers, seed=seed, device=torch_device, progress=BarProgress(bar), notify=notice,
                on_index=check_inputs)
        except SmadlrpError as exc:
            if configured_split and f"{split!r}" in exc.message:  # the loaders name a missing split quoted
                raise config.error("split", exc.message) from None
            raise
    if result is None:
        return  # every score is on rank 0, which reports and writes the files
    _show(result, meta)
    gates = result.gates(above, below)
    report = result.markdown(meta, gates)
    if scores_out is not None:
        write_text_atomic(scores_out, result.scores_csv())
    if det_out is not None:
        result.plot_det(det_out)
    if robustness_out is not None:
        result.plot_robustness(robustness_out)
    if markdown_out is not None:
        write_text_atomic(markdown_out, report)
    if junit_out is not None:
        write_text_atomic(junit_out, result.junit(gates))
    payload = result.as_json(gates)
    write_json(json_out, payload)
    failures = payload["gates"]["failed"]
    if os.environ.get("GITHUB_ACTIONS") == "true":
        _github_outputs(report, failures)
    for message in failures:
        fail_line(f"gate failed: {message}")
    if failures:
        raise typer.Exit(1)


def _show(result: Evaluation, meta: CheckpointMeta) -> None:
    """Each test set's tables, the sets side by side, and the robustness tables."""
    for r in result.sets:
        show_summary(r.summary, r.breakdowns, result.set_title(r, meta))
    if len(result.sets) > 1:
        console.print(breakdown_table(result.across(), title=f"{result.checkpoint.name}: {len(result.sets)} test sets"))
    for r in result.sets if result.perturbations else []:
        console.print(conditions_table({name: s for name, (_, s) in r.conditions().items()},
                                       title=f"Robustness: {result.title}"
                                             + (f" of {r.name}" if len(result.sets) > 1 else "")))


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
