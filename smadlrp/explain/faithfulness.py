"""How faithful an explanation is: ground-truth localisation against artifact masks, and region perturbation.

Localisation metrics take channel-summed maps (N, H, W) and boolean masks (N, H, W) at the same resolution and
return one value per image (NaN where it is not defined). Ties are shared fairly: when several pixels share the
deciding value, each counts with the probability that a random tie-break would pick it, so a constant map scores
the mask's area fraction on every metric and no metric depends on pixel order.

Region perturbation (Samek et al. 2017): the image is cut into non-overlapping square patches, the patches are
ranked by their summed relevance and removed one after the other, most relevant first (MoRF) or least relevant
first (LeRF), each removed patch imputed (explain/imputation.py: ROAD, the image mean or a blurred copy); the
target logit is recorded after each step. AOPC = 1/(S+1) sum_k (f(x_0) - f(x_k)) of the MoRF curve;
ABPC = 1/(S+1) sum_k (f_LeRF(x_k) - f_MoRF(x_k)), the area between the two curves.
No printing here; callers aggregate and render.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from smadlrp.explain.imputation import impute

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
Scorer = Callable[[Tensor], Tensor]  # (N, C, H, W) model input -> (N, K) logits
MASK_COVER = 0.5  # a model-input pixel is inside the mask when at least this share of its area is


def resize_mask(mask: npt.ArrayLike, height: int, width: int) -> BoolArray:
    """(H0, W0) mask (non-zero = inside) -> (height, width) bool: the share of each output pixel's area that the
    mask covers (box filter, i.e. area average) is at least MASK_COVER."""
    cover = np.asarray(mask) != 0
    if cover.shape == (height, width):
        return cover
    plane = Image.fromarray(cover.astype(np.float32), mode="F")
    share = np.asarray(plane.resize((width, height), Image.Resampling.BOX), dtype=np.float64)
    return share >= MASK_COVER - 1e-6  # the box filter works in float32


def _check_pair(maps: npt.ArrayLike, masks: npt.ArrayLike) -> tuple[FloatArray, BoolArray]:
    """(N, H, W) float64 maps and (N, H, W) bool masks, or ValueError when the shapes differ."""
    r = np.asarray(maps, dtype=np.float64)
    m = np.asarray(masks) != 0
    if r.ndim != 3 or r.shape != m.shape:
        raise ValueError(f"maps and masks must both be (N, H, W), got {r.shape} and {m.shape}")
    return r.reshape(len(r), -1), m.reshape(len(m), -1)


def mass_accuracy(maps: npt.ArrayLike, masks: npt.ArrayLike) -> FloatArray:
    """Relevance mass accuracy (N,): positive relevance inside the mask / all positive relevance.
    NaN for a map without positive relevance."""
    r, m = _check_pair(maps, masks)
    positive = np.clip(r, 0.0, None)
    total = positive.sum(axis=1)
    inside = (positive * m).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / total, np.nan)


def rank_accuracy(maps: npt.ArrayLike, masks: npt.ArrayLike) -> FloatArray:
    """Relevance rank accuracy (N,): share of the k most relevant pixels that lie inside the mask, k = mask size.
    Pixels tied with the k-th value count fractionally (expected overlap of a random tie-break).
    NaN for an empty mask."""
    r, m = _check_pair(maps, masks)
    k = m.sum(axis=1)
    kth = -np.sort(-r, axis=1)[np.arange(len(r)), np.maximum(k - 1, 0)][:, None]
    above, tied = r > kth, r == kth
    picked_tied = k - above.sum(axis=1)
    tied_inside = (tied & m).sum(axis=1) / tied.sum(axis=1)
    hits = (above & m).sum(axis=1) + picked_tied * tied_inside
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(k > 0, hits / k, np.nan)


def pointing_game(maps: npt.ArrayLike, masks: npt.ArrayLike) -> FloatArray:
    """Pointing game (N,): 1 when the maximum of the map lies inside the mask, 0 when outside; the share inside
    when several pixels share the maximum. NaN for an empty mask."""
    r, m = _check_pair(maps, masks)
    at_max = r == r.max(axis=1, keepdims=True)
    hits = (at_max & m).sum(axis=1) / at_max.sum(axis=1)
    return np.where(m.any(axis=1), hits, np.nan)


def patch_grid(height: int, width: int, patch: int) -> tuple[int, int]:
    """Rows and columns of the patch grid (patches at the right and bottom edges may be cut short)."""
    return -(-height // patch), -(-width // patch)


def patch_order(maps: Tensor, patch: int) -> Tensor:
    """(B, H, W) maps -> (B, P) patch indices (row-major on the grid), most relevant first; a patch's relevance
    is the sum of the map over its pixels. Equal sums keep grid order."""
    batch, height, width = maps.shape
    rows, cols = patch_grid(height, width, patch)
    padded = F.pad(maps, (0, cols * patch - width, 0, rows * patch - height))
    sums = padded.reshape(batch, rows, patch, cols, patch).sum(dim=(2, 4)).flatten(1)
    return torch.argsort(sums, dim=1, descending=True, stable=True)


def removal_steps(order: Tensor, height: int, width: int, patch: int) -> Tensor:
    """(B, P) patch order -> (B, 1, H, W) int64: the step (1 = first) at which each pixel is replaced."""
    batch, count = order.shape
    rows, cols = patch_grid(height, width, patch)
    step = torch.empty_like(order)
    step.scatter_(1, order, torch.arange(1, count + 1, device=order.device).expand(batch, count))
    grid = step.view(batch, 1, rows, cols)
    return grid.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)[:, :, :height, :width]


def perturbation_curve(score: Scorer, x: Tensor, target: Tensor, maps: Tensor, patch: int, steps: int,
                       chunk: int, imputation: str = "mean", noise: Tensor | None = None) -> Tensor:
    """Target logits (B, steps + 1) after removing the 0..steps most relevant patches of each image of `x`
    ((B, C, H, W) model input), each removed pixel imputed by `imputation` (`noise` (B, C, H, W): ROAD's noise).
    `maps` (B, H, W) rank the patches (pass -maps for least relevant first); `target` (B,) holds class indices;
    about `chunk` perturbed images go through `score` at a time."""
    batch, _, height, width = x.shape
    rows, cols = patch_grid(height, width, patch)
    if not 0 <= steps <= rows * cols:
        raise ValueError(f"steps must lie in 0..{rows * cols} for a {rows}x{cols} patch grid, got {steps}")
    removed_at = removal_steps(patch_order(maps, patch), height, width, patch)
    per_chunk = max(1, chunk // batch)
    pick = target.view(1, batch, 1)
    curves = []
    for first in range(0, steps + 1, per_chunk):
        k = torch.arange(first, min(first + per_chunk, steps + 1), device=x.device).view(-1, 1, 1, 1, 1)
        perturbed = impute(imputation, x, removed_at.unsqueeze(0) <= k, noise)
        logits = score(perturbed.flatten(0, 1)).view(len(k), batch, -1)
        curves.append(logits.gather(2, pick.expand(len(k), batch, 1)).squeeze(2))
    return torch.cat(curves).T


def aopc(curves: npt.ArrayLike) -> FloatArray:
    """Area over the perturbation curve per image (B,) from scores (B, S + 1): mean over k of f(x_0) - f(x_k)."""
    f = np.asarray(curves, dtype=np.float64)
    return (f[:, :1] - f).mean(axis=1)


def abpc(morf: npt.ArrayLike, lerf: npt.ArrayLike) -> FloatArray:
    """Area between the perturbation curves per image (B,) from MoRF and LeRF scores (B, S + 1): mean over k of
    f_LeRF(x_k) - f_MoRF(x_k), which equals AOPC(MoRF) - AOPC(LeRF). Positive: removing what the map calls relevant
    hurts the score more than removing what it calls irrelevant."""
    return (np.asarray(lerf, dtype=np.float64) - np.asarray(morf, dtype=np.float64)).mean(axis=1)
