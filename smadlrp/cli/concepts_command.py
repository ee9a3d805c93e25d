"""`smadlrp concepts`: concept relevance (CRP) of a detector's layer over a split: which channels carry the attack
decision, where their conditional relevance lies, their reference examples, and prototypical strategies (PCX)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich import box
from rich.progress import Progress
from rich.table import Table

from smadlrp.cli import app
from smadlrp.cli.common import (
    AttackLabelOption,
    AttentionOption,
    BatchSizeOption,
    BonafideLabelOption,
    CheckpointOption,
    DataOption,
    DeviceOption,
    ImagesPerSecond,
    JsonOption,
    ProtocolOption,
    SumSplitOption,
    WorkersOption,
    command,
    console,
    file_plan,
    notice,
    progress_bar,
    write_json,
)
from smadlrp.cli.defaults import data_source, find_checkpoint, open_model
from smadlrp.core.errors import SmadlrpError
from smadlrp.core.fileio import write_text_atomic
from smadlrp.data.loading import DataSource, SplitIndex
from smadlrp.data.paths import prepare_out_dir
from smadlrp.data.regions import REGIONS
from smadlrp.detector.checkpoint import CheckpointMeta
from smadlrp.explain.concept_figures import plot_concepts
from smadlrp.explain.concept_run import (
    ConceptReport,
    ConceptSettings,
    analyse_concepts,
    check_settings,
    concepts_csv,
    images_csv,
    report_json,
)
from smadlrp.explain.concept_run import Progress as ProgressFactory
from smadlrp.explain.run import build_explainers, resolve_rules
from smadlrp.lrp.composites import DEFAULT_ATTENTION, SUM_SPLITS

FILES = {"figure": "concepts.png", "images": "images.csv"}
SHORT_REGIONS = ("L eye", "R eye", "brows", "nose", "mouth", "skin", "outl", "hair", "bgr", "short")
CsvOption = Annotated[Path | None, typer.Option("--csv", dir_okay=False,
                                                help="Also write one row per channel of the layer as CSV.")]


@app.command()
@command()
def concepts(
    checkpoint: CheckpointOption = None,
    data: DataOption = None,
    protocol: ProtocolOption = None,
    split: Annotated[str, typer.Option(help="Split to analyse.")] = "test",
    layer: Annotated[str | None, typer.Option(help="Concept layer (a node every path from the input to the output "
                                                   "passes through); default: the last convolutional layer or block "
                                                   "output, for transformers the last block's output.")] = None,
    rule: Annotated[str, typer.Option("--rule", "-r", help="Rule or composite.")] = "epsilon-plus",
    top: Annotated[int, typer.Option(min=1, help="Concepts (channels of highest mean relevance) to locate and "
                                                 "show.")] = 8,
    max_images: Annotated[int | None, typer.Option("--max-images", min=1,
                                                   help="At most this many images of the split (and of the training "
                                                        "split, for the references), spread evenly.")] = None,
    references: Annotated[int, typer.Option(min=0, help="Reference examples (training images) per concept.")] = 4,
    prototypes: Annotated[int, typer.Option(min=1, help="At most this many prototypes (mixture components) per "
                                                        "class.")] = 4,
    out: Annotated[Path, typer.Option(help="Output folder for the figure and the per-image CSV.")]
    = Path("concepts-out"),
    bonafide_label: BonafideLabelOption = "bonafide",
    attack_label: AttackLabelOption = "morph",
    batch_size: BatchSizeOption = 32,
    workers: WorkersOption = 0,
    device: DeviceOption = "auto",
    sum_split: SumSplitOption = SUM_SPLITS[0],
    attention: AttentionOption = DEFAULT_ATTENTION,
    json_out: JsonOption = None,
    csv_out: CsvOption = None,
) -> None:
    """Concept relevance (CRP) over a split: the channels of a layer that carry the attack decision, where their
    conditional relevance lies (face regions, artifact masks), reference examples, and prototypes (PCX)."""
    settings = ConceptSettings(layer, top, max_images, references, prototypes, batch_size, workers)
    check_settings(settings)
    checkpoint = find_checkpoint(checkpoint)
    plan = file_plan({"--json": json_out, "--csv": csv_out}, ("--out", out, tuple(FILES.values())))
    plan.reads("the checkpoint", checkpoint)
    plan.reads("the protocol file", protocol)
    model, meta, torch_device = open_model(checkpoint, device)
    (rule,) = resolve_rules([rule], have_patterns=False)
    explainer = build_explainers(model, meta, [rule], {}, None, sum_split, attention, notice)[rule]
    source = data_source(data, protocol, bonafide_label, attack_label, meta)
    index = source.split(split, meta.class_names, meta.attack_class, warn=notice)
    train = _training_split(source, split, index, meta)
    for part in (index, train):
        if part is not None:
            plan.reads(f"an image of the {part.split} split", (s.path for s in part.samples), keep=False)
    plan.reads("the group file", index.groups_file)
    prepare_out_dir(out)
    with progress_bar(ImagesPerSecond()) as bar:
        report = analyse_concepts(explainer, meta, index, train, settings, torch_device, _progress(bar))
    for note in report.notes:
        notice(note)
    subject = f"{checkpoint.name}, {rule}, relevance for {meta.attack_class}, {split} split of {source.name}"
    console.print(_concept_table(report, subject))
    if report.shares.regions is not None:
        console.print(_region_table(report))
    console.print(_prototype_table(report))
    plot_concepts(report, out / FILES["figure"], title=f"{subject}\nlayer {report.layer.name}: {report.layer.unit}")
    write_text_atomic(out / FILES["images"], images_csv(report))
    if csv_out is not None:
        write_text_atomic(csv_out, concepts_csv(report))
    console.print(f"wrote {', '.join(FILES.values())} to {out}; {report.seconds['total']:.1f} s", highlight=False)
    write_json(json_out, {"checkpoint": str(checkpoint), "data": source.name, "split": split, "rule": rule,
                          "sum_split": sum_split, "attention": attention, "target": meta.attack_class,
                          **report_json(report), "files": {k: str(out / name) for k, name in FILES.items()}})


def _training_split(source: DataSource, split: str, index: SplitIndex, meta: CheckpointMeta) -> SplitIndex | None:
    """The training split, where the reference examples come from (None, with a notice, when there is none)."""
    if split == "train":
        return index
    try:
        return source.split("train", meta.class_names, meta.attack_class, warn=notice)
    except SmadlrpError as exc:
        notice(f"no reference examples: the training split cannot be read ({exc.message})")
        return None


def _progress(bar: Progress) -> ProgressFactory:
    def start(description: str, total: int) -> Callable[[int], None]:
        task = bar.add_task(description, total=total)
        return lambda n: bar.advance(task, n)
    return start


def _percent(value: float | None) -> str:
    return "-" if value is None or np.isnan(value) else f"{100 * value:.1f}"


def _concept_table(report: ConceptReport, subject: str) -> Table:
    """The top concepts: mean relevance (all images, per class), relative share, where most of their conditional
    relevance lies and how much of it inside the artifact masks."""
    shares = report.shares
    table = Table(title=f"top concepts of {report.layer.name} ({report.layer.unit}): {subject}", box=box.SIMPLE_HEAD,
                  title_justify="left", pad_edge=False)
    classes = list(report.summary.by_class)
    for column in ("#", "channel", "mean R", *[f"R {c}" for c in classes], "rel %", "top region %", "mask %"):
        table.add_column(column, justify="left" if column == "top region %" else "right", no_wrap=True)
    for k, channel in enumerate(report.top):
        region = shares.top_region(k)
        table.add_row(str(k + 1), str(channel), f"{report.summary.mean[channel]:.3g}",
                      *[f"{report.summary.by_class[c][channel]:.3g}" for c in classes],
                      _percent(report.summary.mean_relative[channel]),
                      "-" if region is None else f"{SHORT_REGIONS[REGIONS.index(region[0])]} {_percent(region[1])}",
                      _percent(None if shares.mask is None else shares.mask[k]))
    table.caption = (f"{len(report.paths)} images; ranked by the mean relevance over {report.summary.ranked_by}. "
                     "mean R: the channel's relevance at the layer for the attack class, mean over the images (R "
                     "<class>: over a class); rel %: its mean share of each image's absolute channel relevance; "
                     "top region and mask: share of the concept's positive conditional relevance, pooled over "
                     "the images (mask: over the morphs with an artifact mask"
                     + ("" if shares.mask_area is None else f"; a uniform map gets {_percent(shares.mask_area)} %")
                     + ").")
    return table


def _region_table(report: ConceptReport) -> Table:
    """Each top concept's positive conditional relevance per face region (%), and a uniform map's (area)."""
    table = Table(title="share of each top concept's positive conditional relevance per region (%)",
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0), title_justify="left")
    table.add_column("channel", justify="left", min_width=8, no_wrap=True)
    for name in SHORT_REGIONS:
        table.add_column(name, justify="right", min_width=6, no_wrap=True)
    regions = report.shares.regions
    assert regions is not None and report.shares.region_area is not None
    for k, channel in enumerate(report.top):
        table.add_row(f"{k + 1}: {channel}", *[_percent(v) for v in regions[k]])
    table.add_row("area", *[_percent(v) for v in report.shares.region_area], style="dim")
    table.caption = ("Regions: left eye, right eye (as seen in the image), brows, nose, mouth, face skin, face "
                     "outline, hair, background, shortcut corner; area: the share a uniform map would get.")
    return table


def _prototype_table(report: ConceptReport) -> Table:
    """Per class, its prototypes (PCX): weight, images, top concepts, and the outliers."""
    table = Table(title="prototypes (Gaussian mixture of concept-relevance vectors per class)", box=box.SIMPLE_HEAD,
                  title_justify="left")
    for column in ("class", "prototype", "weight", "images", "top concepts", "outliers"):
        table.add_column(column, justify="left" if column in ("class", "top concepts") else "right")
    for p in report.prototypes:
        for j in range(len(p.weights)):
            table.add_row(p.class_name if j == 0 else "", str(j), f"{p.weights[j]:.2f}", str(int((p.assignment == j)
                          .sum())), ", ".join(map(str, p.top_concepts(j))),
                          f"{int(p.outlier.sum())} of {len(p.images)}" if j == 0 else "")
    table.caption = ("outliers: log-likelihood below Q1 - 1.5 IQR of the class (images.csv lists every image's "
                     "prototype and log-likelihood)")
    return table
