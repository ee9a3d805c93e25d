"""Self-blended pseudo-morphs: a bona fide face blended with a transformed copy of itself, with its exact mask.

The recipe follows SelfMAD (Ivanovska et al., FG 2025), which builds on self-blended images (SBI, Shiohara and
Yamasaki, CVPR 2022). Each pseudo-morph is, with equal chance, one of:
- self-blending: one of the image and its copy gets a colour change (RGB shift, brightness, contrast,
  saturation) and then either a sharpening or a down-and-up scaling; the copy is shifted and scaled a little;
  the face mask is warped elastically, eroded and feathered, and the copy is blended in with a random ratio;
- self-morphing: the copy is zoomed about the face centre and blended, with a ratio of at most one half (the
  way a morph averages two faces), inside the zoomed face, the zoomed head (the face grown), or everywhere.
With a small chance a periodic (frequency-domain) pattern is added inside the blended region. Every range is a
field of SelfBlendRecipe; docs/real-faces.md lists them. Lengths are given for a 256 px image and scale with the
image. The returned mask is the blend weight in [0, 1] of every pixel: zero exactly where the pixel is the
(possibly colour-changed) original.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageEnhance, ImageFilter
from scipy import ndimage

Pixels = npt.NDArray[np.uint8]  # (H, W, 3) RGB
Weights = npt.NDArray[np.float32]  # (H, W) in [0, 1]
BoolArray = npt.NDArray[np.bool_]
REFERENCE_SIDE = 256.0  # the image side the recipe's lengths are given for, px
SELF_BLENDED = "self-blended"  # the morph type of a pseudo-morph written to disk (smadlrp morph)


@dataclass(frozen=True)
class SelfBlendRecipe:
    """The ranges pseudo-morphs are drawn from (uniform unless a list of choices is given)."""

    blend_share: float = 0.5  # share made by self-blending; the rest by self-morphing
    rgb_shift: float = 20.0  # colour change: each channel shifted by up to this many levels, with p 0.3
    brightness: float = 0.1  # colour change: brightness and contrast factors 1 +- this
    saturation: float = 0.3  # colour change: saturation factor 1 +- this
    sharpen: tuple[float, float] = (0.2, 0.5)  # or: unsharp-mask strength; else down-and-up scaling by 2 to 4
    translate: tuple[float, float] = (0.03, 0.015)  # copy shift, share of the width and height
    scale: tuple[float, float] = (0.95, 1 / 0.95)  # copy scale
    elastic: tuple[float, float] = (50.0, 7.0)  # mask warp: displacement alpha and smoothing sigma, px at 256
    erode_blur: tuple[int, int] = (5, 25)  # mask erosion: blur width range, px at 256
    feather: tuple[float, float] = (5.0, 45.0)  # mask edge: Gaussian sigma range, px at 256 (kernel-limited)
    blend_ratios: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)
    zoom: tuple[float, float] = (1.0, 1.1)  # self-morphing: zoom of the copy about the face centre
    morph_regions: tuple[str, ...] = ("face", "head", "full")  # self-morphing: where the copy is blended in
    head_growth: float = 0.25  # the head region: the face grown by this share of its width
    morph_ratios: tuple[float, ...] = (0.5, 0.5, 0.5, 0.375, 0.25, 0.125)
    frequency_p: float = 0.1  # chance of a periodic pattern inside the blend
    frequency_weight: tuple[float, float] = (0.025, 0.1)  # its amplitude, share of the full range
    frequency_period: tuple[float, float] = (2.0, 6.0)  # its period, px at 256 (at least 2 px)


@dataclass(frozen=True)
class PairAugmentation:
    """Changes drawn for bona fide images and pseudo-morphs alike, so that none of them marks a class."""

    rgb_shift: float = 20.0  # with p 0.3
    brightness: float = 0.3  # brightness and contrast 1 +- this, with p 0.3
    jpeg: tuple[int, int] = (40, 100)  # quality range, with p 0.5


RECIPE = SelfBlendRecipe()
PAIR_AUGMENTATION = PairAugmentation()


def face_ellipse(points5: npt.ArrayLike, height: int, width: int) -> BoolArray:
    """A face-shaped region from dlib's 5 landmarks (x, y px: two corners of each eye, then the nose base).

    An ellipse turned with the eye line: centred 0.65 eye distances below the eye midpoint, 0.95 eye
    distances wide and 1.05 high on each side, so it spans brows to chin and cheek to cheek, as the convex hull
    of 68 landmarks does on a frontal face."""
    p = np.asarray(points5, dtype=np.float64).reshape(5, 2)
    eye_a, eye_b, nose = p[0:2].mean(0), p[2:4].mean(0), p[4]
    across = eye_b - eye_a
    d = float(np.hypot(*across))
    if d < 1.0:
        return np.zeros((height, width), dtype=bool)
    u = across / d
    v = np.array([-u[1], u[0]])
    if np.dot(nose - (eye_a + eye_b) / 2, v) < 0:
        v = -v
    centre = (eye_a + eye_b) / 2 + 0.65 * d * v
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    dx, dy = xs - centre[0], ys - centre[1]
    along, down = dx * u[0] + dy * u[1], dx * v[0] + dy * v[1]
    return np.asarray((along / (0.95 * d)) ** 2 + (down / (1.05 * d)) ** 2 <= 1.0)


def pseudo_morph(image: Pixels, face: BoolArray, rng: np.random.Generator,
                 recipe: SelfBlendRecipe = RECIPE) -> tuple[Pixels, Weights]:
    """(pseudo-morph (H, W, 3) uint8, blend weight (H, W) in [0, 1]) of `image` inside the region `face`."""
    if not face.any():
        raise ValueError("pseudo_morph needs a non-empty face region")
    if rng.random() < recipe.blend_share:
        out, weight = _self_blend(image, face, rng, recipe)
    else:
        out, weight = _self_morph(image, face, rng, recipe)
    if rng.random() < recipe.frequency_p:
        pattern = _grating(image.shape[0], image.shape[1], rng, recipe.frequency_period) * 255.0 * rng.uniform(
            *recipe.frequency_weight)
        out = (out + pattern[..., None] * (weight > 0)[..., None]).astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), weight


def augment_pair(image: Pixels, rng: np.random.Generator, augmentation: PairAugmentation = PAIR_AUGMENTATION
                 ) -> Pixels:
    """`image` with the changes drawn for either class: RGB shift, brightness and contrast, JPEG."""
    out = image
    if rng.random() < 0.3:
        shift = rng.uniform(-augmentation.rgb_shift, augmentation.rgb_shift, 3)
        out = np.clip(out.astype(np.float32) + shift, 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        out = _brightness_contrast(out, rng, augmentation.brightness)
    if rng.random() < 0.5:
        out = _jpeg(out, int(rng.integers(augmentation.jpeg[0], augmentation.jpeg[1] + 1)))
    return out


def _self_blend(image: Pixels, face: BoolArray, rng: np.random.Generator,
                recipe: SelfBlendRecipe) -> tuple[npt.NDArray[np.float32], Weights]:
    source, target = image, image
    if rng.random() < 0.5:
        source = _source_change(image, rng, recipe)
    else:
        target = _source_change(image, rng, recipe)
    h, w = face.shape
    shift = (rng.uniform(-1, 1) * recipe.translate[0] * w, rng.uniform(-1, 1) * recipe.translate[1] * h)
    scale = rng.uniform(*recipe.scale)
    moved = _affine(source, scale, shift)
    mask = _affine(face.astype(np.float32)[..., None], scale, shift)[..., 0]
    mask = _elastic(mask, rng, *(v * h / REFERENCE_SIDE for v in recipe.elastic))
    weight = _feathered(mask, rng, recipe) * np.float32(rng.choice(recipe.blend_ratios))
    blended = weight[..., None] * moved + (1 - weight[..., None]) * target.astype(np.float32)
    return blended, weight.astype(np.float32)


def _self_morph(image: Pixels, face: BoolArray, rng: np.random.Generator,
                recipe: SelfBlendRecipe) -> tuple[npt.NDArray[np.float32], Weights]:
    rows, cols = np.nonzero(face)
    centre = (float(cols.mean()), float(rows.mean()))
    zoom = rng.uniform(*recipe.zoom)
    source = _zoom(image.astype(np.float32), zoom, centre)
    kind = str(rng.choice(recipe.morph_regions))
    if kind == "full":
        region = np.ones(face.shape, dtype=bool)
    else:
        grown = face if kind == "face" else ndimage.binary_dilation(
            face, iterations=max(1, round(recipe.head_growth * float(np.ptp(cols) + 1))))
        region = _zoom(grown.astype(np.float32)[..., None], zoom, centre)[..., 0] > 0.5
    weight = (region * float(rng.choice(recipe.morph_ratios))).astype(np.float32)
    return weight[..., None] * source + (1 - weight[..., None]) * image.astype(np.float32), weight


def _source_change(image: Pixels, rng: np.random.Generator, recipe: SelfBlendRecipe) -> Pixels:
    """Colour (RGB shift with p 0.3, brightness, contrast, saturation), then sharpening or down-and-up scaling."""
    out: Pixels = image
    if rng.random() < 0.3:
        shift = rng.uniform(-recipe.rgb_shift, recipe.rgb_shift, 3)
        out = np.clip(out.astype(np.float32) + shift, 0, 255).astype(np.uint8)
    out = _brightness_contrast(out, rng, recipe.brightness)
    picture = ImageEnhance.Color(Image.fromarray(out)).enhance(1 + rng.uniform(-1, 1) * recipe.saturation)
    if rng.random() < 0.5:
        strength = rng.uniform(*recipe.sharpen)
        sharp = np.asarray(picture.filter(ImageFilter.UnsharpMask(radius=2, percent=200, threshold=0)), np.float32)
        mixed = (1 - strength) * np.asarray(picture, np.float32) + strength * sharp
        return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    factor = rng.uniform(2.0, 4.0)
    small = picture.resize((max(1, round(picture.width / factor)), max(1, round(picture.height / factor))),
                           Image.Resampling.BILINEAR)
    return np.asarray(small.resize(picture.size, Image.Resampling.BILINEAR))


def _brightness_contrast(image: Pixels, rng: np.random.Generator, limit: float) -> Pixels:
    picture = ImageEnhance.Brightness(Image.fromarray(image)).enhance(1 + rng.uniform(-limit, limit))
    return np.asarray(ImageEnhance.Contrast(picture).enhance(1 + rng.uniform(-limit, limit)))


def _jpeg(image: Pixels, quality: int) -> Pixels:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def _affine(array: npt.ArrayLike, scale: float, shift: tuple[float, float]) -> npt.NDArray[np.float32]:
    """(H, W, C) scaled about the centre by `scale`, then shifted by `shift` (x, y) px; bilinear, edges kept."""
    data = np.asarray(array, dtype=np.float32)
    h, w = data.shape[:2]
    cy, cx = (h - 1) / 2, (w - 1) / 2
    matrix = np.diag([1 / scale, 1 / scale])  # output (y, x) -> input (y, x)
    offset = np.array([cy, cx]) - matrix @ np.array([cy + shift[1], cx + shift[0]])
    return np.stack([ndimage.affine_transform(data[..., c], matrix, offset, order=1, mode="nearest")
                     for c in range(data.shape[2])], axis=-1)


def _zoom(array: npt.NDArray[np.float32], zoom: float, centre: tuple[float, float]) -> npt.NDArray[np.float32]:
    """(H, W, C) magnified by `zoom` about `centre` (x, y) px."""
    matrix = np.diag([1 / zoom, 1 / zoom])
    point = np.array([centre[1], centre[0]])
    offset = point - matrix @ point
    return np.stack([ndimage.affine_transform(array[..., c], matrix, offset, order=1, mode="nearest")
                     for c in range(array.shape[2])], axis=-1)


def _elastic(mask: npt.NDArray[np.float32], rng: np.random.Generator, alpha: float, sigma: float
             ) -> npt.NDArray[np.float32]:
    """An elastic warp of `mask`: a random displacement field smoothed by `sigma` and scaled by `alpha`, px."""
    h, w = mask.shape
    dx = ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma) * alpha
    dy = ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma) * alpha
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    return ndimage.map_coordinates(mask, [ys + dy, xs + dx], order=1, mode="constant").astype(np.float32)


def _feathered(mask: npt.NDArray[np.float32], rng: np.random.Generator, recipe: SelfBlendRecipe) -> Weights:
    """SBI's blend mask: stretched a little, eroded (blur, keep the full-strength core), then feathered."""
    h, w = mask.shape
    unit = h / REFERENCE_SIDE
    stretch = (round(h * rng.uniform(0.75, 1.0)), round(w * rng.uniform(0.75, 1.0)))
    small = np.asarray(Image.fromarray(mask, mode="F").resize((stretch[1], stretch[0]), Image.Resampling.BILINEAR))
    eroded = ndimage.uniform_filter(small, max(1, round(rng.integers(recipe.erode_blur[0], recipe.erode_blur[1] + 1)
                                                        * unit)))
    core = (eroded >= eroded.max() - 1e-6).astype(np.float32) if eroded.max() > 0 else eroded
    sigma = rng.uniform(*recipe.feather) * unit
    width = rng.integers(recipe.erode_blur[0], recipe.erode_blur[1] + 1) * unit  # a kernel-limited Gaussian
    feathered = ndimage.gaussian_filter(core, min(sigma, width / 2), truncate=2.0)
    if feathered.max() <= 0:
        feathered = core
    feathered = feathered / feathered.max()
    out = np.asarray(Image.fromarray(feathered.astype(np.float32), mode="F").resize((w, h),
                                                                                    Image.Resampling.BILINEAR))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _grating(h: int, w: int, rng: np.random.Generator, periods: tuple[float, float]) -> npt.NDArray[np.float64]:
    """One to three sinusoidal gratings of high spatial frequency (a periodic resampling trace), in [-1, 1];
    `periods` in px at 256, scaled to the image, at least 2 px."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    total = np.zeros((h, w))
    count = int(rng.integers(1, 4))
    for _ in range(count):
        angle, period = rng.uniform(0, math.pi), max(2.0, rng.uniform(*periods) * h / REFERENCE_SIDE)
        total += np.sin(2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period + rng.uniform(0, 6.3))
    return total / count
