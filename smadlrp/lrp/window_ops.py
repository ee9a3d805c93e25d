"""Window partitioning of Swin's shifted-window attention as traceable, structural functions.

torchvision computes a Swin block's attention in one function whose control flow depends on the feature size,
which torch.fx cannot follow. `attention.ExplicitWindowAttention` computes the same function with these three
helpers, which torch.fx keeps as single calls (`torch.fx.wrap`, in the module that calls them): two only move
values (padding, cyclic shift, windows; relevance goes back through their gradient) and one builds the additive
mask of shifted windows from shapes alone (a constant of the forward pass).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _geometry(height: int, width: int, window: list[int], shift: list[int]) -> tuple[int, int, list[int]]:
    """(padded height, padded width, effective shift): no shift along a side that one window covers."""
    padded_h = height + (window[0] - height % window[0]) % window[0]
    padded_w = width + (window[1] - width % window[1]) % window[1]
    effective = [0 if window[0] >= padded_h else shift[0], 0 if window[1] >= padded_w else shift[1]]
    return padded_h, padded_w, effective


def window_partition(x: Tensor, window: list[int], shift: list[int]) -> Tensor:
    """(B, H, W, C) -> (B * windows, window[0] * window[1], C): zero-padded to whole windows, cyclically shifted
    by -shift, cut into windows in row-major order (batch-major)."""
    batch, height, width, channels = x.shape
    padded_h, padded_w, effective = _geometry(height, width, window, shift)
    if (padded_h, padded_w) != (height, width):  # (a pad by 0 would copy, and hide a signal: `lrp.signals`)
        x = F.pad(x, (0, 0, 0, padded_w - width, 0, padded_h - height))
    if sum(effective) > 0:
        x = torch.roll(x, shifts=(-effective[0], -effective[1]), dims=(1, 2))
    x = x.view(batch, padded_h // window[0], window[0], padded_w // window[1], window[1], channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], channels)


def window_reverse(windows: Tensor, shape: torch.Size, window: list[int], shift: list[int]) -> Tensor:
    """The inverse of `window_partition` for an input of `shape` (B, H, W, C): (B * windows, N, C) -> (B, H, W, C)."""
    batch, height, width, channels = shape
    padded_h, padded_w, effective = _geometry(height, width, window, shift)
    x = windows.reshape(batch, padded_h // window[0], padded_w // window[1], window[0], window[1], channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded_h, padded_w, channels)
    if sum(effective) > 0:
        x = torch.roll(x, shifts=(effective[0], effective[1]), dims=(1, 2))
    return x if (padded_h, padded_w) == (height, width) else x[:, :height, :width, :].contiguous()


def window_mask(shape: torch.Size, window: list[int], shift: list[int], like: Tensor) -> Tensor:
    """The additive attention mask of shifted windows, (windows, 1, N, N) in `like`'s dtype and device, the same
    for every image: -100 between positions that the cyclic shift brought together from different regions, else 0
    ((1, 1, N, N) zeros unshifted)."""
    _, height, width, _ = shape
    padded_h, padded_w, effective = _geometry(height, width, window, shift)
    windows = (padded_h // window[0]) * (padded_w // window[1])
    size = window[0] * window[1]
    if sum(effective) == 0:
        return like.new_zeros((1, 1, size, size))
    regions = like.new_zeros((padded_h, padded_w))
    h_slices = ((0, -window[0]), (-window[0], -effective[0]), (-effective[0], None))
    w_slices = ((0, -window[1]), (-window[1], -effective[1]), (-effective[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            regions[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    regions = regions.view(padded_h // window[0], window[0], padded_w // window[1], window[1])
    regions = regions.permute(0, 2, 1, 3).reshape(windows, size)
    mask = regions.unsqueeze(1) - regions.unsqueeze(2)
    mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
    return mask.unsqueeze(1)


STRUCTURAL_FUNCTIONS = (window_partition, window_reverse)
