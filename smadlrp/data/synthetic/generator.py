"""The embedded synthetic S-MAD data set: drawn faces, landmark-based morphs, artifact masks and a manifest.

It exercises the pipeline and the explanations; it says nothing about real-world MAD accuracy.
Layout written by `generate_dataset` (paths relative to the output folder):

    {train,val,test}/{bonafide,morph}/*.png        images (ImageFolder layout)
    masks/{train,val,test}/{bonafide,morph}/*.png  binary L-mode artifact masks, same file names
    regions/{train,val,test}/{bonafide,morph}/*.png  L-mode face-region maps (ids of data.regions.REGIONS)
    manifest.csv                                   one row per image (see MANIFEST_COLUMNS)
    synthetic.json                                 the generator version, configuration and counts
"""

from __future__ import annotations

import functools
import glob
import io
import json
import math
import os
import shutil
import struct
import sys
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image as PILImage

from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.core.fileio import write_text_atomic
from smadlrp.core.processes import leave_if_reimported, map_in_processes
from smadlrp.data.protocol import csv_dict_writer
from smadlrp.data.regions import REGION_ID, REGIONS_FOLDER
from smadlrp.data.synthetic import faces

MORPH_TYPES: tuple[str, ...] = ("complete", "splicing", "partial")
PARTIAL_REGIONS: tuple[str, ...] = ("eyes", "nose", "mouth", "hair")
SPLITS: tuple[str, ...] = ("train", "val", "test")
CLASSES: tuple[str, ...] = ("bonafide", "morph")
MANIFEST_COLUMNS: tuple[str, ...] = ("path", "label", "split", "morph_type", "morph_region", "identity_a",
                                     "identity_b", "blend_factor", "shortcut", "mask_path", "region_path")
