"""The planted shortcut: a faint checkerboard mark near one corner of the picture, and its region."""

from __future__ import annotations

import numpy as np

from smadlrp.data.synthetic.arrays import Image

MARK_AMPLITUDE = 0.06  # the corner mark's checkerboard adds +-6 % of the pixel range


def mark_box(size: int, corner: str) -> tuple[slice, slice]:
    """Rows and columns of the corner mark in a (size, size) picture: a square of side size/8 (at least 4 px),
    size/16 (at least 2 px) from the two image borders of `corner`."""
    side, gap = max(4, size // 8), max(2, size // 16)
    top = gap if corner.startswith("top") else size - gap - side
    left = gap if corner.endswith("left") else size - gap - side
    return slice(top, top + side), slice(left, left + side)


def shortcut_region_box(size: int, corner: str) -> tuple[slice, slice]:
    """The `shortcut` region: the mark's square grown by size/64 (at least 1 px) on every side, so that it
    holds the mark after blur and compression."""
    rows, cols = mark_box(size, corner)
    grow = max(1, size // 64)
    return slice(rows.start - grow, rows.stop + grow), slice(cols.start - grow, cols.stop + grow)


def plant_mark(image: Image, corner: str) -> Image:
    """Add the corner mark: a checkerboard of cells size/32 (at least 2 px) wide, +-MARK_AMPLITUDE."""
    size = image.shape[0]
    rows, cols = mark_box(size, corner)
    cell = max(2, size // 32)
    ys, xs = np.mgrid[0:rows.stop - rows.start, 0:cols.stop - cols.start]
    pattern = np.where((ys // cell + xs // cell) % 2 == 0, MARK_AMPLITUDE, -MARK_AMPLITUDE).astype(np.float32)
    out = image.copy()
    out[rows, cols] = np.clip(out[rows, cols] + pattern[..., None], 0.0, 1.0)
    return out
