"""`smadlrp vuln`: how vulnerable a face recogniser is to a morph set (MMPMR, FMMPMR, MAP; ISO/IEC 20059)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from smadlrp.cli import app
from smadlrp.cli.common import JsonOption, SeedOption, command, console, file_plan, notice, progress_bar, write_json
from smadlrp.data.embeddings import load_embeddings
from smadlrp.data.loading import IMAGE_EXTENSIONS
from smadlrp.data.manifest import MANIFEST
from smadlrp.data.probes import read_morph_set
from smadlrp.data.recognition import DLIB_THRESHOLD
from smadlrp.evaluation.plots import plot_mmpmr
from smadlrp.evaluation.report import threshold_text
from smadlrp.evaluation.vulnerability_report import map_table, report_notices, species_table, thresholds_table
from smadlrp.evaluation.vulnerability_run import (
    DlibRecogniser,
    FileRecogniser,
    Recogniser,
    VulnerabilityOptions,
    images_of,
    parse_numbers,
    run_vulnerability,
)


@app.command()
@command()
def vuln(
    morphs: Annotated[Path, typer.Argument(help="A morph folder written by `smadlrp morph` (its manifest.csv lists "
                                                "the morphs, their contributors and the bona fide images).",
                                           file_okay=False)],
    embeddings: Annotated[
        Path | None, typer.Option("--embeddings", dir_okay=False,
                                  help="Embeddings of your own recogniser, compared by cosine similarity: a "
                                       ".safetensors file with one 1-D tensor per image keyed by its path (relative "
                                       "to MORPHS, as the manifest writes it; --probes images relative to their "
                                       "protocol's folder), or a .npy (N, D) float array (read with "
                                       "allow_pickle=False) with a sibling .txt listing one image path per line. "
                                       "Pickled files are refused. Default: dlib's ResNet (align extra), Euclidean "
                                       "distance.")
    ] = None,
    fmr: Annotated[
        str, typer.Option("--fmr", help="Thresholds at these false match rates (comma list, 0.001 or 0.1%), each "
                                        "the conservative threshold on the non-mated bona fide pairs (needs >= "
                                        "1/FMR pairs); none for no such threshold.")
    ] = "0.001,0.01",
    threshold: Annotated[
        list[str] | None, typer.Option("--threshold", help="Fixed thresholds in the recogniser's score units "
                                                           "(repeatable or comma list). Default: dlib's 0.6 with the "
                                                           "dlib recogniser, none with --embeddings.")
    ] = None,
    probes: Annotated[
        Path | None, typer.Option("--probes", dir_okay=False,
                                  help="A protocol CSV (path,label,split and a subjects column; paths relative to "
                                       "it) whose bona fide rows are the probe images, instead of MORPHS' bona fide "
                                       "images.")
    ] = None,
    confidence: Annotated[
        float, typer.Option("--confidence", min=0.0, max=0.999, help="Confidence level of the intervals (0: none).")
    ] = 0.95,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=1, help="Bootstrap resamples for the FMMPMR "
                                                                      "interval (over morphs).")] = 1000,
    seed: SeedOption = 0,
    figure: Annotated[Path | None, typer.Option("--figure", dir_okay=False,
                                                help="Write MMPMR against the threshold, per species (PNG, PDF, "
                                                     "SVG).")] = None,
    json_out: JsonOption = None,
) -> None:
    """Vulnerability of a face recogniser to the morphs of MORPHS (ISO/IEC 20059): MMPMR and FMMPMR with intervals
    at thresholds for target FMRs and at fixed thresholds, per species, and the MAP matrix. Images without a face
    are left out (failure to acquire) and counted."""
    fixed = parse_numbers(threshold or [], "--threshold") if threshold else (() if embeddings else (DLIB_THRESHOLD,))
    options = VulnerabilityOptions(parse_numbers([fmr], "--fmr", rates=True), fixed, confidence, bootstrap, seed)
    plan = file_plan({"--figure": figure, "--json": json_out})
    plan.reads("the morph manifest", morphs / MANIFEST)
    plan.reads("the embedding file", embeddings)
    plan.reads("the probe protocol", probes)
    plan.reads_images_under(f"an image of {morphs}", morphs, IMAGE_EXTENSIONS)
    morph_set = read_morph_set(morphs, probes=probes, check_files=embeddings is None)
    recogniser: Recogniser = FileRecogniser(load_embeddings(embeddings)) if embeddings else DlibRecogniser()
    with progress_bar() as bar:
        task = bar.add_task("embedding images", total=len(images_of(morph_set)))
        report = run_vulnerability(morph_set, recogniser, options, progress=lambda n: bar.advance(task, n))
    if morph_set.single:
        notice(f"{len(morph_set.single)} self-blended pseudo-morph(s) left out: each is made of one face, so there "
               "is no second subject to match")
    for line in report_notices(report):
        notice(line)
    for table in (thresholds_table(report), species_table(report), map_table(report)):
        console.print(table)
    if figure is not None:
        marks = {f"t = {threshold_text(r.threshold.value)} ({r.threshold.label})": r.threshold.value or 0.0
                 for r in report.results}
        plot_mmpmr(report.curves(), marks, figure, rising=report.comparison == "distance",
                   xlabel=f"threshold ({'distance' if report.comparison == 'distance' else 'cosine similarity'})")
    write_json(json_out, report.as_dict())