SHORTCUT_KINDS: tuple[str, ...] = ("corner-mark",)
CORNERS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
FORMAT_NAME = "smadlrp-synthetic"
FORMAT_VERSION = 2
DATA_DIR_ENV = "SMADLRP_DATA_DIR"
MIN_IDENTITIES = 6
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 1024
MASK_THRESHOLD = 0.08  # mean absolute RGB difference (0..1) that counts as "the sources differ noticeably"
_SPLIT_SHARE = (0.8, 0.1, 0.1)
_STREAM_PLAN, _STREAM_IDENTITY, _STREAM_CAPTURE, _STREAM_POST, _STREAM_ALIGN, _STREAM_SHORTCUT = 0, 1, 2, 3, 4, 5
MARK_AMPLITUDE = 0.06  # the corner mark's checkerboard adds +-6 % of the pixel range
_RENDERS = ".renders"  # contributor captures shared by bona fide images and morphs while a set is written


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. The same configuration always gives byte-identical files.

    `type_weights` are the relative frequencies of complete, splicing and partial morphs (MORPH_TYPES order);
    types missing from `morph_types` are skipped. `jpeg_probability` is the share of images (both classes)
    re-encoded as JPEG before being stored as PNG. `shortcut` (a SHORTCUT_KINDS value, or "" for none) plants
    a shortcut in `shortcut_fraction` of the morphs of each split in `shortcut_splits`; a `corner-mark` is a
    faint fixed checkerboard near the `shortcut_corner` of the picture (see `mark_box`).
    """

    identities: int = 260
    image_size: int = 128
    seed: int = 0
    morph_types: tuple[str, ...] = MORPH_TYPES
    captures_per_identity: int = 6
    type_weights: tuple[float, float, float] = (0.45, 0.35, 0.20)
    jpeg_probability: float = 0.35
    shortcut: str = ""
    shortcut_fraction: float = 0.5
    shortcut_splits: tuple[str, ...] = ("train",)
    shortcut_corner: str = "top-left"

    def __post_init__(self) -> None:
        if self.identities < MIN_IDENTITIES:
            raise UsageError(f"identities must be at least {MIN_IDENTITIES} (two per split), "
                             f"got {self.identities}")
        if not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            raise UsageError(f"image size must be {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels, "
                             f"got {self.image_size}")
        if self.seed < 0:
            raise UsageError(f"seed must be zero or positive, got {self.seed}")
        if self.captures_per_identity < 1:
            raise UsageError(f"captures per identity must be at least 1, got {self.captures_per_identity}")
        unknown = [t for t in self.morph_types if t not in MORPH_TYPES]
        if unknown or not self.morph_types or len(set(self.morph_types)) != len(self.morph_types):
            raise UsageError(f"morph types must be distinct values of {', '.join(MORPH_TYPES)}; "
                             f"got {', '.join(self.morph_types) or 'none'}")
        if len(self.type_weights) != len(MORPH_TYPES) or min(self.type_weights) < 0 or \
                sum(self._weights()) <= 0:
            raise UsageError("type weights must be three non-negative numbers, "
                             "positive for a chosen morph type")
        if not 0.0 <= self.jpeg_probability <= 1.0:
            raise UsageError(f"JPEG probability must be between 0 and 1, got {self.jpeg_probability}")
        if self.shortcut not in ("", *SHORTCUT_KINDS):
            raise UsageError(f"unknown shortcut {self.shortcut!r}; choose one of: {', '.join(SHORTCUT_KINDS)}")
        if not 0.0 <= self.shortcut_fraction <= 1.0:
            raise UsageError(f"shortcut fraction must be between 0 and 1, got {self.shortcut_fraction}")
        bad = [s for s in self.shortcut_splits if s not in SPLITS]
        if bad or not self.shortcut_splits or len(set(self.shortcut_splits)) != len(self.shortcut_splits):
            raise UsageError(f"shortcut splits must be distinct values of {', '.join(SPLITS)}; "
                             f"got {', '.join(self.shortcut_splits) or 'none'}")
        if self.shortcut_corner not in CORNERS:
            raise UsageError(f"unknown corner {self.shortcut_corner!r}; choose one of: {', '.join(CORNERS)}")

    def _weights(self) -> list[float]:
        return [w for t, w in zip(MORPH_TYPES, self.type_weights, strict=True) if t in self.morph_types]

    def morph_probabilities(self) -> dict[str, float]:
        """Probability of each chosen morph type."""
        chosen = [t for t in MORPH_TYPES if t in self.morph_types]
        weights = self._weights()
        return {t: w / sum(weights) for t, w in zip(chosen, weights, strict=True)}


@dataclass(frozen=True)
class SamplePlan:
    """One image of the set: where it goes and what it shows.

    A bona fide image shows capture `capture_a` of `identity_a`; a morph is made from that capture and capture
    `capture_b` of `identity_b` (the same captures the set holds as bona fide images)."""

    index: int
    split: str
    label: str
    identity_a: int
    capture_a: int = 0
    identity_b: int | None = None
    capture_b: int = 0
    morph_type: str = ""
    region: str = ""
    blend: float = 0.0
    shortcut: str = ""

    @property
    def filename(self) -> str:
        if self.label == "bonafide":
            return f"id{self.identity_a:04d}_{self.capture_a:02d}.png"
        kind = f"partial-{self.region}" if self.morph_type == "partial" else self.morph_type
        return f"{kind}_{self.index:05d}_id{self.identity_a:04d}_id{self.identity_b:04d}.png"

    @property
    def captures(self) -> tuple[tuple[int, int], ...]:
        """(identity, capture) of each capture the image is made from: one for bona fide, two for a morph."""
        if self.identity_b is None:
            return ((self.identity_a, self.capture_a),)
        return ((self.identity_a, self.capture_a), (self.identity_b, self.capture_b))

    @property
    def path(self) -> str:
        return f"{self.split}/{self.label}/{self.filename}"

    @property
    def mask_path(self) -> str:
        return f"masks/{self.path}"

    @property
    def region_path(self) -> str:
        return f"{REGIONS_FOLDER}/{self.path}"

    def manifest_row(self) -> dict[str, str]:
        morph = self.label == "morph"
        return {
            "path": self.path, "label": self.label, "split": self.split, "morph_type": self.morph_type,
            "morph_region": self.region, "identity_a": str(self.identity_a),
            "identity_b": str(self.identity_b) if morph else "",
            "blend_factor": f"{self.blend:.3f}" if morph else "", "shortcut": self.shortcut,
            "mask_path": self.mask_path, "region_path": self.region_path,
        }


@dataclass(frozen=True)
class MorphParts:
    """A morph before the shared post-processing, with what it was made from (all (H, W[, 3]) float32).

    `image` is warped_a + region * blend * (warped_b - warped_a) with its contrast and fine detail restored
    inside the region; `region` is the soft blend region in [0, 1]; `mask` (bool) marks the artifacts;
    `regions` (uint8) are the face-region ids (see `_blend_labels`).
    """

    image: faces.Image
    warped_a: faces.Image
    warped_b: faces.Image
    region: faces.Plane
    mask: NDArray[np.bool_]
    regions: NDArray[np.uint8]


@dataclass(frozen=True)
class Sample:
    """A finished image (H, W, 3) uint8, its artifact mask (H, W) bool (all False for bona fide) and its
    face-region ids (H, W) uint8."""

    image: NDArray[np.uint8]
    mask: NDArray[np.bool_]
    regions: NDArray[np.uint8]


@dataclass(frozen=True)
class SynthSummary:
    """What `generate_dataset` wrote: images per split and class, morphs per split and type, wall time."""

    out: Path
    counts: Mapping[str, Mapping[str, int]]
    morph_counts: Mapping[str, Mapping[str, int]]
    shortcut_counts: Mapping[str, int]
    seconds: float

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())


# planning -----------------------------------------------------------------------------------------


def _rng(config: SynthConfig, *key: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, *key])


def split_identities(config: SynthConfig) -> dict[str, list[int]]:
    """Subject-disjoint split of identity numbers 0..identities-1 (about 80/10/10, at least two per split)."""
    n = config.identities
    n_val = max(2, round(n * _SPLIT_SHARE[1]))
    n_test = max(2, round(n * _SPLIT_SHARE[2]))
    order = [int(i) for i in _rng(config, _STREAM_PLAN, 0).permutation(n)]
    parts = {"train": order[: n - n_val - n_test], "val": order[n - n_val - n_test: n - n_test],
             "test": order[n - n_test:]}
    return {split: sorted(ids) for split, ids in parts.items()}


def _draw_blend(rng: np.random.Generator) -> float:
    """A blend factor around 0.5 (normal, sd 0.06, clipped to 0.38..0.62, three decimals)."""
    return round(float(np.clip(rng.normal(0.5, 0.06), 0.38, 0.62)), 3)


def plan_samples(config: SynthConfig) -> tuple[SamplePlan, ...]:
    """Every image of the set in writing order: per split, its bona fide captures then as many morphs."""
    rng = _rng(config, _STREAM_PLAN, 1)
    probabilities = config.morph_probabilities()
    types, weights = list(probabilities), list(probabilities.values())
    plans: list[SamplePlan] = []
    for split, ids in split_identities(config).items():
        for person in ids:
            for number in range(config.captures_per_identity):
                plans.append(SamplePlan(len(plans), split, "bonafide", person, number))
        for _ in range(len(ids) * config.captures_per_identity):
            a, b = (int(i) for i in rng.choice(ids, size=2, replace=False))
            capture_a, capture_b = (int(c) for c in rng.integers(config.captures_per_identity, size=2))
            morph_type = types[int(rng.choice(len(types), p=weights))]
            region = {"complete": "subject", "splicing": "inner-face"}.get(morph_type, "")
            if morph_type == "partial":
                region = PARTIAL_REGIONS[int(rng.integers(len(PARTIAL_REGIONS)))]
            blend = _draw_blend(rng)
            plans.append(SamplePlan(len(plans), split, "morph", a, capture_a, b, capture_b,
                                    morph_type=morph_type, region=region, blend=blend))
    return _plant_shortcuts(config, plans)


def _plant_shortcuts(config: SynthConfig, plans: list[SamplePlan]) -> tuple[SamplePlan, ...]:
    """Mark `shortcut_fraction` of the morphs of each shortcut split (drawn from a stream of their own, so
    the rest of the set is the same with or without a shortcut)."""
    if config.shortcut:
        for split in config.shortcut_splits:
            morphs = [p.index for p in plans if p.split == split and p.label == "morph"]
            rng = _rng(config, _STREAM_SHORTCUT, SPLITS.index(split))
            for index in rng.choice(morphs, size=round(config.shortcut_fraction * len(morphs)), replace=False):
                plans[int(index)] = replace(plans[int(index)], shortcut=config.shortcut)
    return tuple(plans)


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


def plant_mark(image: faces.Image, corner: str) -> faces.Image:
    """Add the corner mark: a checkerboard of cells size/32 (at least 2 px) wide, +-MARK_AMPLITUDE."""
    size = image.shape[0]
    rows, cols = mark_box(size, corner)
    cell = max(2, size // 32)
    ys, xs = np.mgrid[0:rows.stop - rows.start, 0:cols.stop - cols.start]
    pattern = np.where((ys // cell + xs // cell) % 2 == 0, MARK_AMPLITUDE, -MARK_AMPLITUDE).astype(np.float32)
    out = image.copy()
    out[rows, cols] = np.clip(out[rows, cols] + pattern[..., None], 0.0, 1.0)
    return out


# morphing -----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def identity(config: SynthConfig, number: int) -> faces.Identity:
    """The identity with this number (the same in every split and image of a configuration)."""
    return faces.sample_identity(_rng(config, _STREAM_IDENTITY, number))


def capture(config: SynthConfig, person: int, number: int) -> faces.Capture:
    """Capture `number` of identity `person` (pose, expression, lighting, background, clothes)."""
    return faces.sample_capture(_rng(config, _STREAM_CAPTURE, person, number))


def contributor(config: SynthConfig, person: int, number: int) -> faces.Image:
    """Capture `number` of identity `person` as an 8-bit photo would hold it: (H, W, 4) float32, RGB and the
    subject matte, each quantised to steps of 1/255."""
    shot = capture(config, person, number)
    image, matte = faces.render_face(identity(config, person), shot, config.image_size)
    return _from_bytes(_to_bytes(np.dstack([image, matte])))


def _to_bytes(values: faces.Image) -> NDArray[np.uint8]:
    return np.clip(np.round(values * 255), 0, 255).astype(np.uint8)


def _from_bytes(pixels: NDArray[np.uint8]) -> faces.Image:
    return pixels.astype(np.float32) / np.float32(255)


def _ellipse_mask(centre: NDArray[np.float64], rx: float, ry: float, size: int) -> faces.Plane:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return (((xs - centre[0]) / rx) ** 2 + ((ys - centre[1]) / ry) ** 2 <= 1.0).astype(np.float32)


def _inner_face(points: faces.Points, size: int) -> faces.Plane:
    """Hard mask (H, W) of the inner face: inside the jaw line and up to just above the brows."""
    unit = float(np.linalg.norm(points[faces.JAW[0]] - points[faces.JAW[-1]])) / 2
    centre = points[list(faces.EYES) + [faces.JAW[6]]].mean(axis=0)
    jaw = centre + 0.93 * (points[list(faces.JAW)] - centre)
    brows = points[list(faces.EYES)] + np.array([0.0, -0.6 * unit])
    return faces.polygon_mask(np.concatenate([jaw, brows]), size)


def _partial_region(points: faces.Points, region: str, size: int) -> faces.Plane:
    """Hard mask (H, W) of one facial region in the geometry `points`."""
    unit = float(np.linalg.norm(points[faces.JAW[0]] - points[faces.JAW[-1]])) / 2
    if region == "hair":
        below_cheeks = np.mgrid[0:size, 0:size][0] > points[faces.JAW[2], 1]
        return ((1 - _inner_face(points, size)) * (1 - below_cheeks)).astype(np.float32)
    if region == "eyes":
        mask = np.zeros((size, size), dtype=np.float32)
        for pair in (faces.EYES[:2], faces.EYES[2:]):
            corners = points[list(pair)]
            centre = corners.mean(axis=0) - np.array([0.0, 0.2 * unit])
            rx = float(np.abs(corners[0, 0] - corners[1, 0])) / 2 + 0.2 * unit
            mask = np.maximum(mask, _ellipse_mask(centre, rx, 0.48 * unit, size))
        return mask
    # nose and mouth sit on the line from the nose root to the chin, about a third and two thirds down
    root, chin = points[faces.NOSE_ROOT], points[faces.JAW[6]]
    share, rx, ry = {"nose": (0.36, 0.4, 0.38), "mouth": (0.68, 0.5, 0.3)}[region]
    return _ellipse_mask(root + share * (chin - root), rx * unit, ry * unit, size)


def _subject_region(matte_a: faces.Plane, matte_b: faces.Plane) -> faces.Plane:
    """Hard mask (H, W) of where either warped contributor shows head, hair, ears or neck, grown by ~3 px."""
    size = matte_a.shape[0]
    either = np.maximum(matte_a, matte_b)
    return (faces.gaussian_blur(either, 1.5 * size / 128) > 0.02).astype(np.float32)


def _high_pass(image: NDArray[np.float32]) -> NDArray[np.float32]:
    """What a Gaussian blur (sigma 1 px) removes: the fine detail, same shape as `image`."""
    return image - faces.gaussian_blur(image, 1.0)


def _local_energy(detail: faces.Plane) -> faces.Plane:
    """Local mean (Gaussian, sigma 3 px) of a squared high-pass residual, (H, W)."""
    return faces.gaussian_blur(detail**2, 3.0)


def _detail_energy(image: faces.Image) -> faces.Plane:
    """Local fine-detail energy of an image's luminance (channel mean), (H, W)."""
    return _local_energy(_high_pass(image.mean(axis=2)))


