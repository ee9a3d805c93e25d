"""The figure of `smadlrp concepts`: per top concept, its conditional heatmaps on the analysed images where it is
most relevant, and its reference examples (training images of highest relevance, cropped to the concept's
relevance)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from smadlrp.core.figures import save_figure
from smadlrp.explain.concept_run import ConceptReport
from smadlrp.explain.heatmaps import overlay_rgb

PANEL = 1.25  # inches per panel


def _panel(ax: Axes, image: npt.NDArray[np.uint8], title: str) -> None:
    ax.imshow(image, interpolation="nearest")
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def row_label(report: ConceptReport, k: int) -> str:
    """The label of concept k's row: rank, channel, mean relevance, and where it lies most."""
    channel = report.top[k]
    lines = [f"#{k + 1} channel {channel}", f"mean R {report.summary.mean[channel]:.3g}"]
    region = report.shares.top_region(k)
    if region is not None:
        lines.append(f"{region[0]} {100 * region[1]:.0f} %")
    if report.shares.mask is not None and report.shares.mask[k] == report.shares.mask[k]:
        lines.append(f"in masks {100 * report.shares.mask[k]:.0f} %")
    return "\n".join(lines)


def plot_concepts(report: ConceptReport, path: str | os.PathLike[str], *, title: str) -> Path:
    """One row per top concept: its conditional heatmaps (red: evidence for the attack class), then its reference
    examples, cropped."""
    examples = max((len(e) for e in report.examples), default=0)
    references = max((len(r) for r in report.references), default=0)
    columns = max(1, examples + references)
    rows = len(report.top)
    fig = Figure(figsize=(1.6 + PANEL * columns, 0.6 + PANEL * 1.12 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    pair = 0
    for k in range(rows):
        for column in range(examples):
            ax = axes[k][column]
            if column < len(report.examples[k]):
                image = report.examples[k][column]
                name = report.class_names[report.labels[image]]
                _panel(ax, overlay_rgb(report.example_maps.pixels[pair], report.example_maps.maps[pair]),
                       f"{name}, R {report.example_maps.relevance[pair]:.2g}")
                pair += 1
            else:
                ax.set_axis_off()
        axes[k][0].set_ylabel(row_label(report, k), fontsize=7, rotation=0, ha="right", va="center")
    _references(axes, report, examples)
    fig.suptitle(f"{title}\nleft: conditional heatmaps on the analysed images where the concept is most relevant; "
                 f"right: reference examples (training images of highest relevance, cropped)", fontsize=8)
    return save_figure(fig, path)


def _references(axes: npt.NDArray[Any], report: ConceptReport, first: int) -> None:
    pair = 0
    for k, found in enumerate(report.references):
        for column in range(first, len(axes[k])):
            ax = axes[k][column]
            index = column - first
            if index < len(found):
                rows, cols = report.reference_boxes[pair]
                _panel(ax, report.reference_maps.pixels[pair][rows, cols],
                       f"ref {index + 1}, R {report.reference_maps.relevance[pair]:.2g}")
                pair += 1
            else:
                ax.set_axis_off()
