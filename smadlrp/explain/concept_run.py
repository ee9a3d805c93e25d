"""The work behind `smadlrp concepts`: scan a split's concept relevances, rank the concepts, find where the top ones
lie and their reference images, fit the prototypes, and lay the numbers out for JSON and CSV. No printing here.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from smadlrp.core.errors import SmadlrpError
from smadlrp.data.loading import SplitIndex
from smadlrp.data.protocol import csv_writer
from smadlrp.data.regions import REGIONS, REGIONS_FOLDER, region_map_path
from smadlrp.detector.checkpoint import CheckpointMeta
from smadlrp.explain.compare import artifact_masks
from smadlrp.explain.concept_prototypes import ClassPrototypes, fit_prototypes
from smadlrp.explain.concepts import (
    ConceptMaps,
    ConceptScan,
    ConceptShares,
    ConceptSummary,
    concept_maps,
    conditional_shares,
    relevance_box,
    scan_layer,
    summarise,
    top_images,
)
from smadlrp.explain.regions import REGION_PATH_COLUMN, RegionInputs, choose, load_region_ids
from smadlrp.lrp import Explainer
from smadlrp.lrp.conditional import ConceptExplainer, ConceptLayer

EXAMPLES = 3  # conditional heatmaps per concept in the figure: the analysed images where it is most relevant
Progress = Callable[[str, int], Callable[[int], None]]  # (description, total) -> advance(n)


@dataclass(frozen=True)
class ConceptSettings:
    """What to analyse: the `layer` (None: the default), the `top` concepts, at most `max_images` images per split,
    `references` per concept, at most `prototypes` per class, and how to batch."""

    layer: str | None = None
    top: int = 8
    max_images: int | None = None
    references: int = 4
    prototypes: int = 4
    batch_size: int = 32
    workers: int = 0
    seed: int = 0


@dataclass
class ConceptReport:
    """Everything `concepts` found (positions index `paths`, the analysed images, or `train_paths`)."""

    layer: ConceptLayer
    layers: list[str]
    paths: list[Path]
    labels: npt.NDArray[np.int64]
    class_names: list[str]
    scan: ConceptScan
    summary: ConceptSummary
    top: list[int]
    shares: ConceptShares
    examples: list[list[int]]
    example_maps: ConceptMaps
    train_paths: list[Path]
    references: list[list[int]]
    reference_maps: ConceptMaps
    reference_boxes: list[tuple[slice, slice]]
    prototypes: list[ClassPrototypes]
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def region_ids(index: SplitIndex, chosen: list[int], size: int) -> tuple[npt.NDArray[np.uint8] | None, str | None]:
    """The chosen images' region ids at the model's input size from the `region_path` column or the set's regions/
    folder, or None and why not."""
    paths = [index.samples[i].path for i in chosen]
    if REGION_PATH_COLUMN in index.groups and all(index.groups[REGION_PATH_COLUMN][i] for i in chosen):
        maps = [index.root / index.groups[REGION_PATH_COLUMN][i] for i in chosen]
    elif (index.root / REGIONS_FOLDER).is_dir():
        maps = [region_map_path(index.root / REGIONS_FOLDER, index.root, p) for p in paths]
    else:
        return None, f"no region maps for {index.root} (no {REGION_PATH_COLUMN} column, no {REGIONS_FOLDER}/ folder)"
    inputs = RegionInputs(paths, index.labels[chosen], [""] * len(chosen), maps)
    return load_region_ids(inputs, size), None


def analyse_concepts(explainer: Explainer, meta: CheckpointMeta, index: SplitIndex, train: SplitIndex | None,
                     settings: ConceptSettings, device: torch.device, progress: Progress) -> ConceptReport:
    """The whole analysis of `index` (references from `train`, the training split, when given)."""
    start, notes = time.perf_counter(), []
    example = torch.zeros(1, 3, meta.input_size, meta.input_size)
    concepts = ConceptExplainer(explainer, example, settings.layer)
    chosen = choose(len(index.samples), settings.max_images)
    paths, labels = [index.samples[i].path for i in chosen], index.labels[chosen]
    batching: dict[str, Any] = {"batch_size": settings.batch_size, "workers": settings.workers, "device": device}
    scan = scan_layer(concepts, paths, meta, **batching, on_batch=progress("concept relevance", len(paths)))
    summary = summarise(scan, labels, meta.class_names, meta.attack_index)
    top = summary.ranking[:min(settings.top, concepts.layer.channels)]
    ids, reason = region_ids(index, chosen, meta.input_size)
    notes += [reason] if reason else []
    masks, reason = artifact_masks(index, chosen, meta.attack_index, meta.input_size)
    notes += [f"no artifact-mask shares: {reason}"] if reason else []
    shares = conditional_shares(concepts, paths, top, meta, region_ids=ids, masks={p: m for p, (m, _) in masks.items()},
                                **batching, on_batch=progress(f"conditional maps ({len(top)} concepts)", len(paths)))
    timing = {"analysed split": time.perf_counter() - start}
    examples = top_images(scan.channels, top, EXAMPLES)
    example_maps = concept_maps(concepts, paths, _pairs(examples, top), meta, **batching)
    train_paths, train_scan = _training_scan(concepts, index, train, chosen, scan, paths, meta, settings, batching,
                                             progress, notes)
    references = _references(train_scan, top, settings.references, examples if train_paths is paths else None)
    reference_maps = concept_maps(concepts, train_paths, _pairs(references, top), meta, **batching)
    timing["references"] = time.perf_counter() - start - timing["analysed split"]
    prototypes = fit_prototypes(scan.channels, labels, meta.class_names, settings.prototypes, settings.seed)
    return ConceptReport(concepts.layer, list(concepts.layers), paths, labels, list(meta.class_names), scan, summary,
                         top, shares, examples, example_maps, train_paths, references, reference_maps,
                         [relevance_box(m) for m in reference_maps.maps], prototypes, notes,
                         {**timing, "total": time.perf_counter() - start})


def _references(scan: ConceptScan | None, top: list[int], count: int, shown: list[list[int]] | None
                ) -> list[list[int]]:
    """Per concept, its `count` reference examples (relevance maximisation over the training images), leaving out
    the images `shown` as its heatmap examples (when the analysed split is the training split)."""
    if scan is None:
        return [[] for _ in top]
    extra = max((len(s) for s in shown), default=0) if shown else 0
    found = top_images(scan.channels, top, count + extra)
    return [[i for i in f if not shown or i not in shown[k]][:count] for k, f in enumerate(found)]


def _pairs(images: list[list[int]], channels: list[int]) -> list[tuple[int, int]]:
    return [(image, channel) for found, channel in zip(images, channels, strict=True) for image in found]


def _training_scan(concepts: ConceptExplainer, index: SplitIndex, train: SplitIndex | None, chosen: list[int],
                   scan: ConceptScan, paths: list[Path], meta: CheckpointMeta, settings: ConceptSettings,
                   batching: dict[str, Any], progress: Progress, notes: list[str]
                   ) -> tuple[list[Path], ConceptScan | None]:
    """The training images and their concept relevances (those of the analysed split when it is the training
    split), for relevance maximisation."""
    if train is None:
        notes.append("no training split: no reference examples")
        return [], None
    if train.split == index.split and train.root == index.root:
        return paths, scan
    picked = choose(len(train.samples), settings.max_images)
    train_paths = [train.samples[i].path for i in picked]
    return train_paths, scan_layer(concepts, train_paths, meta, **batching,
                                   on_batch=progress("references (training split)", len(train_paths)))


def concept_rows(report: ConceptReport) -> list[dict[str, Any]]:
    """One row per top concept: channel, rank, mean relevance overall and per class, mean relative relevance,
    and its conditional shares (per region, inside the artifact masks)."""
    rows = []
    shares = report.shares
    for k, channel in enumerate(report.top):
        rows.append({
            "channel": channel, "rank": k + 1, "mean_relevance": float(report.summary.mean[channel]),
            "mean_relative": float(report.summary.mean_relative[channel]),
            "mean_by_class": {name: float(v[channel]) for name, v in report.summary.by_class.items()},
            "artifact_mask": None if shares.mask is None else _number(shares.mask[k]),
            "regions": None if shares.regions is None else {
                region: _number(shares.regions[k, r]) for r, region in enumerate(REGIONS)},
            "examples": [str(report.paths[i]) for i in report.examples[k]],
            "references": [str(report.train_paths[i]) for i in report.references[k]],
        })
    return rows


def _number(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def report_json(report: ConceptReport) -> dict[str, Any]:
    """The JSON document of the analysis (without the command's own settings)."""
    layer = report.layer
    return {
        "layer": {"name": layer.name, "op": layer.op, "shape": list(layer.shape), "channels": layer.channels,
                  "unit": layer.unit},
        "layers": report.layers, "images": len(report.paths), "training_images": len(report.train_paths),
        "area": {"regions": None if report.shares.region_area is None else dict(
            zip(REGIONS, report.shares.region_area.tolist(), strict=True)),
            "artifact_mask": report.shares.mask_area, "mask_images": report.shares.mask_images},
        "concepts": concept_rows(report),
        "all_channels": {"mean_relevance": report.summary.mean.tolist(),
                         "mean_relative": report.summary.mean_relative.tolist(), "ranking": report.summary.ranking,
                         "ranked_by": report.summary.ranked_by},
        "prototypes": [{"class": p.class_name, "images": len(p.images), "threshold": p.threshold,
                        "outliers": [str(report.paths[i]) for i in p.images[p.outlier]],
                        "components": [{"weight": float(p.weights[j]), "images": int((p.assignment == j).sum()),
                                        "top_concepts": p.top_concepts(j),
                                        "most_typical": _path(report, p.most_typical(j))}
                                       for j in range(len(p.weights))]}
                       for p in report.prototypes],
        "notes": report.notes, "seconds": report.seconds,
    }


def _path(report: ConceptReport, position: int | None) -> str | None:
    return None if position is None else str(report.paths[position])


def concepts_csv(report: ConceptReport) -> str:
    """One row per channel of the layer (ranked): its mean relevance overall and per class, mean relative
    relevance, and for the top concepts their conditional shares (empty for the others)."""
    text = io.StringIO()
    writer = csv_writer(text)
    classes = list(report.summary.by_class)
    writer.writerow(["rank", "channel", "mean_relevance", *[f"mean_{c}" for c in classes], "mean_relative", "top",
                     "artifact_mask", *REGIONS])
    shares, position = report.shares, {c: k for k, c in enumerate(report.top)}
    for rank, channel in enumerate(report.summary.ranking, start=1):
        k = position.get(channel)
        mask = "" if k is None or shares.mask is None else _cell(shares.mask[k])
        regions = [""] * len(REGIONS) if k is None or shares.regions is None else [
            _cell(v) for v in shares.regions[k]]
        writer.writerow([rank, channel, f"{report.summary.mean[channel]:.6g}",
                         *[f"{report.summary.by_class[c][channel]:.6g}" for c in classes],
                         f"{report.summary.mean_relative[channel]:.6g}", int(k is not None), mask, *regions])
    return text.getvalue()


def _cell(value: float) -> str:
    return "" if np.isnan(value) else f"{value:.6f}"


def images_csv(report: ConceptReport) -> str:
    """One row per analysed image: class, P(attack), its prototype, log-likelihood and outlier flag, and its three
    most relevant concepts."""
    text = io.StringIO()
    writer = csv_writer(text)
    writer.writerow(["path", "class", "p_attack", "prototype", "log_likelihood", "outlier", "top_concepts"])
    fitted: dict[int, tuple[int, float, bool]] = {}
    for p in report.prototypes:
        for n, image in enumerate(p.images):
            fitted[int(image)] = (int(p.assignment[n]), float(p.log_likelihood[n]), bool(p.outlier[n]))
    for i, path in enumerate(report.paths):
        prototype, score, outlier = fitted.get(i, (-1, float("nan"), False))
        top = " ".join(str(int(c)) for c in np.argsort(-report.scan.channels[i], kind="stable")[:3])
        writer.writerow([str(path), report.class_names[report.labels[i]], f"{report.scan.p_attack[i]:.6f}",
                         "" if prototype < 0 else prototype, "" if np.isnan(score) else f"{score:.4f}",
                         int(outlier), top])
    return text.getvalue()


def check_settings(settings: ConceptSettings) -> None:
    """SmadlrpError for settings that leave nothing to analyse."""
    if settings.top < 1 or settings.references < 0 or settings.prototypes < 1:
        raise SmadlrpError("--top and --prototypes must be at least 1, --references at least 0")

