"""How alike two explanation maps are, and how complex one is: the measures of the randomisation and class
checks. Pure functions over (N, H, W) arrays, one value per map (NaN where a measure is not defined).

- `spearman`: Spearman rank correlation of the flattened maps (average ranks for ties).
- `ssim`: the structural similarity index of Wang et al. (2004): Gaussian window of standard deviation 1.5 pixels
  (11 x 11, smaller for smaller maps), K1 = 0.01, K2 = 0.03, on maps scaled to [0, 1] by the caller, valid
  positions averaged.
- `histogram_entropy`: Shannon entropy (nats) of the histogram of a map's values in `bins` equal-width bins
  between its minimum and maximum (Quantus' `discrete_entropy`, the complexity of Hedström et al.'s eMPRT).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

FloatArray = npt.NDArray[np.float64]
SSIM_SIGMA = 1.5
SSIM_WINDOW = 11
SSIM_K1, SSIM_K2 = 0.01, 0.03
ENTROPY_BINS = 100


def _rows(maps: npt.ArrayLike) -> FloatArray:
    values = np.asarray(maps, dtype=np.float64)
    return values.reshape(len(values), -1)


def spearman(a: npt.ArrayLike, b: npt.ArrayLike) -> FloatArray:
    """(N,) Spearman rank correlation between each map of `a` and the one of `b` ((N, ...) each): the Pearson
    correlation of their ranks, ties given their average rank. NaN where either map is constant."""
    x, y = _rows(a), _rows(b)
    if x.shape != y.shape:
        raise ValueError(f"maps must have the same shape, got {x.shape} and {y.shape}")
    rx = rankdata(x, axis=1) - (x.shape[1] + 1) / 2
    ry = rankdata(y, axis=1) - (y.shape[1] + 1) / 2
    norm = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, (rx * ry).sum(axis=1) / norm, np.nan)


def unit_scaled(maps: npt.ArrayLike) -> FloatArray:
    """(N, H, W) |maps| divided by each map's maximum (an all-zero map stays zero): values in [0, 1]."""
    magnitude = np.abs(np.asarray(maps, dtype=np.float64))
    top = magnitude.reshape(len(magnitude), -1).max(axis=1).reshape(-1, 1, 1)
    return np.divide(magnitude, top, out=np.zeros_like(magnitude), where=top > 0)


def ssim(a: npt.ArrayLike, b: npt.ArrayLike, data_range: float = 1.0) -> FloatArray:
    """(N,) mean SSIM between the maps of `a` and `b` ((N, H, W) each, values within `data_range`)."""
    x = torch.from_numpy(np.asarray(a, dtype=np.float64)).unsqueeze(1)
    y = torch.from_numpy(np.asarray(b, dtype=np.float64)).unsqueeze(1)
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"maps must both be (N, H, W), got {tuple(x.shape)} and {tuple(y.shape)}")
    side = min(SSIM_WINDOW, x.shape[2], x.shape[3])
    side -= 1 - side % 2  # odd
    offsets = torch.arange(side, dtype=torch.float64) - side // 2
    g = torch.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    window = torch.outer(g, g) / g.sum() ** 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window.view(1, 1, side, side))

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    index = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return index.flatten(1).mean(dim=1).numpy()  # type: ignore[no-any-return]


def histogram_entropy(maps: npt.ArrayLike, bins: int = ENTROPY_BINS) -> FloatArray:
    """(N,) entropy (nats) of each map's value histogram: `bins` equal-width bins from its minimum to its maximum
    (the last bin closed), p_b = count_b / pixels, H = -sum p_b log p_b. A constant map has entropy 0."""
    values = _rows(maps)
    low = values.min(axis=1, keepdims=True)
    width = values.max(axis=1, keepdims=True) - low
    scaled = np.divide(values - low, width, out=np.zeros_like(values), where=width > 0)
    index = np.minimum((scaled * bins).astype(np.int64), bins - 1)
    counts = np.stack([np.bincount(row, minlength=bins) for row in index]).astype(np.float64)
    p = counts / values.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return -(np.where(p > 0, p * np.log(p), 0.0)).sum(axis=1)