def _restore_detail(morph: faces.Image, target: faces.Plane) -> faces.Image:
    """Scale the morph's high-pass residual so its local luminance energy matches `target` (gain 1 to 3)."""
    detail = _high_pass(morph)
    gain = np.clip(np.sqrt(target / (_local_energy(detail.mean(axis=2)) + 1e-8)), 1.0, 3.0)
    return np.clip(morph + (gain - 1)[..., None] * detail, 0.0, 1.0).astype(np.float32)


def morph_parts(config: SynthConfig, plan: SamplePlan,
                contributors: tuple[faces.Image, faces.Image] | None = None) -> MorphParts:
    """Make the morph `plan` describes, before post-processing: warp both contributors to the morph landmarks
    (per-triangle affine), blend them inside the morph region, restore the fine detail and contrast that
    blending two independent faces removes, and mark where the two aligned sources differ noticeably.

    `contributors` are the two `contributor` captures when already at hand (they are drawn otherwise)."""
    if plan.label != "morph" or len(plan.captures) != 2:
        raise ValueError("morph_parts needs a morph plan")
    size = config.image_size
    if contributors is None:
        contributors = (contributor(config, *plan.captures[0]), contributor(config, *plan.captures[1]))
    pa, pb = (faces.landmarks(identity(config, p), capture(config, p, c), size) for p, c in plan.captures)
    pm = (1 - plan.blend) * pa + plan.blend * pb
    ids = faces.triangle_ids(pm, size)
    warped = [faces.warp_piecewise_affine(c, p, pm, ids) for c, p in zip(contributors, (pa, pb), strict=True)]
    wa, wb = warped[0][..., :3], warped[1][..., :3]
    subject = _subject_region(warped[0][..., 3], warped[1][..., 3])
    if plan.morph_type == "complete":
        hard = subject
        region = faces.gaussian_blur(hard, 2.0 * size / 128)
    elif plan.morph_type == "splicing":
        hard = _inner_face(pm, size)
        region = faces.gaussian_blur(hard, 0.6 * size / 128)
    else:
        hard = _partial_region(pm, plan.region, size) * subject
        region = faces.gaussian_blur(hard, 1.0 * size / 128)
    weight = (region * plan.blend)[..., None]
    blended = wa + weight * (wb - wa)
    target = (1 - weight[..., 0]) * _detail_energy(wa) + weight[..., 0] * _detail_energy(wb)
    contrast = _match_contrast(blended, wa, wb, float(weight.mean()))
    image = _restore_detail(blended + region[..., None] * (contrast - blended), target)
    differ = faces.gaussian_blur(np.abs(wa - wb).mean(axis=2), 0.7) > MASK_THRESHOLD
    mask = differ & (region > 0.5)
    if plan.morph_type == "splicing":
        soft = faces.gaussian_blur(hard, 1.5 * size / 128)
        mask |= (soft > 0.03) & (soft < 0.97)
    labels = [faces.warp_labels(faces.region_labels(identity(config, p), capture(config, p, c), size), pts, pm,
                                ids) for (p, c), pts in zip(plan.captures, (pa, pb), strict=True)]
    regions = _blend_labels(labels[0], labels[1], region > 0.5)
    return MorphParts(image=image, warped_a=wa, warped_b=wb, region=region, mask=mask, regions=regions)


