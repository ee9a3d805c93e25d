"""`smadlrp align`: detect, align and crop the faces of a folder tree or a protocol (the optional align extra)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from smadlrp.cli import app
from smadlrp.cli.common import (
    ImagesPerSecond,
    JsonOption,
    command,
    console,
    file_plan,
    notice,
    progress_bar,
    write_json,
)
from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.core.fileio import write_text_atomic
from smadlrp.data.align import (
    ALIGN_FILE,
    DEFAULT_MARGIN,
    ON_FAILURE,
    POLICIES,
    AlignJob,
    AlignPolicy,
    FaceAligner,
    align_document,
    align_images,
    check_available,
    folder_jobs,
    protocol_jobs,
)
from smadlrp.data.loading import IMAGE_EXTENSIONS, list_images
from smadlrp.data.protocol import protocol_csv


@app.command()
@command()
def align(
    source: Annotated[Path, typer.Argument(help="A folder of images (searched recursively), or a protocol CSV.")],
    out: Annotated[Path, typer.Argument(help="Output folder (absent or empty): the crops as PNG, mirroring the "
                                             "input tree, align.json, and the rewritten protocol for a protocol.",
                                        file_okay=False)],
    policy: Annotated[str, typer.Option(help=f"Crop policy: {' or '.join(POLICIES)} (chip: 5-point alignment onto "
                                             "dlib's template; box: detector box plus margin, unaligned).")]
    = "chip",
    size: Annotated[int, typer.Option(help="Output side in pixels.")] = 224,
    margin: Annotated[float | None, typer.Option(help="chip: dlib's padding (default 0.25); box: growth of the "
                                                      "box per side as a fraction of its side (default 0.05).")]
    = None,
    on_failure: Annotated[str, typer.Option("--on-failure", help="When no face is found (a failure to acquire): "
                                                                 f"{' or '.join(ON_FAILURE)} (the largest centred "
                                                                 "square).")] = "skip",
    json_out: JsonOption = None,
) -> None:
    """Detect the largest face of each image, align and crop it, and record how (align.json): the policy, the
    detector and landmark model, every face's box and landmarks, and the failures to acquire (FtA)."""
    check_available()
    settings = AlignPolicy(policy, size, DEFAULT_MARGIN.get(policy, 0.0) if margin is None else margin, on_failure)
    if not source.exists():
        raise SmadlrpError(f"no such file or folder: {source}")
    resolved_out, resolved_in = out.resolve(), source.resolve()
    folder = resolved_in if source.is_dir() else resolved_in.parent
    if resolved_out == folder or folder in resolved_out.parents:
        raise UsageError(f"{out} lies inside the input {folder}: choose an output folder outside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty folder: choose another output folder")
    file_plan({"--json": json_out}).reads_images_under(f"an image of {source}", folder, IMAGE_EXTENSIONS)
    rows: list[dict[str, str]] = []
    columns: list[str] = []
    if source.is_dir():
        images = list_images(source)
        if not images:
            raise SmadlrpError(f"{source}: no images found")
        jobs = folder_jobs(source, images)
    else:
        jobs, rows, columns = protocol_jobs(source)
    aligner = FaceAligner(settings)
    out.mkdir(parents=True, exist_ok=True)
    with progress_bar(ImagesPerSecond()) as bar:
        task = bar.add_task(f"aligning ({settings.policy}, {settings.size} px)", total=len(jobs))

        def done(job: AlignJob, failure: str | None) -> None:
            if failure is not None:
                bar.console.print(f"[yellow]failure to acquire: {escape(job.name)}: {escape(failure)}[/yellow]",
                                  highlight=False,
                                  soft_wrap=True)
            bar.advance(task)

        report = align_images(jobs, out, aligner, done)
    doc = align_document(report, aligner, str(source))
    write_text_atomic(out / ALIGN_FILE, json.dumps(doc, indent=2) + "\n")
    if rows:
        outputs = {f["image"]: f["output"] for f in report.failures} | {a["image"]: a["output"]
                                                                          for a in report.aligned}
        kept = [row | {"path": outputs[row["path"]]} for row in rows if outputs.get(row["path"])]
        write_text_atomic(out / source.name, protocol_csv(kept, columns))
    counts = doc["counts"]
    table = Table(title=f"align {source} -> {out}")
    for column in ("images", "aligned", "FtA", "FtA rate", "policy"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    rate = counts["fta_rate"]
    table.add_row(str(counts["images"]), str(counts["aligned"]), str(counts["fta"]),
                  f"{counts['fta']}/{counts['images']} = {100 * rate:.1f} %" if rate is not None else "n/a",
                  f"{settings.policy}, {settings.size} px, margin {settings.margin:g}, on failure {on_failure}")
    console.print(table)
    if rows:
        notice(f"protocol with the aligned images: {out / source.name}")
    write_json(json_out, doc)
    if not report.aligned and on_failure == "skip":
        raise SmadlrpError("no face was found in any image")
