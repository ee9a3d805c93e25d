"""`smadlrp morph`: landmark morphs (complete, splicing) of real bona fide photographs, with masks and manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import Progress, TaskID
from rich.table import Table

from smadlrp.cli import app
from smadlrp.cli.common import (
    ImagesPerSecond,
    JsonOption,
    SeedOption,
    command,
    console,
    file_plan,
    notice,
    progress_bar,
    write_json,
)
from smadlrp.data.landmarks import DLIB68, DLIB68_LICENCE, landmark_source
from smadlrp.data.loading import IMAGE_EXTENSIONS
from smadlrp.data.morph import SEAMS, SPECIES
from smadlrp.data.morph_pairs import PAIRINGS
from smadlrp.data.morph_writer import (
    MorphProgress,
    MorphReport,
    MorphSettings,
    check_output,
    make_morph_set,
    parse_alphas,
    parse_species,
)
from smadlrp.data.split import SPLITS, parse_ratios

STAGES = {"faces": "finding and aligning faces", "embedding": "embedding faces (look-alikes)", "morphs": "morphing"}


class _BarProgress(MorphProgress):
    """A task on a rich progress bar per stage; failures to acquire as yellow lines above it."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.task: TaskID | None = None

    def start(self, stage: str, total: int) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task(STAGES.get(stage, stage), total=total)

    def step(self, failure: tuple[str, str] | None = None) -> None:
        if failure is not None:
            self.bar.console.print(f"[yellow]failure to acquire: {escape(failure[0])}: {escape(failure[1])}[/yellow]",
                                   highlight=False, soft_wrap=True)
        if self.task is not None:
            self.bar.advance(self.task)


def _summary(report: MorphReport, out: Path, species: tuple[str, ...]) -> Table:
    table = Table(title=f"morph set {out}")
    for column in ("split", "subjects", "bona fide", *(f"{s} morphs" for s in species), "FtA"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split in SPLITS:
        counts = report.counts[split]
        table.add_row(split, str(counts["subjects"]), str(counts["bonafide"]),
                      *(str(counts["morph"][s]) for s in species), str(counts["fta"]))
    return table


@app.command()
@command()
def morph(
    source: Annotated[Path, typer.Argument(help="A folder of bona fide photographs (searched recursively; each file "
                                                "its own subject unless --subject-regex), or a protocol CSV (its "
                                                "bona fide rows; subjects from its subject column).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (absent or empty): bonafide/, morph/SPECIES/, "
                                                    "masks/SPECIES/, manifest.csv, protocol.csv, morph.json.",
                                      file_okay=False)],
    landmarks: Annotated[str, typer.Option("--landmarks", help=f"{DLIB68}: dlib's 68-point model ({DLIB68_LICENCE}; "
                                                               "needs the align extra), or a CSV of landmarks per "
                                                               "image (path,x0,y0,...,xK-1,yK-1; K >= 5).")],
    species: Annotated[str, typer.Option(help=(
        f"Morph species, a list of {', '.join(SPECIES)} (two faces) and self-blended (a pseudo-morph of one face "
        "with its exact blend mask, finetune --selfmorph's recipe: ground truth for compare-rules)."))]
    = ",".join(SPECIES),
    pairs: Annotated[str, typer.Option(help=f"Pair selection: {' or '.join(PAIRINGS)} (look-alikes: each face's "
                                            "most similar face of another subject by dlib's recogniser).")]
    = "random",
    count: Annotated[int | None, typer.Option(min=1, help="Morphs per species at most; default: as many as each "
                                                          "split has faces.")] = None,
    alpha: Annotated[str, typer.Option(help="Contributor b's share, or a list used in turn pair by pair.")] = "0.5",
    size: Annotated[int, typer.Option(help="Side of the aligned crops and morphs, px.")] = 256,
    seam: Annotated[str, typer.Option(help=f"Splicing seam: {' or '.join(SEAMS)} (Poisson blending inside the "
                                           "face hull).")] = "feather",
    feather: Annotated[float | None, typer.Option(help="Feather width of the splicing seam, px; default size/32.")]
    = None,
    ratios: Annotated[str, typer.Option(help="Shares of the subjects for train,val,test (0,0,1: a test-only set).")]
    = "0.7,0.15,0.15",
    subject_regex: Annotated[str | None, typer.Option("--subject-regex", help="Subject id from the file name: a "
                                                                             "regular expression with one capture "
                                                                             "group (or the preset frll).")] = None,
    bonafide_label: Annotated[str, typer.Option("--bonafide-label", help="The label of the bona fide rows of a "
                                                                         "protocol CSV.")] = "bonafide",
    seed: SeedOption = 0,
    json_out: JsonOption = None,
) -> None:
    """Morph pairs of bona fide faces by their landmarks: every face aligned into one frame (also the bona fide
    crops written), warped piecewise-affinely onto the mean landmarks and blended (complete) or pasted into one
    contributor (splicing); subject-disjoint splits, masks, a manifest, a protocol and morph.json."""
    settings = MorphSettings(parse_species(species), pairs, count, parse_alphas(alpha), size, seam, feather,
                             parse_ratios(ratios), seed)
    check_output(source, out)
    plan = file_plan({"--json": json_out})
    plan.reads_images_under(f"an image of {source}", source if source.is_dir() else source.parent, IMAGE_EXTENSIONS)
    plan.reads("the input", source)
    if landmarks != DLIB68:
        plan.reads("the landmark file", Path(landmarks))
    finder = landmark_source(landmarks)
    if landmarks == DLIB68:
        notice(f"landmarks: dlib68, {DLIB68_LICENCE}")
    with progress_bar(ImagesPerSecond()) as bar:
        report = make_morph_set(source, out, finder, settings, subject_regex=subject_regex,
                                bonafide_label=bonafide_label, progress=_BarProgress(bar))
    console.print(_summary(report, out, settings.species))
    counts = report.document["counts"]
    if counts["fta"]:
        notice(f"{counts['fta']} of {counts['images']} image(s) were failures to acquire (listed in "
               f"{out / 'morph.json'})")
    for split in SPLITS:
        split_counts = report.counts[split]
        if split_counts["bonafide"] and not sum(split_counts["morph"].values()):
            notice(f"warning: split {split!r} has bona fide faces but no morphs; evaluate and finetune refuse it "
                   "(try --ratios 0,0,1 or more images)")
    write_json(json_out, report.document)