# how strongly a region claims a pixel that the two contributors of a morph label differently
_RANK = np.zeros(len(REGION_ID), dtype=np.uint8)
for _name, _rank in {"hair": 1, "face-skin": 2, "face-outline": 3, "brows": 4, "left-eye": 5, "right-eye": 5,
                     "nose": 5, "mouth": 5}.items():
    _RANK[REGION_ID[_name]] = _rank


def _blend_labels(labels_a: NDArray[np.uint8], labels_b: NDArray[np.uint8],
                  blended: NDArray[np.bool_]) -> NDArray[np.uint8]:
    """A morph's region ids: contributor a's outside the blended area; inside it, where either aligned
    contributor shows a feature (features over the outline, over skin, over hair, over background), so the
    double edges of a ghosted feature fall into its region."""
    b_wins = blended & (_RANK[labels_b] > _RANK[labels_a])
    return np.where(b_wins, labels_b, labels_a)


def _spread(image: faces.Image) -> NDArray[np.float32]:
    """Per-channel standard deviation of an (H, W, 3) image, shape (3,)."""
    return np.ascontiguousarray(image.reshape(-1, 3).T).std(axis=1)  # contiguous rows reduce much faster


def _match_contrast(image: faces.Image, wa: faces.Image, wb: faces.Image, share_b: float) -> faces.Image:
    """Rescale each channel about its mean so its spread matches the mix of the contributors' spreads.

    Blending two faces whose structures do not line up lowers the image's contrast, a global cue."""
    target = np.sqrt((1 - share_b) * _spread(wa) ** 2 + share_b * _spread(wb) ** 2)
    mean, std = np.ascontiguousarray(image.reshape(-1, 3).T).mean(axis=1), _spread(image)
    return np.clip(mean + (image - mean) * (target / np.maximum(std, 1e-6)), 0.0, 1.0).astype(np.float32)


