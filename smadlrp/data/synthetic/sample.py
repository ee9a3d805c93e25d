"""One finished image of the set: bona fide geometry, the capture chain both classes share, and the sample."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image as PILImage

from smadlrp.data.regions import REGION_ID
from smadlrp.data.synthetic.arrays import Image, Points
from smadlrp.data.synthetic.config import STREAM_ALIGN, STREAM_POST, SynthConfig, stream
from smadlrp.data.synthetic.geometry import landmarks
from smadlrp.data.synthetic.labels import region_labels
from smadlrp.data.synthetic.morph import morph_parts
from smadlrp.data.synthetic.people import sample_capture
from smadlrp.data.synthetic.plan import SamplePlan, draw_blend
from smadlrp.data.synthetic.raster import gaussian_blur
from smadlrp.data.synthetic.shortcut import plant_mark, shortcut_region_box
from smadlrp.data.synthetic.sources import capture, contributor, identity
from smadlrp.data.synthetic.warp import warp_labels, warp_piecewise_affine, warp_similarity


@dataclass(frozen=True)
class Sample:
    """A finished image (H, W, 3) uint8, its artifact mask (H, W) bool (all False for bona fide) and its
    face-region ids (H, W) uint8."""

    image: NDArray[np.uint8]
    mask: NDArray[np.bool_]
    regions: NDArray[np.uint8]


def _post_process(image: Image, mask: NDArray[np.bool_], regions: NDArray[np.uint8],
                  rng: np.random.Generator, config: SynthConfig, marked: bool) -> Sample:
    """The capture chain shared by both classes: resampling warp, (the corner mark when `marked`), blur,
    sensor noise, 8-bit, optional JPEG. The mask and region map follow the warp; the `shortcut` region is
    the mark's place in every image, marked or not."""
    size = image.shape[0]
    angle, scale = math.radians(rng.uniform(-2.5, 2.5)), rng.uniform(0.97, 1.03)
    shift = rng.uniform(-1.5, 1.5, 2) * size / 128
    out = warp_similarity(image, angle, scale, shift)
    moved = mask.copy()
    if mask.any():
        moved = warp_similarity(mask.astype(np.float32)[..., None], angle, scale, shift)[..., 0] > 0.5
    labels = warp_similarity(regions.astype(np.float32)[..., None], angle, scale, shift,
                                   nearest=True)[..., 0].astype(np.uint8)
    labels[shortcut_region_box(size, config.shortcut_corner)] = REGION_ID["shortcut"]
    if marked:
        out = plant_mark(out, config.shortcut_corner)
    out = gaussian_blur(out, rng.uniform(0.0, 0.8) * size / 128)
    out = out + np.float32(rng.uniform(0.004, 0.025)) * rng.standard_normal(out.shape, dtype=np.float32)
    pixels = np.clip(np.round(out * 255), 0, 255).astype(np.uint8)
    if rng.uniform() < config.jpeg_probability:
        buffer = io.BytesIO()
        PILImage.fromarray(pixels).save(buffer, format="JPEG", quality=int(rng.integers(60, 96)))
        pixels = np.asarray(PILImage.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return Sample(image=pixels, mask=moved, regions=labels)


def bona_fide_image(config: SynthConfig, plan: SamplePlan, render: Image | None = None) -> Image:
    """A bona fide capture before post-processing, (H, W, 3) float32.

    Like a morph's contributors, it is warped piecewise-affinely part of the way towards the landmarks of a
    random capture of a random identity (its own features stay single: no blending), so resampling and
    geometry do not tell the classes apart. `render` is its `contributor` capture when already at hand."""
    if render is None:
        render = contributor(config, *plan.captures[0])
    own, target = _bona_fide_geometry(config, plan)
    return warp_piecewise_affine(render[..., :3], own, target)


def bona_fide_regions(config: SynthConfig, plan: SamplePlan) -> NDArray[np.uint8]:
    """The face-region ids (H, W) of `bona_fide_image`, warped the same way (nearest neighbour)."""
    person, number = plan.captures[0]
    labels = region_labels(identity(config, person), capture(config, person, number), config.image_size)
    return warp_labels(labels, *_bona_fide_geometry(config, plan))


def _bona_fide_geometry(config: SynthConfig, plan: SamplePlan) -> tuple[Points, Points]:
    """The landmarks of a bona fide capture and those it is warped onto."""
    person, number = plan.captures[0]
    own = landmarks(identity(config, person), capture(config, person, number), config.image_size)
    rng = stream(config, STREAM_ALIGN, person, number)
    someone = identity(config, int(rng.integers(config.identities)))
    other = landmarks(someone, sample_capture(rng), config.image_size)
    return own, own + draw_blend(rng) * (other - own)


def render_sample(config: SynthConfig, plan: SamplePlan,
                  renders: tuple[Image, ...] | None = None) -> Sample:
    """The finished image, mask and region map for one plan (deterministic in (config, plan)).

    `renders` are the plan's `contributor` captures when already at hand (one for bona fide, two for a
    morph)."""
    post_rng = stream(config, STREAM_POST, plan.index)
    if plan.label == "bonafide":
        image = bona_fide_image(config, plan, renders[0] if renders else None)
        mask = np.zeros(image.shape[:2], dtype=bool)
        regions = bona_fide_regions(config, plan)
    else:
        parts = morph_parts(config, plan, (renders[0], renders[1]) if renders else None)
        image, mask, regions = parts.image, parts.mask, parts.regions
    return _post_process(image, mask, regions, post_rng, config, marked=bool(plan.shortcut))
