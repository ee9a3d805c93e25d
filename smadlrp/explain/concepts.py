"""Concept relevance over a split (CRP; Achtibat et al., Nature Machine Intelligence 2023): how much each channel of
a layer contributes to the attack decision, where its conditional relevance lies (face regions, artifact masks),
and the training images that show it most (relevance maximisation). No printing, no plotting.

Every number here comes from `smadlrp.lrp.conditional.ConceptExplainer`: a scan is one relevance pass above the
layer per image (all channels at once); conditional maps of K concepts are one batched pass below the layer per
image batch (K rows per image).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from smadlrp.data.regions import REGIONS
from smadlrp.detector.checkpoint import CheckpointMeta
from smadlrp.explain.run import image_batches, to_uint8
from smadlrp.lrp.conditional import ConceptExplainer

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
Advance = Callable[[int], None]

CROP_THRESHOLD = 0.1  # a reference is cropped to where its conditional relevance reaches this share of its maximum
CROP_MARGIN = 0.05  # ... grown by this share of the image side on every side
CROP_MIN = 0.25  # ... and at least this share of the side wide and high


@dataclass(frozen=True)
class ConceptScan:
    """Relevance of every channel at the layer for the attack decision, per image: `channels` (N, C) float64, and
    the model's P(attack) per image (N,)."""

    channels: FloatArray
    p_attack: FloatArray


def scan_layer(concepts: ConceptExplainer, paths: Sequence[Path], meta: CheckpointMeta, *, batch_size: int,
               workers: int, device: torch.device, on_batch: Advance = lambda n: None) -> ConceptScan:
    """The concept relevances of `paths` for the attack class: a forward pass and the relevance pass above the layer
    per batch."""
    channels = np.empty((len(paths), concepts.layer.channels), dtype=np.float64)
    p_attack = np.empty(len(paths), dtype=np.float64)
    for x, positions in image_batches(list(paths), meta, batch_size, workers, device):
        result = concepts.layer_relevance(x, meta.attack_index)
        channels[positions] = result.channels.double().cpu().numpy()
        p_attack[positions] = torch.softmax(result.logits.double(), 1)[:, meta.attack_index].cpu().numpy()
        on_batch(len(positions))
    return ConceptScan(channels, p_attack)


def relative(channels: FloatArray) -> FloatArray:
    """(N, C) concept relevances -> each image's relevances divided by their absolute sum (rows of 0 stay 0), so
    that every image counts once whatever its logit."""
    totals = np.abs(channels).sum(axis=1, keepdims=True)
    return channels / np.where(totals > 0, totals, 1.0)


@dataclass(frozen=True)
class ConceptSummary:
    """Every channel over the images: mean relevance (C,), mean relative relevance (C,) (`relative`), the mean
    relevance per class name (C,) each, and the channels ranked, highest first, by their mean relevance over the
    images the detector calls attacks (P(attack) >= 0.5; else over the attack class's images, else over all): the
    concepts that carry its attack decisions. `ranked_by` says which images ranked them."""

    mean: FloatArray
    mean_relative: FloatArray
    by_class: dict[str, FloatArray]
    ranking: list[int]
    ranked_by: str


def summarise(scan: ConceptScan, labels: npt.NDArray[np.int64], class_names: Sequence[str],
              attack_index: int) -> ConceptSummary:
    """Mean relevance of each channel over all images and per class; channels ranked by their mean over the images
    called attacks."""
    mean = scan.channels.mean(axis=0)
    by_class = {name: scan.channels[labels == i].mean(axis=0) for i, name in enumerate(class_names)
                if (labels == i).any()}
    attack, called = class_names[attack_index], scan.p_attack >= 0.5
    if called.any():
        key, ranked_by = scan.channels[called].mean(axis=0), f"the {int(called.sum())} images called {attack}"
    elif attack in by_class:
        key, ranked_by = by_class[attack], f"the {attack} images (none is called {attack})"
    else:
        key, ranked_by = mean, f"all images (none is or is called {attack})"
    ranking = [int(c) for c in np.argsort(-key, kind="stable")]
    return ConceptSummary(mean, relative(scan.channels).mean(axis=0), by_class, ranking, ranked_by)


