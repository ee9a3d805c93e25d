"""Figures on disk: DET curves, training curves, relevance heatmaps, overlays, rule grids and layer traces.

Figures are built on matplotlib's `Figure` with the Agg canvas (no pyplot global state, no display needed) and
written atomically; the format follows the file suffix (.png, .pdf, .svg, ...).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from smadlrp.errors import SmadlrpError, UsageError
from smadlrp.fileio import write_atomic

FloatArray = npt.NDArray[np.float64]

_NORMAL = NormalDist()
# Rates 0 and 1 have no normal deviate: they are drawn at this distance from the edge (outside the axes).
DET_CLIP = 1e-6
# DET ticks (fractions) for axes from 0.5 % or more, and a sparser set for wider axes; labels are in %.
DET_TICKS: tuple[float, ...] = (
    0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.98, 0.99,
)  # fmt: skip
DET_TICKS_WIDE: tuple[float, ...] = (
    0.0001, 0.001, 0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999,
)  # fmt: skip
# Where the axes may start: the largest of these at or below the smallest positive rate (at most 1 %).
_DET_LOWS: tuple[float, ...] = (0.0001, 0.001, 0.005, 0.01)


def probit(rates: npt.ArrayLike) -> FloatArray:
    """Normal deviate (inverse standard normal CDF) of each rate, clipped to [DET_CLIP, 1 - DET_CLIP]."""
    clipped = np.clip(np.asarray(rates, dtype=np.float64), DET_CLIP, 1.0 - DET_CLIP)
    deviates = [_NORMAL.inv_cdf(float(p)) for p in clipped.ravel()]
    return np.asarray(deviates, dtype=np.float64).reshape(clipped.shape)


def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: int = 150) -> Path:
    """Write `fig` atomically to `path` in the format its suffix names; UsageError for an unknown suffix."""
    canvas = FigureCanvasAgg(fig)
    fmt = Path(path).suffix.lower().lstrip(".")
    supported = canvas.get_supported_filetypes()
    if fmt not in supported:
        choices = ", ".join(f".{name}" for name in sorted(supported))
        raise UsageError(f"{path}: cannot write a figure with suffix {fmt!r}; use one of {choices}")
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi))


def _det_low(curves: Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike]]) -> float:
    """The lower axis limit: the largest of _DET_LOWS at or below every positive rate of every curve."""
    rates = np.concatenate([np.ravel(np.asarray(r, dtype=np.float64)) for pair in curves.values() for r in pair])
    positive = rates[rates > 0]
    smallest = float(positive.min()) if positive.size else _DET_LOWS[-1]
    fitting = [low for low in _DET_LOWS if low <= smallest]
    return fitting[-1] if fitting else _DET_LOWS[0]


def _det_axes(ax: Axes, low: float) -> None:
    """Probit-scaled axes from `low` to 1 - `low` with ticks in %, a grid and the APCER = BPCER diagonal."""
    candidates = DET_TICKS if low >= DET_TICKS[0] else DET_TICKS_WIDE
    ticks = [tick for tick in candidates if low <= tick <= 1.0 - low + 1e-12]
    positions = probit(ticks)
    labels = [f"{100.0 * tick:g}" for tick in ticks]
    edge = float(probit([low])[0])
    ax.set_xticks(positions, labels)
    ax.set_yticks(positions, labels)
    ax.set_xlim(edge, -edge)
    ax.set_ylim(edge, -edge)
    ax.grid(True, alpha=0.3)
    ax.plot([edge, -edge], [edge, -edge], color="grey", linestyle=":", linewidth=1, label="APCER = BPCER")
    ax.set_xlabel("APCER (%): morphs accepted as bona fide")
    ax.set_ylabel("BPCER (%): bona fide called morphs")
    ax.set_aspect("equal")


def plot_det(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | os.PathLike[str],
    *,
    eer: Mapping[str, float] | None = None,
    title: str = "DET curve",
) -> Path:
    """Draw DET curves and write them to `path`.

    curves: name -> (APCER (T,), BPCER (T,)) as from `metrics.det_points`; eer: name -> D-EER (fraction),
    drawn as a point on the diagonal and quoted in the legend. Both axes use the probit scale, ticks in %.
    """
    if not curves:
        raise SmadlrpError("no DET curve to plot")
    eer = eer or {}
    unknown = sorted(set(eer) - set(curves))
    if unknown:
        raise ValueError(f"D-EER given for curves that are not plotted: {', '.join(unknown)}")
    fig = Figure(figsize=(6.0, 6.0), layout="constrained")
    ax = fig.add_subplot()
    _det_axes(ax, _det_low(curves))
    for name, (apcer_rates, bpcer_rates) in curves.items():
        label = name if name not in eer else f"{name} (D-EER {100.0 * eer[name]:.2f} %)"
        (line,) = ax.plot(probit(apcer_rates), probit(bpcer_rates), linewidth=1.8, label=label)
        if name in eer:
            point = probit([eer[name]])
            ax.plot(point, point, marker="o", markersize=7, color=line.get_color(), linestyle="none")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize="small")
    return save_figure(fig, path)


def _series(history: Sequence[Mapping[str, Any]], key: str, scale: float = 1.0) -> FloatArray:
    """One history column as floats (E,); a missing key or None becomes NaN (a gap in the line)."""
    values = [row.get(key) for row in history]
    return np.array([math.nan if v is None else scale * float(v) for v in values], dtype=np.float64)


def _panel(ax: Axes, epochs: FloatArray, lines: Mapping[str, FloatArray], title: str, ylabel: str) -> None:
    for label, values in lines.items():
        ax.plot(epochs, values, marker="o", markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Three panels per epoch (loss, accuracy, validation error rates) written to `path`.

    history: one dict per epoch with keys epoch, train_loss, train_acc, val_loss, val_acc, apcer, bpcer, d_eer
    (accuracies and rates as fractions in [0, 1]; plotted in %). Missing values leave gaps.
    """
    if not history:
        raise SmadlrpError("no epochs to plot: the training history is empty")
    epochs = _series(history, "epoch")
    fig = Figure(figsize=(13.0, 3.8), layout="constrained")
    loss_ax, acc_ax, err_ax = fig.subplots(1, 3)
    _panel(
        loss_ax,
        epochs,
        {"train": _series(history, "train_loss"), "validation": _series(history, "val_loss")},
        "Loss",
        "loss",
    )
    _panel(
        acc_ax,
        epochs,
        {"train": _series(history, "train_acc", 100.0), "validation": _series(history, "val_acc", 100.0)},
        "Accuracy",
        "%",
    )
    _panel(
        err_ax,
        epochs,
        {
            "D-EER": _series(history, "d_eer", 100.0),
            "APCER": _series(history, "apcer", 100.0),
            "BPCER": _series(history, "bpcer", 100.0),
        },
        "Validation error rates",
        "%",
    )
    return save_figure(fig, path)


