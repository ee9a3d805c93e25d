"""Pixel-grid filters and masks: separable Gaussian blur and filled polygons."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from smadlrp.data.synthetic.arrays import Plane, Points


def gaussian_blur(image: NDArray[np.float32], sigma: float) -> NDArray[np.float32]:
    """Separable Gaussian blur over the first two axes (reflected edges); `sigma` in pixels."""
    if sigma <= 0:
        return image.copy()
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    h, w = image.shape[:2]
    padded = np.concatenate([image[radius:0:-1], image, image[-2:-radius - 2:-1]], axis=0)
    rows = taps[0] * padded[0:h]
    for i in range(1, len(taps)):
        rows += taps[i] * padded[i:i + h]
    padded = np.concatenate([rows[:, radius:0:-1], rows, rows[:, -2:-radius - 2:-1]], axis=1)
    out = taps[0] * padded[:, 0:w]
    for i in range(1, len(taps)):
        out += taps[i] * padded[:, i:i + w]
    return out.astype(np.float32)


def polygon_mask(points: Points, size: int) -> Plane:
    """1 inside the closed polygon `points` (N, 2) pixels, 0 outside (even-odd rule), shape (size, size)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    inside = np.zeros((size, size), dtype=bool)
    for (x1, y1), (x2, y2) in zip(points, np.roll(points, -1, axis=0), strict=True):
        if y1 == y2:
            continue
        crosses = (y1 > ys) != (y2 > ys)
        x_at = x1 + (ys - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (xs < x_at)
    return inside.astype(np.float32)