# post-processing ----------------------------------------------------------------------------------


def _post_process(image: faces.Image, mask: NDArray[np.bool_], regions: NDArray[np.uint8],
                  rng: np.random.Generator, config: SynthConfig, marked: bool) -> Sample:
    """The capture chain shared by both classes: resampling warp, (the corner mark when `marked`), blur,
    sensor noise, 8-bit, optional JPEG. The mask and region map follow the warp; the `shortcut` region is
    the mark's place in every image, marked or not."""
    size = image.shape[0]
    angle, scale = math.radians(rng.uniform(-2.5, 2.5)), rng.uniform(0.97, 1.03)
    shift = rng.uniform(-1.5, 1.5, 2) * size / 128
    out = faces.warp_similarity(image, angle, scale, shift)
    moved = mask.copy()
    if mask.any():
        moved = faces.warp_similarity(mask.astype(np.float32)[..., None], angle, scale, shift)[..., 0] > 0.5
    labels = faces.warp_similarity(regions.astype(np.float32)[..., None], angle, scale, shift,
                                   nearest=True)[..., 0].astype(np.uint8)
    labels[shortcut_region_box(size, config.shortcut_corner)] = REGION_ID["shortcut"]
    if marked:
        out = plant_mark(out, config.shortcut_corner)
    out = faces.gaussian_blur(out, rng.uniform(0.0, 0.8) * size / 128)
    out = out + np.float32(rng.uniform(0.004, 0.025)) * rng.standard_normal(out.shape, dtype=np.float32)
    pixels = np.clip(np.round(out * 255), 0, 255).astype(np.uint8)
    if rng.uniform() < config.jpeg_probability:
        buffer = io.BytesIO()
        PILImage.fromarray(pixels).save(buffer, format="JPEG", quality=int(rng.integers(60, 96)))
        pixels = np.asarray(PILImage.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return Sample(image=pixels, mask=moved, regions=labels)


def bona_fide_image(config: SynthConfig, plan: SamplePlan, render: faces.Image | None = None) -> faces.Image:
    """A bona fide capture before post-processing, (H, W, 3) float32.

    Like a morph's contributors, it is warped piecewise-affinely part of the way towards the landmarks of a
    random capture of a random identity (its own features stay single: no blending), so resampling and
    geometry do not tell the classes apart. `render` is its `contributor` capture when already at hand."""
    if render is None:
        render = contributor(config, *plan.captures[0])
    own, target = _bona_fide_geometry(config, plan)
    return faces.warp_piecewise_affine(render[..., :3], own, target)


def bona_fide_regions(config: SynthConfig, plan: SamplePlan) -> NDArray[np.uint8]:
    """The face-region ids (H, W) of `bona_fide_image`, warped the same way (nearest neighbour)."""
    person, number = plan.captures[0]
    labels = faces.region_labels(identity(config, person), capture(config, person, number), config.image_size)
    return faces.warp_labels(labels, *_bona_fide_geometry(config, plan))


def _bona_fide_geometry(config: SynthConfig, plan: SamplePlan) -> tuple[faces.Points, faces.Points]:
    """The landmarks of a bona fide capture and those it is warped onto."""
    person, number = plan.captures[0]
    own = faces.landmarks(identity(config, person), capture(config, person, number), config.image_size)
    rng = _rng(config, _STREAM_ALIGN, person, number)
    someone = identity(config, int(rng.integers(config.identities)))
    other = faces.landmarks(someone, faces.sample_capture(rng), config.image_size)
    return own, own + _draw_blend(rng) * (other - own)


def render_sample(config: SynthConfig, plan: SamplePlan,
                  renders: tuple[faces.Image, ...] | None = None) -> Sample:
    """The finished image, mask and region map for one plan (deterministic in (config, plan)).

    `renders` are the plan's `contributor` captures when already at hand (one for bona fide, two for a
    morph)."""
    post_rng = _rng(config, _STREAM_POST, plan.index)
    if plan.label == "bonafide":
        image = bona_fide_image(config, plan, renders[0] if renders else None)
        mask = np.zeros(image.shape[:2], dtype=bool)
        regions = bona_fide_regions(config, plan)
    else:
        parts = morph_parts(config, plan, (renders[0], renders[1]) if renders else None)
        image, mask, regions = parts.image, parts.mask, parts.regions
    return _post_process(image, mask, regions, post_rng, config, marked=bool(plan.shortcut))


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


# writing ------------------------------------------------------------------------------------------


def encode_png(pixels: NDArray[np.uint8]) -> bytes:
    """A PNG file of an 8-bit grayscale (H, W) or RGB (H, W, 3) image: every row "Up"-filtered, zlib level 1.

    Deterministic, and several times faster than an adaptive-filter encoder on noisy pictures."""
    height, width = pixels.shape[:2]
    color_type = 2 if pixels.ndim == 3 else 0
    rows = pixels.reshape(height, -1)
    up = np.diff(rows, axis=0, prepend=np.zeros((1, rows.shape[1]), dtype=np.uint8))  # wraps modulo 256
    raw = np.concatenate([np.full((height, 1), 2, dtype=np.uint8), up], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 1))
            + chunk(b"IEND", b""))


