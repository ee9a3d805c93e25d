"""Whole-image statistics of a finished image, the cues a shortcut detector could use."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

GLOBAL_STATISTICS: tuple[str, ...] = ("mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b",
                                      "laplacian_abs", "laplacian_energy", "noise_sigma")


def global_statistics(pixels: NDArray[np.uint8]) -> NDArray[np.float64]:
    """Whole-image statistics a shortcut detector could use, shape (9,), see GLOBAL_STATISTICS.

    Per-channel mean and standard deviation (0..1 scale), mean |Laplacian| and mean squared Laplacian of the
    luminance, and the luminance noise level estimated from the median absolute Laplacian (robust sigma,
    0..1 scale).
    The set is built so that a linear model on these stays near chance."""
    x = pixels.astype(np.float64) / 255.0
    g = x.mean(axis=2)
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    noise = 1.4826 * float(np.median(np.abs(lap - np.median(lap)))) / math.sqrt(20.0)
    return np.concatenate([x.mean(axis=(0, 1)), x.std(axis=(0, 1)),
                           [float(np.abs(lap).mean()), float((lap**2).mean()), noise]])
