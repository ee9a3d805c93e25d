"""Explanation figures: relevance heatmaps and overlays (palette PNGs), rule grids, layer traces and
perturbation curves."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from smadlrp.core.errors import SmadlrpError
from smadlrp.core.figures import save_figure
from smadlrp.core.fileio import write_atomic

FloatArray = npt.NDArray[np.float64]

HEATMAP_CMAP = "bwr"  # diverging: blue negative, white zero, red positive relevance
HEATMAP_PERCENTILE = 99.5  # |relevance| at this percentile maps to full colour, so one hot pixel cannot wash out a map


def relevance_map(relevance: npt.ArrayLike) -> FloatArray:
    """(C, H, W) or (H, W) relevance -> (H, W) map, summed over channels."""
    r = np.asarray(relevance, dtype=np.float64)
    return r.sum(axis=0) if r.ndim == 3 else r


def robust_scale(rmap: npt.ArrayLike, percentile: float = HEATMAP_PERCENTILE) -> float:
    """Symmetric colour limit: the `percentile` of |map| (the maximum when that is 0; 1 for an all-zero map)."""
    magnitude = np.abs(np.asarray(rmap, dtype=np.float64))
    limit = float(np.percentile(magnitude, percentile)) if magnitude.size else 0.0
    if limit <= 0.0:
        limit = float(magnitude.max(initial=0.0))
    return limit if limit > 0.0 else 1.0


@functools.cache
def heatmap_lut() -> npt.NDArray[np.uint8]:
    """(256, 3) uint8 colours of HEATMAP_CMAP."""
    return (colormaps[HEATMAP_CMAP](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)


def heatmap_index(rmap: npt.ArrayLike, limit: float | None = None) -> npt.NDArray[np.uint8]:
    """(H, W) relevance -> (H, W) uint8 entries of the heatmap colour table: -limit -> 0, zero -> 128 (white),
    +limit -> 255, clipped beyond (default limit: robust_scale)."""
    r = np.asarray(rmap, dtype=np.float32)
    unit = np.clip(r * np.float32(127.5 / (limit or robust_scale(r))) + np.float32(127.5), 0.0, 255.0)
    return np.rint(unit).astype(np.uint8)


def heatmap_rgb(rmap: npt.ArrayLike, limit: float | None = None) -> npt.NDArray[np.uint8]:
    """(H, W) relevance -> (H, W, 3) uint8 colours, zero at white, clipped at +-limit (default robust_scale)."""
    return heatmap_lut()[heatmap_index(rmap, limit)]


def overlay_rgb(image: npt.NDArray[np.uint8], rmap: npt.ArrayLike, alpha: float = 0.6,
                limit: float | None = None, heat: npt.NDArray[np.uint8] | None = None) -> npt.NDArray[np.uint8]:
    """Blend the heatmap over a grey version of `image` ((H, W, 3) uint8), opaque where relevance is large.
    `heat` is `heatmap_rgb(rmap, limit)` when the caller already has it."""
    r = np.asarray(rmap, dtype=np.float32)
    limit = limit or robust_scale(r)
    heat = heatmap_rgb(r, limit) if heat is None else heat
    weight = np.clip(np.abs(r) * np.float32(alpha / limit), 0.0, np.float32(alpha))[..., None]
    grey = image.mean(axis=2, keepdims=True, dtype=np.float32)
    blended = grey + weight * (heat.astype(np.float32) - grey)  # (1 - weight) * grey + weight * heat
    return np.clip(blended + np.float32(0.5), 0, 255).astype(np.uint8)


def save_rgb(array: npt.NDArray[np.uint8], path: str | os.PathLike[str]) -> Path:
    """Write an (H, W, 3) uint8 array as PNG (fast zlib level), atomically."""
    return write_atomic(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG", compress_level=1))


def save_heatmap(index: npt.NDArray[np.uint8], path: str | os.PathLike[str]) -> Path:
    """Write `heatmap_index` output as a palette PNG whose palette is the heatmap colour table, atomically: it
    decodes to exactly `heatmap_rgb`'s colours, a third of the pixel data, and encodes several times faster."""
    image = Image.frombytes("P", (index.shape[1], index.shape[0]), np.ascontiguousarray(index).tobytes())
    image.putpalette(heatmap_lut().tobytes())
    return write_atomic(path, lambda tmp: image.save(tmp, format="PNG", compress_level=1))