def _render_path(root: Path, person: int, number: int) -> Path:
    return root / _RENDERS / f"{person:05d}_{number:03d}.npy"


def _write_sample(job: tuple[SynthConfig, SamplePlan, str]) -> int:
    """Render and write one plan's image and mask under `root`. A bona fide capture is also kept (8-bit RGB
    and matte) for the morphs made from it, which read it back instead of drawing it again."""
    config, plan, folder = job
    root = Path(folder)
    if plan.label == "bonafide":
        render = contributor(config, *plan.captures[0])
        np.save(_render_path(root, *plan.captures[0]), _to_bytes(render))
        sample = render_sample(config, plan, (render,))
    else:
        renders = tuple(_from_bytes(np.load(_render_path(root, *c))) for c in plan.captures)
        sample = render_sample(config, plan, renders)
    (root / plan.path).write_bytes(encode_png(sample.image))
    (root / plan.mask_path).write_bytes(encode_png(sample.mask.astype(np.uint8) * 255))
    (root / plan.region_path).write_bytes(encode_png(sample.regions))
    return plan.index


def is_synthetic_set(folder: Path) -> bool:
    """True when `folder` holds a set written by this generator (its manifest and synthetic.json)."""
    info = folder / "synthetic.json"
    if not (folder / "manifest.csv").is_file() or not info.is_file():
        return False
    try:
        return json.loads(info.read_text(encoding="utf-8")).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SmadlrpError(f"{out} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise SmadlrpError(f"{out} is not empty; choose an empty folder, or replace the synthetic set there with "
                           "--overwrite (overwrite=True in Python)")
    if not is_synthetic_set(out):
        raise SmadlrpError(f"{out} is not a smadlrp synthetic data set (no manifest.csv/synthetic.json); "
                           "refusing to replace it")