@dataclass(frozen=True)
class ConceptShares:
    """Where K concepts' conditional relevance lies over the images, pooled: of all positive conditional relevance
    of a concept over the images (`positive`, (K,)), the share in each face region ((K, R), REGIONS order; None
    without region maps) and inside the artifact masks of the morphs that have one ((K,), pooled over those morphs
    only; None without masks). `region_area` (R,) and `mask_area` are what a uniform map would get."""

    channels: list[int]
    positive: FloatArray
    regions: FloatArray | None
    region_area: FloatArray | None
    mask: FloatArray | None
    mask_area: float | None
    mask_images: int

    def top_region(self, k: int) -> tuple[str, float] | None:
        """The region holding most of concept k's positive relevance, and its share."""
        if self.regions is None or np.isnan(self.regions[k]).all():
            return None
        best = int(np.nanargmax(self.regions[k]))
        return REGIONS[best], float(self.regions[k, best])


def _grid(batch: int, channels: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of every image (image-major) with every channel."""
    k = len(channels)
    return torch.arange(batch).repeat_interleave(k), torch.as_tensor(list(channels), dtype=torch.int64).repeat(batch)


def conditional_shares(concepts: ConceptExplainer, paths: Sequence[Path], channels: Sequence[int],
                       meta: CheckpointMeta, *, region_ids: npt.NDArray[np.uint8] | None,
                       masks: Mapping[int, BoolArray], batch_size: int, workers: int, device: torch.device,
                       on_batch: Advance = lambda n: None) -> ConceptShares:
    """The conditional relevance maps of `channels` on every image of `paths` (one batched pass below the layer per
    image batch: len(channels) rows per image), reduced to pooled region and artifact-mask shares. `region_ids`
    (N, H, W) at the model's input size; `masks` position -> (H, W) artifact mask of the morphs that have one."""
    k, regions = len(channels), len(REGIONS)
    in_region = np.zeros((k, regions), dtype=np.float64)
    total = np.zeros(k, dtype=np.float64)
    in_mask, mask_total = np.zeros(k, dtype=np.float64), np.zeros(k, dtype=np.float64)
    per_pass = max(1, batch_size // k)
    for x, positions in image_batches(list(paths), meta, per_pass, workers, device):
        images, rows = _grid(len(x), channels)
        result = concepts.conditional(x, images, rows, meta.attack_index)
        maps = result.relevance.sum(1).clamp(min=0).double().cpu().view(len(x), k, -1)  # (b, K, H*W)
        total += maps.sum(2).sum(0).numpy()
        if region_ids is not None:
            ids = torch.from_numpy(region_ids[positions].reshape(len(x), 1, -1).astype(np.int64)).expand(-1, k, -1)
            sums = torch.zeros(len(x), k, regions, dtype=torch.float64).scatter_add_(2, ids, maps)
            in_region += sums.sum(0).numpy()
        for row, position in enumerate(positions):
            if position in masks:
                inside = torch.from_numpy(masks[position].reshape(-1))
                in_mask += maps[row][:, inside].sum(1).numpy()
                mask_total += maps[row].sum(1).numpy()
        on_batch(len(positions))
    safe = np.where(total > 0, total, np.nan)
    area = None
    if region_ids is not None:
        counts = np.bincount(region_ids.reshape(-1).astype(np.int64), minlength=regions)[:regions]
        area = counts / counts.sum()
    mask_area = float(np.mean([m.mean() for m in masks.values()])) if masks else None
    return ConceptShares(list(channels), total, in_region / safe[:, None] if region_ids is not None else None, area,
                         in_mask / np.where(mask_total > 0, mask_total, np.nan) if masks else None, mask_area,
                         len(masks))


@dataclass(frozen=True)
class ConceptMaps:
    """Conditional relevance maps of (image, channel) pairs: `maps` (P, H, W) float32 summed over input channels,
    `pixels` (P, H, W, 3) uint8 as the model saw the image, `relevance` (P,) the channel's relevance at the
    layer."""

    maps: npt.NDArray[np.float32]
    pixels: npt.NDArray[np.uint8]
    relevance: FloatArray


def concept_maps(concepts: ConceptExplainer, paths: Sequence[Path], pairs: Sequence[tuple[int, int]],
                 meta: CheckpointMeta, *, batch_size: int, workers: int, device: torch.device) -> ConceptMaps:
    """The conditional maps of `pairs` (position in `paths`, channel): each image loaded once, all of an image
    batch's pairs in one batched pass below the layer."""
    size = meta.input_size
    maps = np.zeros((len(pairs), size, size), dtype=np.float32)
    pixels = np.zeros((len(pairs), size, size, 3), dtype=np.uint8)
    relevance = np.zeros(len(pairs), dtype=np.float64)
    needed = sorted({image for image, _ in pairs})
    wanted: dict[int, list[int]] = {}
    for n, (image, _) in enumerate(pairs):
        wanted.setdefault(image, []).append(n)
    for x, positions in image_batches([paths[i] for i in needed], meta, max(1, batch_size), workers, device):
        rows = [(local, n) for local, p in enumerate(positions) for n in wanted[needed[p]]]
        for start in range(0, len(rows), max(1, batch_size)):
            chunk = rows[start:start + max(1, batch_size)]
            result = concepts.conditional(x, [local for local, _ in chunk], [pairs[n][1] for _, n in chunk],
                                          meta.attack_index)
            picked = [n for _, n in chunk]
            maps[picked] = result.relevance.sum(1).float().cpu().numpy()
            relevance[picked] = result.layer.double().cpu().numpy()
        image_pixels = to_uint8(x, meta.mean, meta.std)
        for local, n in rows:
            pixels[n] = image_pixels[local]
    return ConceptMaps(maps, pixels, relevance)


def top_images(channels: FloatArray, concepts: Sequence[int], count: int,
               among: npt.NDArray[np.int64] | None = None) -> list[list[int]]:
    """Per concept, the (at most) `count` images (positions; only those in `among` when given) where its relevance
    is highest, highest first: relevance maximisation (the `sum` criterion of zennit-crp: the channel's total
    relevance in the image)."""
    pool = np.arange(len(channels)) if among is None else np.asarray(among)
    found = []
    for c in concepts:
        order = pool[np.argsort(-channels[pool, c], kind="stable")]
        found.append([int(i) for i in order[:count]])
    return found


def relevance_box(rmap: npt.NDArray[np.float32]) -> tuple[slice, slice]:
    """The crop of a reference: the box of the pixels whose conditional relevance reaches CROP_THRESHOLD of the
    map's maximum, grown by CROP_MARGIN of the side, then each side to at least CROP_MIN of the image's and half
    of the box's other side (the whole image when nothing is positive)."""
    height, width = rmap.shape
    peak = float(rmap.max(initial=0.0))
    if peak <= 0:
        return slice(0, height), slice(0, width)
    rows, cols = np.nonzero(rmap >= CROP_THRESHOLD * peak)
    top, bottom = _grown(int(rows.min()), int(rows.max()) + 1, height, round(CROP_MARGIN * height))
    left, right = _grown(int(cols.min()), int(cols.max()) + 1, width, round(CROP_MARGIN * width))
    tall, wide = bottom - top, right - left
    return (_widened(top, bottom, height, max(round(CROP_MIN * height), wide // 2)),
            _widened(left, right, width, max(round(CROP_MIN * width), tall // 2)))


def _grown(low: int, high: int, side: int, margin: int) -> tuple[int, int]:
    return max(0, low - margin), min(side, high + margin)


def _widened(low: int, high: int, side: int, minimum: int) -> slice:
    """[low, high) widened about its centre to at least `minimum` (at most `side`), kept inside [0, side)."""
    missing = max(0, min(minimum, side) - (high - low))
    low = max(0, low - (missing + 1) // 2)
    high = min(side, max(high + missing // 2, low + minimum))
    return slice(max(0, min(low, high - minimum)), high)
