"""Evaluation figures: DET curves (probit axes) and training curves, written with `save_figure`."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from smadlrp.core.errors import SmadlrpError
from smadlrp.core.figures import save_figure

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


def plot_conditions(values: Mapping[str, Mapping[str, float | None]], path: str | os.PathLike[str], *,
                    title: str = "Detection error per image condition") -> Path:
    """Grouped bars: per condition (x axis, in order), one bar per metric; values: condition -> metric -> rate
    (fraction; None when not estimable, drawn as an empty bar labelled n/a). Rates are shown in %."""
    if not values:
        raise SmadlrpError("no condition to plot")
    conditions = list(values)
    metrics = list(next(iter(values.values())))
    fig = Figure(figsize=(max(5.0, 1.1 * len(conditions) + 2.0), 4.0), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(metrics)
    x = np.arange(len(conditions), dtype=np.float64)
    top = 0.0
    for i, metric in enumerate(metrics):
        heights = [values[c][metric] for c in conditions]
        positions = x + (i - (len(metrics) - 1) / 2) * width
        shown = [0.0 if h is None else 100.0 * h for h in heights]
        bars = ax.bar(positions, shown, width, label=metric)
        ax.bar_label(bars, labels=["n/a" if h is None else f"{100.0 * h:.1f}" for h in heights], fontsize="x-small")
        top = max(top, *shown)
    ax.set_ylim(0, max(1.0, top) * 1.3)
    ax.set_xticks(x, conditions, rotation=20 if len(conditions) > 4 else 0)
    ax.set_ylabel("error rate (%)")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, path)


def plot_mmpmr(curves: Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike]], thresholds: Mapping[str, float],
               path: str | os.PathLike[str], *, xlabel: str, rising: bool = True,
               title: str = "MMPMR against the threshold") -> Path:
    """MMPMR (in %) against the recogniser's threshold, one step line per curve (name -> (thresholds (K,), MMPMR
    (K,)) as from `vulnerability.mmpmr_curve`; `rising` for distances, whose MMPMR grows with the threshold), and a
    dashed vertical line per named threshold (label -> value)."""
    if not curves:
        raise SmadlrpError("no MMPMR curve to plot")
    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    ax = fig.add_subplot()
    points = np.concatenate([np.asarray(x, dtype=np.float64) for x, _ in curves.values()] +
                            [np.asarray(list(thresholds.values()), dtype=np.float64)])
    low, high = float(points.min()), float(points.max())
    pad = 0.05 * (high - low) or 0.05
    for name, (x, y) in curves.items():
        xs = np.concatenate([[low - pad], np.asarray(x, dtype=np.float64), [high + pad]])
        ys = 100.0 * np.asarray(y, dtype=np.float64)
        ys = np.concatenate([[0.0 if rising else ys[0]], ys, [ys[-1] if rising else 0.0]])
        ax.step(xs, ys, where="post" if rising else "pre", linewidth=1.8, label=name)
    for label, value in thresholds.items():
        ax.axvline(value, color="grey", linestyle="--", linewidth=1)
        ax.annotate(label, (value, 102), rotation=90, fontsize="x-small", ha="right", va="top")
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(0, 105)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("MMPMR (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, path)