def _remove_abandoned(out: Path) -> None:
    """Remove the hidden staging folders (`.OUT.partial-PID`, `.OUT.old-PID`) of runs that were killed: their
    process no longer exists. (An interrupted or failed run removes its own.)"""
    if os.name != "posix" or not out.parent.is_dir():
        return
    for folder in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        kind, _, pid = folder.name.rpartition("-")
        if kind in (f".{out.name}.partial", f".{out.name}.old") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to someone else
        return True
    return True


def _make_staging(out: Path) -> Path:
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
        for split in SPLITS:
            for label in CLASSES:
                (staging / split / label).mkdir(parents=True)
                (staging / "masks" / split / label).mkdir(parents=True)
                (staging / REGIONS_FOLDER / split / label).mkdir(parents=True)
        (staging / _RENDERS).mkdir()
    except OSError as exc:
        raise SmadlrpError(f"cannot write to {out.parent}: {exc.strerror or exc}") from exc
    return staging


def _write_manifest(folder: Path, plans: tuple[SamplePlan, ...], config: SynthConfig,
                    counts: Mapping[str, Mapping[str, int]],
                    morph_counts: Mapping[str, Mapping[str, int]]) -> None:
    text = io.StringIO()
    writer = csv_dict_writer(text, MANIFEST_COLUMNS)
    writer.writeheader()
    writer.writerows(plan.manifest_row() for plan in plans)
    write_text_atomic(folder / "manifest.csv", text.getvalue())
    info = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": _config_dict(config),
            "counts": counts, "morph_counts": morph_counts,
            "shortcut_counts": _shortcut_counts(plans),
            "note": "synthetic faces: exercises the pipeline and the explanations, "
                    "not real-world MAD accuracy"}
    write_text_atomic(folder / "synthetic.json", json.dumps(info, indent=2, sort_keys=True) + "\n")


def _config_dict(config: SynthConfig) -> dict[str, object]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def _shortcut_counts(plans: tuple[SamplePlan, ...]) -> dict[str, int]:
    """Morphs that carry the shortcut, per split."""
    return {s: sum(p.split == s and bool(p.shortcut) for p in plans) for s in SPLITS}


