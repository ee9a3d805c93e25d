"""`smadlrp regions`: where a detector's relevance goes over a split, per face region, as mean maps and as
SpRAy strategy clusters."""

from __future__ import annotations

import io
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich import box
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
from smadlrp.cli.defaults import (
    data_source,
    find_checkpoint,
    open_model,
)
from smadlrp.core.fileio import write_text_atomic
from smadlrp.data.paths import prepare_out_dir
from smadlrp.data.protocol import csv_writer
from smadlrp.data.regions import REGIONS
from smadlrp.explain.region_plots import (
    ALIGNMENT_NOTE,
    plot_mean_maps,
    plot_region_shares,
    plot_spray_clusters,
    plot_spray_embedding,
)
from smadlrp.explain.regions import (
    RegionRow,
    RelevanceMaps,
    difference_map,
    load_region_ids,
    mean_maps,
    normalised,
    region_inputs,
    region_sums,
    region_table,
    relevance_maps,
)
from smadlrp.explain.run import build_explainers, parse_target, resolve_rules
from smadlrp.explain.spray import (
    SPRAY_NEIGHBOURS,
    SPRAY_SIZE,
    ClusterMix,
    SprayResult,
    check_cluster_count,
    cluster_mix,
    spray,
)
from smadlrp.lrp.composites import DEFAULT_ATTENTION, SUM_SPLITS
from smadlrp.lrp.fitted_patterns import weights_fingerprint
from smadlrp.report.numbers import share

SHORT_NAMES = ("L eye", "R eye", "brows", "nose", "mouth", "skin", "outl", "hair", "bgr", "short")
FILES = {"shares": "regions.png", "means": "mean-maps.png", "clusters": "spray-clusters.png",
         "embedding": "spray-embedding.png", "csv": "spray-clusters.csv"}


@app.command()
@command()
def regions(
    checkpoint: CheckpointOption = None,
    data: DataOption = None,
    protocol: ProtocolOption = None,
    split: Annotated[str, typer.Option(help="Split to analyse.")] = "test",
    rule: Annotated[str, typer.Option("--rule", "-r", help="Rule or composite.")] = "epsilon-plus",
    target: Annotated[str, typer.Option(help="Class whose relevance is analysed: a class name, an index, or "
                                             "predicted; default: the attack class.")] = "",
    max_images: Annotated[int | None, typer.Option("--max-images", min=1,
                                                   help="At most this many images, spread evenly over the split.")]
    = None,
    by: Annotated[str | None, typer.Option("--by", metavar="COLUMN",
                                           help="Also report per group of this manifest or protocol column, "
                                                "e.g. morph_type.")] = None,
    regions_folder: Annotated[Path | None, typer.Option("--regions", file_okay=False,
                                                        help="Folder of region maps (docs/regions.md); default: "
                                                             "the data set's region_path column.")] = None,
    clusters: Annotated[int | None, typer.Option("--clusters", metavar="K",
                                                 help="SpRAy clusters; default: from the eigengap.")] = None,
    out: Annotated[Path, typer.Option(help="Output folder for the figures and the cluster CSV.")]
    = Path("regions-out"),
    bonafide_label: BonafideLabelOption = "bonafide",
    attack_label: AttackLabelOption = "morph",
    batch_size: BatchSizeOption = 64,
    workers: WorkersOption = 0,
    device: DeviceOption = "auto",
    sum_split: SumSplitOption = SUM_SPLITS[0],
    attention: AttentionOption = DEFAULT_ATTENTION,
    json_out: JsonOption = None,
) -> None:
    """Where relevance goes over a split: shares per face region, mean maps, and SpRAy strategy clusters."""
    check_cluster_count(clusters)
    checkpoint = find_checkpoint(checkpoint)
    plan = file_plan({"--json": json_out}, ("--out", out, tuple(FILES.values())))
    plan.reads("the checkpoint", checkpoint)
    plan.reads("the protocol file", protocol)
    model, meta, torch_device = open_model(checkpoint, device)
    (rule,) = resolve_rules([rule], have_patterns=False)
    explainer = build_explainers(model, meta, [rule], {}, None, sum_split, attention, notice)[rule]
    wanted = parse_target(target or meta.attack_class, meta.class_names, meta.attack_class)
    source = data_source(data, protocol, bonafide_label, attack_label, meta)
    index = source.split(split, meta.class_names, meta.attack_class, warn=notice)
    plan.reads(f"an image of the {split} split", (sample.path for sample in index.samples), keep=False)
    plan.reads("the group file", index.groups_file)
    inputs = region_inputs(index, by=by, regions_folder=regions_folder, max_images=max_images,
                           attack_index=meta.attack_index)
    ids = load_region_ids(inputs, meta.input_size)
    prepare_out_dir(out)
    start = time.perf_counter()
    with progress_bar(ImagesPerSecond()) as bar:
        task = bar.add_task(f"relevance ({rule})", total=len(inputs.paths))
        relevance = relevance_maps(inputs.paths, meta, explainer, wanted, batch_size=batch_size, workers=workers,
                                   device=torch_device, on_batch=lambda n: bar.advance(task, n))
    relevance_seconds = time.perf_counter() - start
    names = meta.class_names
    rows = region_table(region_sums(relevance.maps, ids), inputs.labels, inputs.groups, names)
    target_name = meta.class_names[wanted] if isinstance(wanted, int) else wanted or "predicted class"
    subject = f"{checkpoint.name}, {rule}, relevance for {target_name}, {split} split of {source.name}"
    for table in _region_tables(rows, subject):
        console.print(table)
    means = mean_maps(relevance.maps, relevance.pixels, inputs.labels, inputs.groups, names)
    difference = difference_map(means, meta.attack_class)
    plot_region_shares(rows, out / FILES["shares"], title=subject)
    plot_mean_maps(means, difference, meta.attack_class, out / FILES["means"], title=subject)
    result = spray(relevance.maps, clusters)
    mixes = [cluster_mix(result, c, inputs.labels, inputs.groups, names) for c in range(result.count)]
    console.print(_cluster_table(result, mixes, relevance.p_attack, by))
    _plot_spray(result, mixes, relevance, inputs.labels, names, out, subject)
    write_text_atomic(out / FILES["csv"], _cluster_csv(result, inputs.paths, inputs.labels, inputs.groups,
                                                       relevance.p_attack, names))
    seconds = {"relevance": relevance_seconds, "rest": time.perf_counter() - start - relevance_seconds}
    console.print(f"wrote {', '.join(FILES.values())} to {out} ({ALIGNMENT_NOTE}); {seconds['relevance']:.1f} s "
                  f"for the relevance pass, {seconds['rest']:.1f} s for tables, figures and SpRAy", highlight=False)
    write_json(json_out, {
        "checkpoint": str(checkpoint), "weights_fingerprint": weights_fingerprint(model.state_dict()),
        "data": source.name, "split": split, "rule": rule, "sum_split": sum_split,
        "attention": attention, "target": target_name,
        "by": by, "images": len(inputs.paths), "regions": list(REGIONS),
        "rows": [row.as_dict() for row in rows],
        "spray": {"size": min(meta.input_size, SPRAY_SIZE), "neighbours": SPRAY_NEIGHBOURS,
                  "clusters": result.count, "chosen_by": result.chosen_by,
                  "laplacian_eigenvalues": result.eigenvalues.tolist(),
                  "per_cluster": [{**asdict(mix),
                                   "mean_p_attack": float(relevance.p_attack[result.clusters == mix.cluster].mean()),
                                   "central": [str(inputs.paths[i]) for i in result.central(mix.cluster)]}
                                  for mix in mixes]},
        "files": {key: str(out / name) for key, name in FILES.items()}, "seconds": seconds,
    })