def rule_grid_figure(image: npt.NDArray[np.uint8], maps: Mapping[str, npt.ArrayLike], *, title: str = "") -> Figure:
    """The input plus one heatmap panel per rule (each map scaled on its own), up to six panels per row."""
    panels = len(maps) + 1
    columns = min(panels, 6)
    rows = math.ceil(panels / columns)
    fig = Figure(figsize=(2.2 * columns, 2.4 * rows + (0.3 if title else 0.0)), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    axes[0].imshow(image)
    axes[0].set_title("input", fontsize=9)
    for ax, (name, rmap) in zip(axes[1:], maps.items(), strict=False):
        ax.imshow(heatmap_rgb(rmap))
        ax.set_title(name, fontsize=9)
    for ax in axes[panels:]:
        fig.delaxes(ax)
    for ax in axes[:panels]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_rule_grid(image: npt.NDArray[np.uint8], maps: Mapping[str, npt.ArrayLike], path: str | os.PathLike[str],
                   *, title: str = "") -> Path:
    """Write `rule_grid_figure` to `path`."""
    return save_figure(rule_grid_figure(image, maps, title=title), path, dpi=100)


def plot_condition_grid(rows: Sequence[tuple[str, npt.NDArray[np.uint8], Mapping[str, npt.ArrayLike]]],
                        path: str | os.PathLike[str], *, title: str = "") -> Path:
    """One row per image condition (label, input (H, W, 3) uint8 as the model saw it, rule -> (H, W) map): the
    input, then each rule's heatmap, each map on its own robust scale."""
    columns = 1 + len(rows[0][2])
    fig = Figure(figsize=(2.0 * columns, 2.1 * len(rows) + (0.3 if title else 0.0)), layout="constrained")
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for (label, image, maps), line in zip(rows, axes, strict=True):
        line[0].imshow(image)
        line[0].set_title(label, fontsize=9)
        for ax, (rule, rmap) in zip(line[1:], maps.items(), strict=True):
            ax.imshow(heatmap_rgb(rmap))
            ax.set_title(f"{rule} ({label})", fontsize=8)
        for ax in line:
            ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=100)


def plot_layer_maps(maps: Sequence[tuple[str, npt.ArrayLike]], path: str | os.PathLike[str],
                    note: str | None = None) -> Path:
    """Channel-summed relevance maps ((H, W) each, any sizes), one panel per named layer, in reading order;
    `note` becomes the figure's title."""
    if not maps:
        raise SmadlrpError("no spatial relevance maps to plot")
    columns = min(len(maps), 6)
    rows = math.ceil(len(maps) / columns)
    fig = Figure(figsize=(2.0 * columns, 2.2 * rows + (0.3 if note else 0.0)), layout="constrained")
    if note:
        fig.suptitle(note, fontsize=9)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (name, rmap) in zip(axes, maps, strict=False):
        ax.imshow(heatmap_rgb(rmap), interpolation="nearest")
        ax.set_title(name, fontsize=8)
    for ax in axes[len(maps):]:
        fig.delaxes(ax)
    for ax in axes[:len(maps)]:
        ax.set_axis_off()
    return save_figure(fig, path, dpi=100)