def _count(plans: tuple[SamplePlan, ...]) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    counts = {s: {c: 0 for c in CLASSES} for s in SPLITS}
    morph_counts = {s: {t: 0 for t in MORPH_TYPES} for s in SPLITS}
    for plan in plans:
        counts[plan.split][plan.label] += 1
        if plan.label == "morph":
            morph_counts[plan.split][plan.morph_type] += 1
    return counts, morph_counts


def _can_spawn() -> bool:
    """Whether worker processes can be started: a spawned worker re-imports the main script, which fails
    when it was read from standard input."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    return main is None or Path(main).is_file()


def _render_all(plans: tuple[SamplePlan, ...], config: SynthConfig, staging: Path, workers: int,
                progress: Callable[[int, int], None] | None) -> None:
    """Bona fide images first (they leave the captures the morphs are made from), then the morphs."""
    phases = [[(config, p, str(staging)) for p in plans if p.label == label] for label in CLASSES]
    total, done = len(plans), 0
    for jobs in phases:
        results = map_in_processes(_write_sample, jobs, workers, "generate_dataset") if workers > 1 else \
            map(_write_sample, jobs)
        for _ in results:
            done += 1
            if progress is not None:
                progress(done, total)
    shutil.rmtree(staging / _RENDERS)


def generate_dataset(out: Path, config: SynthConfig, *, overwrite: bool = False,
                     progress: Callable[[int, int], None] | None = None,
                     workers: int | None = None) -> SynthSummary:
    """Write the synthetic set described by `config` into `out` and return what was written.

    Files are written into a hidden sibling folder that is renamed onto `out` at the end, so an interrupted
    run leaves no half set. `out` must be absent or empty, or (with `overwrite`) a previous synthetic set.
    `progress(done, total)` is called as images are written; `workers` processes render in parallel
    (default: one per CPU, at most 4, for sets of 64 images or more); the files do not depend on it.
    """
    leave_if_reimported()
    start = time.perf_counter()
    out = Path(out).expanduser()
    _check_target(out, overwrite)
    _remove_abandoned(out)
    plans = plan_samples(config)
    if workers is None:
        workers = min(4, os.cpu_count() or 1) if len(plans) >= 64 else 1
    if not _can_spawn():
        workers = 1
    staging = _make_staging(out)
    try:
        counts, morph_counts = _count(plans)
        _render_all(plans, config, staging, workers, progress)
        _write_manifest(staging, plans, config, counts, morph_counts)
        _replace(out, staging, overwrite)
    except OSError as exc:  # a full disk or a folder made read-only while rendering
        shutil.rmtree(staging, ignore_errors=True)
        raise SmadlrpError(f"cannot write the synthetic set into {out}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    return SynthSummary(out=out, counts=counts, morph_counts=morph_counts,
                        shortcut_counts=_shortcut_counts(plans), seconds=seconds)


def _replace(out: Path, staging: Path, overwrite: bool) -> None:
    """Move the finished `staging` folder onto `out`, replacing an empty folder or (overwrite) a previous
    set."""
    _check_target(out, overwrite)
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        if out.is_dir():
            out.rename(old)
        staging.rename(out)
    except OSError as exc:
        if old.exists() and not out.exists():
            old.rename(out)
        raise SmadlrpError(f"cannot move the generated set into {out}: {exc.strerror or exc}") from exc
    shutil.rmtree(old, ignore_errors=True)


# default set --------------------------------------------------------------------------------------


def default_dataset_dir() -> Path:
    """Where the default set lives: $SMADLRP_DATA_DIR if set, else ~/.cache/smadlrp/synthetic-v2."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "smadlrp" / f"synthetic-v{FORMAT_VERSION}"


def _matches(folder: Path, config: SynthConfig) -> bool:
    if not is_synthetic_set(folder):
        return False
    info = json.loads((folder / "synthetic.json").read_text(encoding="utf-8"))
    return bool(info.get("version") == FORMAT_VERSION and info.get("config") == _config_dict(config))


DEFAULT_CONFIG = SynthConfig()


def ensure_default_dataset(notify: Callable[[str], None],
                           progress: Callable[[int, int], None] | None = None) -> Path:
    """The default synthetic set, generated once into `default_dataset_dir()` and reused afterwards."""
    folder = default_dataset_dir()
    config = DEFAULT_CONFIG
    if _matches(folder, config):
        return folder
    notify(f"Generating the default synthetic S-MAD data set in {folder} (once; set {DATA_DIR_ENV} to use "
           "another folder). It is synthetic: it exercises the pipeline and the explanations, "
           "not real-world MAD accuracy.")
    generate_dataset(folder, config, overwrite=True, progress=progress)
    return folder