def _plot_spray(result: SprayResult, mixes: list[ClusterMix], relevance: RelevanceMaps, labels: np.ndarray,
                names: list[str], out: Path, subject: str) -> None:
    """The SpRAy figures: each cluster's prototype and most central images, and the spectral embedding."""
    captions = [f"cluster {mix.cluster} ({mix.images})" for mix in mixes]
    plot_spray_clusters(result, normalised(relevance.maps), relevance.pixels, captions, out / FILES["clusters"],
                        title=f"SpRAy: prototype and the {max(len(result.central(c)) for c in range(result.count))} "
                              f"most central images per cluster\n{subject}")
    plot_spray_embedding(result, labels, names, out / FILES["embedding"],
                         title=f"SpRAy spectral embedding, {result.count} clusters ({result.chosen_by})")


def _region_tables(rows: list[RegionRow], subject: str) -> list[Table]:
    """One table per class or class and group: positive, absolute relevance and area share per region (%)."""
    tables = []
    for n, row in enumerate(rows):
        heading = f"{row.name}: {row.images} images"
        table = Table(title=f"share of relevance per region (%): {subject}\n{heading}" if n == 0 else heading,
                      box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0), title_justify="left")
        table.add_column("%", justify="left", min_width=4, no_wrap=True)
        for name in SHORT_NAMES:
            table.add_column(name, justify="right", min_width=6, no_wrap=True)
        for kind, label in (("positive", "R+"), ("absolute", "|R|"), ("area", "area")):
            table.add_row(label, *map(share, getattr(row, kind)))
        tables.append(table)
    tables[-1].caption = ("R+ / |R|: positive / absolute relevance, the mean over the images of each image's share; "
                          "area: the share a uniform map would get (the reference). Each row sums to 100. Regions: "
                          "left eye, right eye (as seen in the image), brows, nose, mouth, face skin, face outline, "
                          "hair, background, shortcut corner.")
    return tables


def _cluster_table(result: SprayResult, mixes: list[ClusterMix], p_attack: np.ndarray,
                   by: str | None) -> Table:
    table = Table(title=f"SpRAy: {result.count} clusters ({result.chosen_by}) of the maps pooled to "
                        f"{SPRAY_SIZE} px, {SPRAY_NEIGHBOURS}-nearest-neighbour affinity", box=box.SIMPLE_HEAD)
    for column in ("cluster", "images", "classes", *([f"{by}"] if by else []), "mean P(attack)"):
        table.add_column(column, justify="right" if column in ("cluster", "images", "mean P(attack)") else "left",
                         overflow="fold")
    for mix in mixes:
        classes = ", ".join(f"{n} {name}" for name, n in mix.classes.items())
        groups = [", ".join(f"{n} {g}" for g, n in mix.groups.items())] if by else []
        mean = p_attack[result.clusters == mix.cluster].mean()
        table.add_row(str(mix.cluster), str(mix.images), classes, *groups, f"{mean:.3f}")
    return table


def _cluster_csv(result: SprayResult, paths: list[Path], labels: np.ndarray, groups: list[str], p_attack: np.ndarray,
                 names: list[str]) -> str:
    text = io.StringIO()
    writer = csv_writer(text)
    writer.writerow(["path", "class", "group", "cluster", "distance_to_centre", "embedding_1", "embedding_2",
                     "p_attack"])
    for i, path in enumerate(paths):
        writer.writerow([str(path), names[labels[i]], groups[i], int(result.clusters[i]), f"{result.distance[i]:.6f}",
                         f"{result.embedding[i, 0]:.6f}", f"{result.embedding[i, 1]:.6f}", f"{p_attack[i]:.6f}"])
    return text.getvalue()
