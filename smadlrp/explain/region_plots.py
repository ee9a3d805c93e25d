"""Figures of the data-set analysis: region shares as bars, mean maps, SpRAy clusters and embedding."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from smadlrp.core.figures import save_figure
from smadlrp.data.regions import REGIONS
from smadlrp.explain.heatmaps import HEATMAP_CMAP, overlay_rgb, robust_scale
from smadlrp.explain.regions import MeanMap, RegionRow
from smadlrp.explain.spray import SprayResult

ALIGNMENT_NOTE = "a mean map means something only for aligned faces (synthetic sets are; align real data first)"


def _heat(ax: Axes, rmap: npt.NDArray[np.float32], title: str) -> None:
    limit = robust_scale(rmap)
    ax.imshow(rmap, cmap=HEATMAP_CMAP, vmin=-limit, vmax=limit, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def _picture(ax: Axes, pixels: npt.NDArray[np.uint8], title: str) -> None:
    ax.imshow(pixels, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def plot_region_shares(rows: Sequence[RegionRow], path: str | os.PathLike[str], *, title: str) -> Path:
    """Grouped bars of each row's positive and absolute relevance share per region, with the area share (what a
    uniform map gets) as a black tick on every bar."""
    fig = Figure(figsize=(12, 6.5), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(REGIONS))
    width = 0.8 / max(1, len(rows))
    for ax, kind in zip(axes, ("positive", "absolute"), strict=True):
        for i, row in enumerate(rows):
            offset = x - 0.4 + (i + 0.5) * width
            ax.bar(offset, 100 * getattr(row, kind), width, label=f"{row.name} ({row.images})")
            ax.scatter(offset, 100 * row.area, marker="_", s=120 * width * 4, color="black", zorder=3,
                       label="area share (uniform map)" if i == 0 else None)
        ax.set_ylabel(f"share of {kind} relevance (%)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, ncols=3)
    axes[1].set_xticks(x, REGIONS, rotation=20)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_mean_maps(means: Sequence[MeanMap], difference: npt.NDArray[np.float32] | None, attack_class: str,
                   path: str | os.PathLike[str], *, title: str) -> Path:
    """Per class and group, the mean input above the mean normalised relevance map; then the difference map
    (attack class minus the other), each map on its own symmetric colour scale (blue < 0 < red)."""
    columns = len(means) + (difference is not None)
    fig = Figure(figsize=(2.1 * columns, 4.6), layout="constrained")
    axes = np.asarray(fig.subplots(2, columns, squeeze=False))
    for col, mean in enumerate(means):
        _picture(axes[0, col], mean.mean_input, f"{mean.name} ({mean.images})\nmean input")
        _heat(axes[1, col], mean.mean_map, "mean relevance")
    if difference is not None:
        axes[0, -1].set_axis_off()
        axes[0, -1].text(0.5, 0.5, f"{attack_class}\nminus\nthe other class", ha="center", va="center",
                         fontsize=9, transform=axes[0, -1].transAxes)
        _heat(axes[1, -1], difference, "difference")
    fig.suptitle(f"{title}\n{ALIGNMENT_NOTE}", fontsize=9)
    return save_figure(fig, path)


def plot_spray_clusters(result: SprayResult, unit_maps: npt.NDArray[np.float32], pixels: npt.NDArray[np.uint8],
                        captions: Sequence[str], path: str | os.PathLike[str], *, title: str) -> Path:
    """A contact sheet: per cluster its prototype (mean normalised map) and its most central images as
    overlays (each on its own scale); `captions` describe each cluster in one line."""
    central = [result.central(c) for c in range(result.count)]
    columns = 1 + max(len(c) for c in central)
    fig = Figure(figsize=(1.5 * columns, 1.75 * result.count + 0.5), layout="constrained")
    axes = np.asarray(fig.subplots(result.count, columns, squeeze=False))
    for cluster, images in enumerate(central):
        _heat(axes[cluster, 0], unit_maps[result.clusters == cluster].mean(axis=0), captions[cluster])
        for col in range(1, columns):
            ax = axes[cluster, col]
            ax.set_axis_off()
            if col <= len(images):
                i = images[col - 1]
                ax.imshow(overlay_rgb(pixels[i], unit_maps[i]), interpolation="nearest")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=100)


def plot_spray_embedding(result: SprayResult, labels: npt.NDArray[np.int64], class_names: Sequence[str],
                         path: str | os.PathLike[str], *, title: str) -> Path:
    """The 2-D spectral embedding of the affinity, coloured by cluster, one marker per class."""
    fig = Figure(figsize=(6.5, 5.5), layout="constrained")
    ax = fig.subplots()
    colours = [f"C{c % 10}" for c in result.clusters]
    for label, (name, marker) in enumerate(zip(class_names, ("o", "x", "s", "^"), strict=False)):
        members = labels == label
        ax.scatter(result.embedding[members, 0], result.embedding[members, 1], c=np.array(colours)[members],
                   marker=marker, s=14, alpha=0.7, label=name)
    for cluster in range(result.count):
        centre = np.median(result.embedding[result.clusters == cluster], axis=0)
        ax.annotate(str(cluster), centre, fontsize=11, weight="bold", color=f"C{cluster % 10}")
    ax.legend(handles=[Line2D([], [], color="black", marker=m, linestyle="", label=name)
                       for name, m in zip(class_names, ("o", "x", "s", "^"), strict=False)], fontsize=8)
    ax.set_xlabel("spectral embedding 1")
    ax.set_ylabel("spectral embedding 2")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
