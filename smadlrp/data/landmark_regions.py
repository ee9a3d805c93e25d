"""What a face's landmarks give beyond the morphs: its face-region map, and a self-blended pseudo-morph in its hull.

Region maps are drawn from the 68 landmarks of the iBUG 300-W layout (dlib's 68-point model).

The map has the region ids of `data.regions` (REGIONS order), so `regions` and `compare-rules` read the maps of
real faces as they read the synthetic set's. Polygons, drawn in this order so later ones win:
- face skin: the convex hull of the jaw line (0-16) and the brows (17-26), raised by a fifth of the brow-to-chin
  height to take in the forehead;
- face outline: a band of 4 % of the face width along the jaw line;
- brows: each brow's 5 points grown into a band of a sixth of the eye width;
- eyes: each eye's 6 points, grown by a quarter of the eye width (lids and corners);
- nose: the bridge and the nostrils (27-35), grown by a tenth of the eye distance;
- mouth: the outer lip line (48-59).
Everything else is background; a map carries no hair region (the landmarks do not say where hair is).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from smadlrp.core.fileio import encode_png
from smadlrp.data.morph import convex_hull
from smadlrp.data.regions import REGION_ID
from smadlrp.data.selfblend import Pixels, Weights, face_ellipse, pseudo_morph
from smadlrp.data.synthetic.raster import polygon_mask

Points = npt.NDArray[np.float64]  # (68, 2) x, y px
JAW, RIGHT_BROW, LEFT_BROW = slice(0, 17), slice(17, 22), slice(22, 27)
NOSE, RIGHT_EYE, LEFT_EYE, MOUTH = slice(27, 36), slice(36, 42), slice(42, 48), slice(48, 60)


def region_map(points: npt.ArrayLike, height: int, width: int) -> npt.NDArray[np.uint8]:
    """(height, width) uint8 region ids of the face with 68 landmarks `points` (x, y px)."""
    p = np.asarray(points, dtype=np.float64).reshape(68, 2)
    canvas = Image.new("L", (width, height), REGION_ID["background"])
    draw = ImageDraw.Draw(canvas)
    eye_width = float(np.mean([np.ptp(p[RIGHT_EYE, 0]), np.ptp(p[LEFT_EYE, 0])]))
    eye_distance = float(np.hypot(*(p[LEFT_EYE].mean(0) - p[RIGHT_EYE].mean(0))))
    height_face = float(p[8, 1] - p[17:27, 1].min())
    forehead = p[17:27] - np.array([0.0, height_face / 5])
    _polygon(draw, convex_hull(np.concatenate([p[JAW], p[17:27], forehead])), REGION_ID["face-skin"])
    draw.line([tuple(q) for q in p[JAW]], fill=REGION_ID["face-outline"],
              width=max(1, round(0.04 * float(np.ptp(p[JAW, 0])))))
    for brow in (RIGHT_BROW, LEFT_BROW):
        draw.line([tuple(q) for q in p[brow]], fill=REGION_ID["brows"], width=max(1, round(eye_width / 6)))
    # image left/right: the subject's right eye (points 36-41) lies on the image's left
    for eye, name in ((RIGHT_EYE, "left-eye"), (LEFT_EYE, "right-eye")):
        _polygon(draw, _grown(p[eye], eye_width / 4), REGION_ID[name])
    _polygon(draw, convex_hull(_grown(p[NOSE], eye_distance / 10)), REGION_ID["nose"])
    _polygon(draw, p[MOUTH], REGION_ID["mouth"])
    return np.asarray(canvas, dtype=np.uint8)


def _polygon(draw: ImageDraw.ImageDraw, points: Points, value: int) -> None:
    draw.polygon([tuple(q) for q in points], fill=value, outline=value)


def _grown(points: Points, by: float) -> Points:
    """`points` moved away from their centroid by `by` px."""
    centre = points.mean(0)
    away = points - centre
    length = np.maximum(np.hypot(away[:, 0], away[:, 1]), 1e-9)[:, None]
    return np.asarray(points + away / length * by)


def write_region_map(folder: Path, image: str, points: npt.NDArray[np.float64]) -> str:
    """Write the region map of `image` (a PNG below `folder`) as `folder/regions/<image>` from its 68 landmarks;
    its path relative to `folder`, or "" for another layout (the regions need the 68 points)."""
    if len(points) != 68:
        return ""
    with Image.open(folder / image) as picture:
        width, height = picture.size
    path = Path("regions") / image
    (folder / path).parent.mkdir(parents=True, exist_ok=True)
    (folder / path).write_bytes(encode_png(region_map(points, height, width)))
    return path.as_posix()


def self_blend(pixels: Pixels, points: npt.NDArray[np.float64], rng: np.random.Generator) -> tuple[Pixels, Weights]:
    """A self-blended pseudo-morph of a square (S, S, 3) face inside the convex hull of its landmarks (5 landmarks:
    the face ellipse), and its blend weights (S, S)."""
    size = pixels.shape[0]
    region = face_ellipse(points, size, size) if len(points) == 5 else polygon_mask(convex_hull(points), size) > 0.5
    return pseudo_morph(pixels, region, rng)
