"""`smadlrp predict`: what a shipped detector does, a morph score and a decision for every image."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from smadlrp.cli import app
from smadlrp.cli.common import (
    AlignOption,
    BatchSizeOption,
    CheckpointOption,
    DeviceOption,
    ImagesPerSecond,
    JsonOption,
    WorkersOption,
    command,
    console,
    fail_line,
    file_plan,
    notice,
    progress_bar,
    rank_line,
    write_json,
)
from smadlrp.cli.defaults import (
    configured_threshold,
    find_checkpoint,
    open_model,
    threshold_text,
)
from smadlrp.core import distributed
from smadlrp.core.fileio import write_text_atomic
from smadlrp.data.align import recorded_aligner
from smadlrp.data.landmarks import DLIB68_LICENCE
from smadlrp.data.loading import list_images
from smadlrp.data.perturb import SPEC_HELP
from smadlrp.data.protocol import csv_writer
from smadlrp.detector.inference import ImageScore, score_files
from smadlrp.evaluation.thresholds import resolve_threshold
from smadlrp.report.sheet import SHEET_PERTURBATIONS, SHEET_RULE, plan_sheets, write_sheets

FALLBACK_THRESHOLD = 0.5  # for checkpoints that store no operating points
BONA_FIDE = "bona fide"


def _inputs(paths: list[Path]) -> tuple[list[Path], list[ImageScore]]:
    """The image files named or found (recursively) in folders, deduplicated in order, and a failure for each
    path that is missing or a folder without images."""
    files: list[Path] = []
    missing: list[ImageScore] = []
    for path in paths:
        if path.is_dir():
            found = list_images(path)
            files += found
            if not found:
                missing.append(ImageScore(path, None, f"{path}: no images found in this folder"))
        elif path.is_file():
            files.append(path)
        else:
            missing.append(ImageScore(path, None, f"no such file or folder: {path}"))
    return list(dict.fromkeys(files)), missing


@app.command()
@command(ranks=True)
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders (searched recursively).")],
    checkpoint: CheckpointOption = None,
    threshold: Annotated[
        str | None, typer.Option(help="Decision threshold on P(morph): stored (the checkpoint's validation D-EER "
                                      "threshold), a stored operating point (max-apcer10, max-apcer5, max-apcer1, "
                                      "max-bpcer10, max-bpcer1; the names without max- also work), or a number; "
                                      "default: the configured one, else stored.")
    ] = None,
    batch_size: BatchSizeOption = 64,
    align: AlignOption = False,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Also write path,score,decision,error as CSV.",
                                                 dir_okay=False)] = None,
    sheet: Annotated[Path | None, typer.Option("--sheet", metavar="DIR", file_okay=False,
                                               help="Also write one self-contained HTML page per image into DIR "
                                                    "(NAME.sheet.html) for an examiner: the photo, P(morph), the "
                                                    "decision and its operating point, a heatmap, its shares per "
                                                    "face region (with --landmarks or --regions), the decision "
                                                    "under perturbation.")] = None,
    sheet_rule: Annotated[str, typer.Option("--sheet-rule", help="The sheet's heatmap rule (no pattern rules).")
                          ] = SHEET_RULE,
    sheet_perturb: Annotated[list[str] | None, typer.Option(
        "--sheet-perturb", metavar="SPEC", help=f"A condition the sheet scores the image under (repeatable; "
                                                f"default: {', '.join(SHEET_PERTURBATIONS)}): {SPEC_HELP}.")] = None,
    typical: Annotated[Path | None, typer.Option(
        "--typical", metavar="FILE", dir_okay=False, help="The sheet's typical region shares on bona fide images: "
                                                          "the `smadlrp regions --json` output of the same "
                                                          "checkpoint.")] = None,
    landmarks: Annotated[str | None, typer.Option(
        "--landmarks", metavar="dlib68|CSV", help=f"The sheet's region maps from 68 face landmarks: dlib68 (dlib's "
                                                  f"68-point model; {DLIB68_LICENCE}) or a CSV of 68 landmarks per "
                                                  "image (path,x0,y0,...).")] = None,
    regions_folder: Annotated[Path | None, typer.Option(
        "--regions", metavar="FOLDER", file_okay=False, help="The sheet's region maps: a folder of region-id PNGs "
                                                             "(docs/regions.md), FOLDER/<the image's last path "
                                                             "parts>.png.")] = None,
    pdf: Annotated[bool, typer.Option("--pdf", help="Also print each sheet to NAME.sheet.pdf on A4 with headless "
                                                    "Chromium (refused, before any work, without it).")] = False,
    workers: WorkersOption = 0,
    device: DeviceOption = None,
    json_out: JsonOption = None,
) -> None:
    """Score images with a detector: per image P(morph) in [0, 1] and the decision at the stored threshold.

    An image that cannot be read gets a failure line and the others are still scored. Exit code 0 when every
    image was scored, 1 when any could not be. Under torchrun each process scores a share of the images.
    """
    text = threshold_text(threshold)
    files, failed = _inputs(paths)
    checkpoint = find_checkpoint(checkpoint)
    sheets = plan_sheets(sheet, files + [r.path for r in failed], rule=sheet_rule, perturbations=sheet_perturb or
                         SHEET_PERTURBATIONS, landmarks=landmarks, regions=regions_folder, typical=typical, pdf=pdf,
                         aligned=align)
    plan = file_plan({"--csv": csv_out, "--json": json_out}, sheets.files if sheets else None)
    plan.reads("the checkpoint", checkpoint)
    plan.reads("an input image", files + [r.path for r in failed], keep=False)
    plan.reads("a sheet input", sheets.reads if sheets else [])
    model, meta, torch_device = open_model(checkpoint, device)
    sheets = sheets.for_detector(model, meta, checkpoint) if sheets else None
    chosen = configured_threshold(threshold, lambda: resolve_threshold(
        text, stored=meta.operating_points, stored_in=str(checkpoint), without_stored=FALLBACK_THRESHOLD,
        notify=notice))
    t, source = chosen.value, chosen.source
    prepare = recorded_aligner(meta.alignment, str(checkpoint)) if align else None
    with progress_bar(ImagesPerSecond()) as bar:
        task = bar.add_task("scoring", total=None)

        def start(share: int) -> None:
            rank_line(f"scoring {share} of {len(files)} images")
            bar.update(task, total=share)

        results = score_files(model, meta, files, batch_size=batch_size, device=torch_device, workers=workers,
                              prepare=prepare, on_start=start, on_batch=lambda n: bar.advance(task, n)) + failed
    if not distributed.current().is_main:
        return  # rank 0 reports every image and writes the files
    decisions = [None if r.score is None else meta.attack_class if r.score >= t else BONA_FIDE for r in results]
    console.print(_table(results, decisions, f"{len(results)} image(s), {checkpoint.name}", meta.attack_class,
                         f"{t:.4f} ({source})"))
    if csv_out is not None:
        write_text_atomic(csv_out, _csv(results, decisions))
    write_json(json_out, {
        "checkpoint": str(checkpoint), "threshold": t, "threshold_source": source,
        "scored": sum(r.score is not None for r in results), "failed": sum(r.score is None for r in results),
        "images": [{"path": str(r.path), "score": r.score, "decision": d, "error": r.error}
                   for r, d in zip(results, decisions, strict=True)],
    })
    if sheets is not None:
        pages = write_sheets(model, meta, results, chosen, sheets, point=text, checkpoint=str(checkpoint),
                             batch_size=batch_size, device=torch_device, prepare=prepare)
        pdfs = sum(page.suffix == ".pdf" for page in pages)
        console.print(f"wrote {len(pages) - pdfs} sheet(s){f' and {pdfs} PDF(s)' if pdfs else ''} to {sheets.out}",
                      highlight=False)
    for result in results:
        if result.error is not None:
            fail_line(result.error)
    if any(r.score is None for r in results):
        raise typer.Exit(1)


def _table(results: list[ImageScore], decisions: list[str | None], title: str, attack: str, threshold: str) -> Table:
    """predict's table: file, P(attack) and decision per image, the threshold and its source in the caption."""
    table = Table(title=title, box=box.SIMPLE_HEAD, caption=f"decision: {attack} when P({attack}) >= {threshold}")
    table.add_column("file", overflow="fold")
    table.add_column(f"P({attack})", justify="right")
    table.add_column("decision")
    for result, decision in zip(results, decisions, strict=True):
        if result.score is None:
            table.add_row(result.path.name, "", "[red]not scored[/red]")
        else:
            style = "bold" if decision == attack else ""
            table.add_row(result.path.name, f"{result.score:.4f}", f"[{style}]{decision}[/{style}]" if style
                          else str(decision))
    return table


def _csv(results: list[ImageScore], decisions: list[str | None]) -> str:
    """`path,score,decision,error`: the score at full float precision (repr), empty cells for a failed image."""
    buffer = io.StringIO()
    writer = csv_writer(buffer)
    writer.writerow(["path", "score", "decision", "error"])
    for result, decision in zip(results, decisions, strict=True):
        writer.writerow([str(result.path), "" if result.score is None else repr(result.score), decision or "",
                         result.error or ""])
    return buffer.getvalue()