# ---- relevance heatmaps ------------------------------------------------------------------------------------------
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


def plot_layer_maps(maps: Sequence[tuple[str, npt.ArrayLike]], path: str | os.PathLike[str]) -> Path:
    """Channel-summed relevance maps ((H, W) each, any sizes), one panel per named layer, in reading order."""
    if not maps:
        raise SmadlrpError("no spatial relevance maps to plot")
    columns = min(len(maps), 6)
    rows = math.ceil(len(maps) / columns)
    fig = Figure(figsize=(2.0 * columns, 2.2 * rows), layout="constrained")
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
                             ) -> Path:
    """Perturbation curves, one line per method: name -> (S + 1,) mean score drop f(x_0) - f(x_k) after k patches.

    `aopc` (one value per curve) is quoted in the legend, sorted best first; `baselines` are drawn dashed.
    """
    if not curves:
        raise SmadlrpError("no perturbation curve to plot")
    if aopc is not None and set(aopc) != set(curves):
        raise ValueError("aopc must give one value per curve")
    names = sorted(curves, key=lambda n: -aopc[n]) if aopc else list(curves)
    colours = colormaps["tab20"](np.linspace(0.0, 1.0, 20))
    fig = Figure(figsize=(9.0, 5.5), layout="constrained")
    ax = fig.add_subplot()
    for i, name in enumerate(names):
        values = np.asarray(curves[name], dtype=np.float64)
        label = name if not aopc else f"{name} (AOPC {aopc[name]:.3g})"
        ax.plot(np.arange(values.size), values, label=label, color=colours[i % 20], linewidth=1.6,
                linestyle="--" if name in baselines else "-")
    ax.set_xlabel("patches replaced (most relevant first)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return save_figure(fig, path)