def plot_perturbation_curves(curves: Mapping[str, npt.ArrayLike], path: str | os.PathLike[str], *,
                             aopc: Mapping[str, float] | None = None, baselines: Sequence[str] = (),
                             ylabel: str = "mean drop of the target logit", title: str = "Region perturbation",
                             lerf: Mapping[str, npt.ArrayLike] | None = None,
                             abpc: Mapping[str, float] | None = None) -> Path:
    """Perturbation curves, one line per method: name -> (S + 1,) mean score drop f(x_0) - f(x_k) after k patches
    removed most relevant first; with `lerf` (the same for least relevant first) a second panel beside it.

    `aopc` and `abpc` (one value per curve) are quoted in the legend, sorted best first (by ABPC when given);
    `baselines` are drawn dashed; a method has the same colour in both panels.
    """
    if not curves:
        raise SmadlrpError("no perturbation curve to plot")
    for given, what in ((aopc, "aopc"), (lerf, "lerf"), (abpc, "abpc")):
        if given is not None and set(given) != set(curves):
            raise ValueError(f"{what} must give one value per curve")
    rank = abpc or aopc
    names = sorted(curves, key=lambda n: -rank[n]) if rank else list(curves)
    colours = colormaps["tab20"](np.linspace(0.0, 1.0, 20))
    fig = Figure(figsize=(14.0 if lerf else 9.0, 5.5), layout="constrained")
    panels = [(fig.add_subplot(1, 2 if lerf else 1, 1), curves, "most relevant first")]
    if lerf:
        panels.append((fig.add_subplot(1, 2, 2, sharey=panels[0][0]), lerf, "least relevant first"))
    for ax, drawn, order in panels:
        for i, name in enumerate(names):
            values = np.asarray(drawn[name], dtype=np.float64)
            quoted = [f"AOPC {aopc[name]:.3g}"] if aopc else []
            quoted += [f"ABPC {abpc[name]:.3g}"] if abpc else []
            ax.plot(np.arange(values.size), values, color=colours[i % 20], linewidth=1.6,
                    label=f"{name} ({', '.join(quoted)})" if quoted else name,
                    linestyle="--" if name in baselines else "-")
        ax.set_xlabel(f"patches removed ({order})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {order}" if lerf else title, fontsize=10)
        ax.grid(True, alpha=0.3)
    panels[-1][0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return save_figure(fig, path)


def plot_randomisation(spearman: Mapping[str, Sequence[float | None]], ssim: Mapping[str, Sequence[float | None]],
                       layers: Sequence[str], path: str | os.PathLike[str], *, baselines: Sequence[str] = (),
                       threshold: float | None = None, title: str = "Cascading randomisation (MPRT)") -> Path:
    """MPRT curves: per method the mean Spearman correlation (left) and SSIM (right) of |map| with the trained
    model's map, against the randomised depth (0: trained; then `layers`, output first, cumulatively). A
    `threshold` is drawn on the Spearman panel."""
    if not spearman or set(spearman) != set(ssim):
        raise ValueError("give the Spearman and SSIM curves of the same methods")
    colours = colormaps["tab20"](np.linspace(0.0, 1.0, 20))
    fig = Figure(figsize=(14.0, 5.8), layout="constrained")
    first = fig.add_subplot(1, 2, 1)
    axes = [first, fig.add_subplot(1, 2, 2, sharey=first)]
    ticks = ["trained", *layers]
    for ax, drawn, label, short in ((axes[0], spearman, "mean Spearman rank correlation", "Spearman"),
                                    (axes[1], ssim, "mean SSIM", "SSIM")):
        for i, name in enumerate(drawn):
            values = [1.0, *(np.nan if v is None else v for v in drawn[name])]
            ax.plot(np.arange(len(values)), values, marker="o", markersize=3, color=colours[i % 20],
                    linewidth=1.4, linestyle="--" if name in baselines else "-", label=name)
        ax.set_xticks(np.arange(len(ticks)), ticks, rotation=60, ha="right", fontsize="small")
        ax.set_ylabel(f"{label} with the trained map")
        ax.set_xlabel("randomised down to layer (cumulative, from the output)")
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{title}: {short}", fontsize=10)
    if threshold is not None:
        axes[0].axhline(threshold, color="black", linewidth=1.0, linestyle=":", label=f"pass below {threshold:g}")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return save_figure(fig, path)
