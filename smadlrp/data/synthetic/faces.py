"""Procedurally drawn faces: identity and capture parameters, landmarks, rendering and image warps.

Faces are drawn in a face frame (x right, y down, unit about half a face width, eye line at y = 0) and
mapped to pixels by a similarity transform. Images are float32 RGB arrays of shape (H, W, 3) in [0, 1];
points are float64 arrays of shape (N, 2) holding pixel (x, y) with pixel centres at integers.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray
from PIL import Image as PILImage
from PIL import ImageDraw

from smadlrp.data.regions import REGION_ID

Image = NDArray[np.float32]
Plane = NDArray[np.float32]
Points = NDArray[np.float64]
Vec = NDArray[np.float64]

# Landmark indices (see `landmarks`): 13 jaw points from the right temple via the chin to the left temple, the
# eye corners (left outer, left inner, right inner, right outer), the nose root, and 12 image-border points.
# Like the landmark sets of common morphing tools, nothing above the brows is a landmark; the set is also
# sparse inside the face: hair, brows, lids, irises, glasses, nose, mouth and moles are carried along by the
# warp, not aligned by it.
JAW = tuple(range(0, 13))
EYES = tuple(range(13, 17))
NOSE_ROOT = 17
_FACE_SCALE = 0.32  # pixels per face unit, as a share of the image size
_EYE_ROW = 0.48  # image row of the eye line, as a share of the image size


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


@dataclass(frozen=True)
class Head:
    """Face outline (superellipse below the eye line, ellipse above), ears, neck, skin."""

    width: float
    centre_y: float
    upper: float
    lower: float
    jaw_power: float
    ear_y: float
    ear_size: float
    neck_width: float
    skin: Vec
    skin_texture: float
    texture_seed: int
    moles: NDArray[np.float64]  # (K, 4): x, y, radius, darkness


@dataclass(frozen=True)
class Hair:
    """Hair volume outline, hairline across the forehead and strand texture."""

    color: Vec
    top: float
    side: float
    length: float
    bumps: NDArray[np.float64]  # (3, 3): amplitude, frequency, phase
    line_y: float
    line_curve: float
    line_slope: float
    line_wave: Vec  # amplitude, frequency, phase
    strand_freq: float
    strand_contrast: float
    crown_x: float
    texture_seed: int


@dataclass(frozen=True)
class Brows:
    """Brow stroke from inner to outer end: height above the eye line, tilt, arch, thickness and taper."""

    color: Vec
    inner: float
    outer: float
    height: float
    tilt: float
    arch: float
    peak: float
    thickness: float
    taper: float
    density: float


@dataclass(frozen=True)
class Eyes:
    """Almond eye opening, iris with radial texture, lash line and lid crease."""

    x: float
    y: float
    half_width: float
    upper: float
    lower: float
    tilt: float
    iris_radius: float
    pupil_radius: float
    iris_color: Vec
    iris_pattern: Vec  # two frequencies, two phases
    lash: float
    crease: float


@dataclass(frozen=True)
class Nose:
    """Nostrils, wings and bridge shading."""

    tip_y: float
    half_width: float
    nostril_rx: float
    nostril_ry: float
    nostril_dy: float
    bridge: float
    wing: float


@dataclass(frozen=True)
class Mouth:
    """Lips around a mouth line: width, lip heights, cupid's bow and colour."""

    y: float
    half_width: float
    upper: float
    lower: float
    bow: float
    curve: float
    color: Vec


@dataclass(frozen=True)
class Glasses:
    """Spectacle frames (none when `thickness` is 0): superellipse rims, a bridge and temple arms."""

    thickness: float
    half_width: float
    half_height: float
    drop: float
    power: float
    color: Vec


@dataclass(frozen=True)
class Identity:
    """Everything that stays the same across captures of one person."""

    head: Head
    hair: Hair
    brows: Brows
    eyes: Eyes
    nose: Nose
    mouth: Mouth
    glasses: Glasses


@dataclass(frozen=True)
class Capture:
    """What changes between captures: pose, expression, lighting, background, clothes."""

    angle: float  # radians
    scale: float
    shift: Vec  # share of the image size (x, y)
    smile: float
    mouth_open: float
    brow_raise: float
    eye_open: float
    gaze: Vec  # face units
    light_angle: float
    light_strength: float
    exposure: float
    tint: Vec
    background_top: Vec
    background_bottom: Vec
    clothes: Vec


def _sample_head(rng: np.random.Generator) -> Head:
    tone = _u(rng, 0.0, 1.0)
    light, dark = np.array([0.95, 0.80, 0.70]), np.array([0.42, 0.28, 0.20])
    skin = (1 - tone) * light + tone * dark + rng.uniform(-0.04, 0.04, 3)
    n_moles = int(rng.integers(0, 5))
    moles = np.column_stack([
        rng.uniform(-0.75, 0.75, n_moles), rng.uniform(-0.5, 1.1, n_moles),
        rng.uniform(0.025, 0.05, n_moles), rng.uniform(0.35, 0.7, n_moles),
    ])
    return Head(
        width=_u(rng, 0.88, 1.08), centre_y=_u(rng, 0.0, 0.12), upper=_u(rng, 1.15, 1.4),
        lower=_u(rng, 1.05, 1.3), jaw_power=_u(rng, 1.9, 3.4), ear_y=_u(rng, 0.05, 0.3),
        ear_size=_u(rng, 0.16, 0.26), neck_width=_u(rng, 0.42, 0.6), skin=np.clip(skin, 0.1, 1.0),
        skin_texture=_u(rng, 0.015, 0.045), texture_seed=int(rng.integers(2**31)), moles=moles,
    )


_HAIR_COLORS = np.array([
    [0.08, 0.06, 0.05], [0.25, 0.16, 0.09], [0.45, 0.30, 0.16], [0.75, 0.60, 0.35],
    [0.55, 0.25, 0.10], [0.62, 0.60, 0.58], [0.15, 0.12, 0.10],
])


def _sample_hair(rng: np.random.Generator) -> Hair:
    color = _HAIR_COLORS[int(rng.integers(len(_HAIR_COLORS)))] * _u(rng, 0.8, 1.2)
    bumps = np.column_stack([
        rng.uniform(0.02, 0.08, 3), rng.integers(2, 9, 3).astype(float), rng.uniform(0, 2 * math.pi, 3),
    ])
    return Hair(
        color=np.clip(color, 0.02, 1.0), top=_u(rng, 0.1, 0.4), side=_u(rng, 0.04, 0.32),
        length=float(rng.choice([_u(rng, -0.2, 0.3), _u(rng, 0.6, 1.6)])), bumps=bumps,
        line_y=_u(rng, -0.85, -0.4), line_curve=_u(rng, -0.1, 0.45), line_slope=_u(rng, -0.25, 0.25),
        line_wave=np.array([_u(rng, 0.0, 0.1), _u(rng, 2.0, 7.0), _u(rng, 0, 2 * math.pi)]),
        strand_freq=_u(rng, 18, 40), strand_contrast=_u(rng, 0.08, 0.22), crown_x=_u(rng, -0.4, 0.4),
        texture_seed=int(rng.integers(2**31)),
    )


def _sample_brows(rng: np.random.Generator, hair: Hair) -> Brows:
    inner = _u(rng, 0.1, 0.22)
    return Brows(
        color=hair.color * _u(rng, 0.35, 0.75), inner=inner, outer=inner + _u(rng, 0.4, 0.62),
        height=_u(rng, 0.12, 0.46), tilt=_u(rng, -0.06, 0.1), arch=_u(rng, 0.0, 0.18),
        peak=_u(rng, 0.35, 0.75), thickness=_u(rng, 0.07, 0.15), taper=_u(rng, 0.2, 0.7),
        density=_u(rng, 0.75, 0.98),
    )


def _sample_eyes(rng: np.random.Generator) -> Eyes:
    palette = np.array([[0.30, 0.18, 0.08], [0.15, 0.10, 0.06], [0.30, 0.45, 0.65], [0.35, 0.50, 0.30],
                        [0.50, 0.40, 0.20]])
    iris_color = palette[int(rng.integers(len(palette)))] * _u(rng, 0.8, 1.2)
    half_width = _u(rng, 0.16, 0.22)
    return Eyes(
        x=_u(rng, 0.33, 0.45), y=_u(rng, -0.05, 0.08), half_width=half_width, upper=_u(rng, 0.05, 0.15),
        lower=_u(rng, 0.03, 0.07), tilt=_u(rng, -0.04, 0.04), iris_radius=_u(rng, 0.065, 0.095),
        pupil_radius=_u(rng, 0.022, 0.038), iris_color=np.clip(iris_color, 0.03, 1.0),
        iris_pattern=np.array([rng.integers(5, 14), rng.integers(3, 9), _u(rng, 0, 6.3), _u(rng, 0, 6.3)],
                              dtype=float),
        lash=_u(rng, 0.015, 0.045), crease=_u(rng, 0.04, 0.12),
    )


def _sample_nose(rng: np.random.Generator, mouth: Mouth) -> Nose:
    return Nose(
        tip_y=min(_u(rng, 0.32, 0.62), mouth.y - 0.24), half_width=_u(rng, 0.06, 0.22),
        nostril_rx=_u(rng, 0.05, 0.08), nostril_ry=_u(rng, 0.028, 0.05), nostril_dy=_u(rng, -0.03, 0.07),
        bridge=_u(rng, 0.06, 0.12), wing=_u(rng, 0.07, 0.12),
    )


def _sample_mouth(rng: np.random.Generator, head: Head) -> Mouth:
    lip = head.skin * np.array([0.85, 0.55, 0.55]) * _u(rng, 0.75, 1.0) + np.array([0.08, 0.0, 0.02])
    return Mouth(
        y=min(_u(rng, 0.66, 1.0), head.centre_y + head.lower - 0.3), half_width=_u(rng, 0.18, 0.38),
        upper=_u(rng, 0.03, 0.1), lower=_u(rng, 0.04, 0.12), bow=_u(rng, 0.0, 0.6),
        curve=_u(rng, -0.05, 0.09), color=np.clip(lip, 0, 1),
    )


def _sample_glasses(rng: np.random.Generator) -> Glasses:
    wears = rng.uniform() < 0.3
    color = np.array([0.05, 0.04, 0.04]) if rng.uniform() < 0.6 else rng.uniform(0.1, 0.7, 3)
    return Glasses(thickness=_u(rng, 0.02, 0.045) if wears else 0.0, half_width=_u(rng, 0.2, 0.3),
                   half_height=_u(rng, 0.13, 0.22), drop=_u(rng, -0.02, 0.08), power=_u(rng, 2.0, 5.0),
                   color=color)


def sample_identity(rng: np.random.Generator) -> Identity:
    """Draw one identity: face structure, hair, brows, eyes, nose, mouth, glasses, skin detail."""
    head = _sample_head(rng)
    hair = _sample_hair(rng)
    mouth = _sample_mouth(rng, head)
    return Identity(head=head, hair=hair, brows=_sample_brows(rng, hair), eyes=_sample_eyes(rng),
                    nose=_sample_nose(rng, mouth), mouth=mouth, glasses=_sample_glasses(rng))


def sample_capture(rng: np.random.Generator) -> Capture:
    """Draw one capture: small pose, expression and lighting changes, a passport-like background."""
    top = np.clip(_u(rng, 0.68, 0.9) + rng.uniform(-0.03, 0.03, 3), 0, 1)
    return Capture(
        angle=math.radians(_u(rng, -6, 6)), scale=_u(rng, 0.93, 1.07), shift=rng.uniform(-0.03, 0.03, 2),
        smile=_u(rng, 0.0, 1.0), mouth_open=float(max(0.0, _u(rng, -0.6, 1.0))),
        brow_raise=_u(rng, -0.03, 0.05),
        eye_open=_u(rng, 0.8, 1.1), gaze=rng.uniform(-0.025, 0.025, 2), light_angle=_u(rng, 0, 2 * math.pi),
        light_strength=_u(rng, 0.0, 0.3), exposure=_u(rng, 0.85, 1.12), tint=1 + rng.uniform(-0.05, 0.05, 3),
        background_top=top, background_bottom=np.clip(top * _u(rng, 0.9, 1.05), 0, 1),
        clothes=rng.uniform(0.05, 0.8, 3),
    )


def neutral_capture() -> Capture:
    """A frontal, neutral capture (used to lay out the landmark triangulation)."""
    grey = np.full(3, 0.8)
    return Capture(angle=0.0, scale=1.0, shift=np.zeros(2), smile=0.5, mouth_open=0.2, brow_raise=0.0,
                   eye_open=1.0, gaze=np.zeros(2), light_angle=0.0, light_strength=0.0, exposure=1.0,
                   tint=np.ones(3), background_top=grey, background_bottom=grey, clothes=grey)


# geometry -----------------------------------------------------------------------------------------


def _pose(capture: Capture, size: int) -> tuple[Vec, float, float]:
    """Face-frame origin in pixels, pixels per face unit, rotation angle."""
    centre = np.array([0.5 * (size - 1), _EYE_ROW * (size - 1)]) + capture.shift * size
    return centre, _FACE_SCALE * size * capture.scale, capture.angle


def _to_pixels(points: Points, capture: Capture, size: int) -> Points:
    centre, k, angle = _pose(capture, size)
    c, s = math.cos(angle), math.sin(angle)
    x, y = points[:, 0], points[:, 1]
    return np.column_stack([centre[0] + k * (c * x - s * y), centre[1] + k * (s * x + c * y)])


def _face_grid(capture: Capture, size: int) -> tuple[Plane, Plane, float]:
    """Face-frame coordinates (u, v) of every pixel, each (H, W), and pixels per face unit."""
    centre, k, angle = _pose(capture, size)
    c, s = math.cos(angle), math.sin(angle)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = (xs - centre[0]) / k, (ys - centre[1]) / k
    return (c * dx + s * dy).astype(np.float32), (-s * dx + c * dy).astype(np.float32), k


def _jaw_point(head: Head, phi: float) -> tuple[float, float]:
    """Point of the lower face outline at parameter angle `phi` in [0, pi] (0 = right temple)."""
    c, s = math.cos(phi), math.sin(phi)
    e = 2.0 / head.jaw_power
    return head.width * math.copysign(abs(c) ** e, c), head.centre_y + head.lower * abs(s) ** e


def _hair_radius(head: Head, hair: Hair, phi: NDArray[np.floating]) -> NDArray[np.float64]:
    """Radius of the hair outline from (0, head.centre_y) at angle `phi` (upper half: phi in [-pi, 0])."""
    c, s = np.cos(phi), np.sin(phi)
    face = 1.0 / np.sqrt((c / head.width) ** 2 + (s / head.upper) ** 2)
    bumps = sum(a * np.sin(f * phi + p) for a, f, p in hair.bumps)
    return np.asarray(face + hair.side + (hair.top - hair.side) * s**2 + bumps, dtype=np.float64)


def _brow_y(brows: Brows, capture: Capture, t: NDArray[np.float32] | float) -> NDArray[np.float64]:
    """Brow centre line height at position t in [0, 1] from inner to outer end."""
    tc = np.clip(t, 1e-6, 1.0)
    q = math.log(0.5) / math.log(brows.peak)
    return np.asarray(-(brows.height + capture.brow_raise) - brows.tilt * tc
                      - brows.arch * np.sin(math.pi * tc**q), dtype=np.float64)


def _mouth_line(mouth: Mouth, capture: Capture) -> tuple[float, float, float]:
    """Mouth half-width, corner lift and opening height for a capture's expression."""
    smile = capture.smile
    return mouth.half_width * (1 + 0.12 * smile), mouth.curve + 0.05 * smile, 0.07 * capture.mouth_open


def face_landmarks(identity: Identity) -> Points:
    """The 18 face landmarks in face-frame units, shape (18, 2)."""
    head, eyes = identity.head, identity.eyes
    pts = [_jaw_point(head, phi) for phi in np.linspace(0.0, math.pi, 13)]
    for sign in (-1.0, 1.0):
        cx = sign * eyes.x
        corners = [(cx + sign * eyes.half_width, eyes.y + eyes.tilt),
                   (cx - sign * eyes.half_width, eyes.y - eyes.tilt)]
        pts += corners if sign < 0 else corners[::-1]
    pts.append((0.0, eyes.y - 0.02))
    return np.asarray(pts, dtype=np.float64)


def border_points(size: int) -> Points:
    """12 points on the image border: corners and thirds of each side."""
    ticks = np.linspace(0.0, size - 1.0, 4)
    top = [(x, 0.0) for x in ticks]
    bottom = [(x, size - 1.0) for x in ticks]
    sides = [(0.0, y) for y in ticks[1:3]] + [(size - 1.0, y) for y in ticks[1:3]]
    return np.asarray(top + bottom + sides, dtype=np.float64)


def landmarks(identity: Identity, capture: Capture, size: int) -> Points:
    """All 30 landmarks in pixels, shape (30, 2): the face landmarks (clamped to the image) and the border."""
    face = np.clip(_to_pixels(face_landmarks(identity), capture, size), 0.0, size - 1.0)
    return np.concatenate([face, border_points(size)])


# drawing ------------------------------------------------------------------------------------------


def _cover(d: NDArray[np.float32] | NDArray[np.float64], aa: float) -> Plane:
    """Anti-aliased coverage in [0, 1] of a shape with signed distance `d` (< 0 inside), `aa` = 1 pixel."""
    return np.clip(0.5 - d / aa, 0.0, 1.0).astype(np.float32)


def _ellipse(u: Plane, v: Plane, cx: float, cy: float, rx: float, ry: float) -> Plane:
    """Approximate signed distance to an axis-aligned ellipse (face units)."""
    return ((np.hypot((u - cx) / rx, (v - cy) / ry) - 1.0) * min(rx, ry)).astype(np.float32)


@dataclass(frozen=True)
class _Canvas:
    """An image (h, w, 3) with the face-frame coordinates (u, v) of its pixels, `aa` = one pixel in face
    units, the pose that maps face units to pixels (origin, pixels per unit, angle) and where it sits in the
    whole picture (`box`, rows and columns).

    A window is a view: painting into it paints into this image.
    """

    image: Image
    u: Plane
    v: Plane
    aa: float
    pose: tuple[Vec, float, float]
    box: tuple[slice, slice]

    def window(self, u0: float, u1: float, v0: float, v1: float) -> _Canvas:
        """The part (plus 2 px) that holds the face-frame rectangle u0..u1 x v0..v1."""
        (cx, cy), k, angle = self.pose
        c, s = math.cos(angle), math.sin(angle)
        corners = [(u, v) for u in (u0, u1) for v in (v0, v1)]
        xs = [cx + k * (c * u - s * v) for u, v in corners]
        ys = [cy + k * (s * u + c * v) for u, v in corners]
        top, left = self.box[0].start, self.box[1].start
        h, w = self.u.shape
        r0 = min(max(math.floor(min(ys)) - 2 - top, 0), h)
        c0 = min(max(math.floor(min(xs)) - 2 - left, 0), w)
        r1 = max(min(math.ceil(max(ys)) + 3 - top, h), r0)
        c1 = max(min(math.ceil(max(xs)) + 3 - left, w), c0)
        local = (slice(r0, r1), slice(c0, c1))
        whole = (slice(top + r0, top + r1), slice(left + c0, left + c1))
        return _Canvas(self.image[local], self.u[local], self.v[local], self.aa, self.pose, whole)

    def cover(self, d: NDArray[np.float32] | NDArray[np.float64]) -> Plane:
        return _cover(d, self.aa)

    def paint(self, alpha: Plane, color: Image | Vec) -> None:
        """Composite `color` (RGB or (H, W, 3)) over the image in place with opacity `alpha` (H, W)."""
        image = self.image
        image += alpha[..., None] * (np.asarray(color, dtype=np.float32) - image)


def _noise(seed: int, cells: int, extent: float, capture: Capture, size: int) -> Plane:
    """A smooth random field (unit variance) fixed in face coordinates, (size, size).

    A `cells` x `cells` grid of normal samples spans face coordinates -extent..extent and is resampled
    bilinearly through the capture's pose (zero outside the grid)."""
    grid = np.random.default_rng(seed).standard_normal((cells, cells)).astype(np.float32)
    (cx, cy), k, angle = _pose(capture, size)
    g, o = 0.5 * (cells - 1) / extent / k, 0.5 * (cells - 1)
    a, b = g * math.cos(angle), g * math.sin(angle)
    coeffs = (a, b, o - a * cx - b * cy, -b, a, o + b * cx - a * cy)
    field = PILImage.fromarray(grid, mode="F").transform(
        (size, size), PILImage.Transform.AFFINE, coeffs, resample=PILImage.Resampling.BILINEAR)
    return np.asarray(field, dtype=np.float32)


def _background(capture: Capture, size: int) -> Image:
    rows = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    column = (1 - rows) * capture.background_top + rows * capture.background_bottom
    return np.repeat(column, size, axis=1).astype(np.float32)


def _hair_cover(identity: Identity, u: Plane, v: Plane, aa: float) -> tuple[Plane, Plane]:
    """Coverage of the hair volume behind the face and of the fringe over the forehead."""
    head, hair = identity.head, identity.hair
    dy = v - head.centre_y
    angles = np.linspace(-math.pi, math.pi, 721)  # the outline is smooth: tabulate it every half degree
    top = np.hypot(u, dy) - np.interp(np.arctan2(dy, u), angles, _hair_radius(head, hair, angles))
    left, right = _hair_radius(head, hair, np.array([-math.pi, 0.0]))
    side_radius = np.where(u < 0, left, right)
    sides = np.maximum(np.abs(u) - side_radius, dy - hair.length - 0.04 * np.sin(23.0 * u))
    back = _cover(np.where(dy < 0, top, sides), aa)
    amp, freq, phase = hair.line_wave
    line = hair.line_y + hair.line_curve * u**2 + hair.line_slope * u + amp * np.sin(freq * u + phase)
    return back, _cover(v - line, aa)


def _hair_layers(identity: Identity, capture: Capture, u: Plane, v: Plane,
                 aa: float) -> tuple[Plane, Plane, Image]:
    """Coverage of the hair volume behind the face, of the fringe over the forehead, and the hair colour."""
    head, hair = identity.head, identity.hair
    back, fringe = _hair_cover(identity, u, v, aa)
    crown_y = head.centre_y - head.upper - 0.1
    psi = np.arctan2(v - crown_y, u - hair.crown_x)
    wobble = _noise(hair.texture_seed, 10, 2.5, capture, u.shape[0])
    strands = np.sin(hair.strand_freq * psi + 2.0 * wobble)
    color = hair.color[None, None, :] * (1 + hair.strand_contrast * strands + 0.08 * wobble)[..., None]
    return back, fringe, color.astype(np.float32)


def _face_field(head: Head, u: Plane, v: Plane) -> Plane:
    """Implicit outline value: < 0 inside the face, 0 on the outline (approximately face units)."""
    dy = v - head.centre_y
    lower = np.abs(u / head.width) ** head.jaw_power + np.abs(dy / head.lower) ** head.jaw_power
    upper = np.hypot(u / head.width, dy / head.upper)
    return (np.where(dy > 0, lower ** (1.0 / head.jaw_power), upper) - 1.0).astype(np.float32)


def _brow_distance(brows: Brows, capture: Capture, u: Plane, v: Plane, sign: float) -> Plane:
    """Approximate signed distance (face units) to the brow on side `sign` (-1: image left)."""
    span = brows.outer - brows.inner
    t = (sign * u - brows.inner) / span
    half = 0.5 * brows.thickness * (1 - brows.taper * np.clip(t, 0, 1))
    d = np.maximum(np.abs(v - _brow_y(brows, capture, t)) - half, np.maximum(-t, t - 1) * span)
    return d.astype(np.float32)


def _draw_brows(canvas: _Canvas, identity: Identity, capture: Capture) -> None:
    brows = identity.brows
    top = -(brows.height + abs(capture.brow_raise) + abs(brows.tilt) + brows.arch + brows.thickness)
    for sign in (-1.0, 1.0):
        c = canvas.window(min(sign * brows.inner, sign * brows.outer) - 0.05,
                          max(sign * brows.inner, sign * brows.outer) + 0.05, top - 0.05, 0.05)
        d = _brow_distance(brows, capture, c.u, c.v, sign)
        hairs = 0.8 + 0.2 * np.sin(90.0 * (c.u * 0.6 - sign * c.v))
        c.paint(c.cover(d) * brows.density * hairs.astype(np.float32), brows.color)


def _draw_eyes(canvas: _Canvas, identity: Identity, capture: Capture) -> None:
    eyes, skin = identity.eyes, identity.head.skin
    f1, f2, p1, p2 = eyes.iris_pattern
    for sign in (-1.0, 1.0):
        cx = sign * eyes.x
        reach = eyes.half_width * 1.2
        c = canvas.window(cx - reach, cx + reach, eyes.y - 0.05 - eyes.upper - eyes.crease - abs(eyes.tilt),
                          eyes.y + 0.05 + eyes.lower + abs(eyes.tilt))
        u, v = c.u, c.v
        t = sign * (u - cx) / eyes.half_width
        bulge = np.clip(1 - t**2, 0, 1)
        y_up = eyes.y + eyes.tilt * t - eyes.upper * capture.eye_open * bulge**0.7
        y_low = eyes.y + eyes.tilt * t + eyes.lower * capture.eye_open * bulge
        opening = c.cover(np.maximum(np.maximum(y_up - v, v - y_low), (np.abs(t) - 1) * eyes.half_width))
        c.paint(0.35 * c.cover(np.abs(v - y_up + eyes.crease) - 0.012) * (np.abs(t) < 0.9), skin * 0.55)
        c.paint(opening, np.array([0.92, 0.9, 0.87]))
        ix, iy = cx + capture.gaze[0], eyes.y + capture.gaze[1] - 0.15 * eyes.upper
        r = np.hypot(u - ix, v - iy)
        ang = np.arctan2(v - iy, u - ix)
        texture = 1 + 0.3 * np.sin(f1 * ang + p1) * np.sin(f2 * ang + p2 + 6 * r / eyes.iris_radius)
        ring = 1 - 0.5 * np.clip((r / eyes.iris_radius - 0.75) * 4, 0, 1)
        iris = eyes.iris_color[None, None, :] * (texture * ring)[..., None]
        c.paint(c.cover(r - eyes.iris_radius) * opening, iris.astype(np.float32))
        c.paint(c.cover(r - eyes.pupil_radius) * opening, np.array([0.04, 0.03, 0.03]))
        glint = c.cover(np.hypot(u - ix + 0.3 * eyes.iris_radius, v - iy + 0.3 * eyes.iris_radius) - 0.014)
        c.paint(0.8 * glint * opening, np.array([1.0, 1.0, 1.0]))
        lash = np.maximum(np.abs(v - (y_up - 0.5 * eyes.lash)) - 0.5 * eyes.lash,
                          np.maximum(-1.0 - t, t - 1.12) * eyes.half_width)
        c.paint(0.9 * c.cover(lash), np.array([0.06, 0.04, 0.04]))
        c.paint(0.3 * c.cover(np.abs(v - y_low) - 0.008) * (np.abs(t) < 1), skin * 0.5)


def _draw_nose(canvas: _Canvas, identity: Identity) -> None:
    nose, skin, eye_y = identity.nose, identity.head.skin, identity.eyes.y
    reach = nose.half_width + nose.wing + 0.08
    c = canvas.window(-reach, reach, eye_y, nose.tip_y + nose.nostril_dy + 0.08)
    u, v = c.u, c.v
    along = np.maximum(eye_y + 0.05 - v, v - nose.tip_y + 0.1)
    bridge = np.maximum(np.abs(np.abs(u) - nose.bridge) - 0.02, along)
    c.paint(0.25 * c.cover(bridge), skin * 0.6)
    c.paint(0.2 * c.cover(_ellipse(u, v, 0.0, nose.tip_y - 0.04, 0.07, 0.05)), np.minimum(skin * 1.2, 1))
    ny = nose.tip_y + nose.nostril_dy
    c.paint(0.3 * c.cover(_ellipse(u, v, 0.0, ny + 0.04, 0.8 * nose.half_width, 0.03)), skin * 0.45)
    for sign in (-1.0, 1.0):
        nx = sign * nose.half_width
        wing_d = np.abs(np.hypot(u - nx - sign * 0.03, v - ny + 0.02) - nose.wing) - 0.02
        c.paint(0.6 * c.cover(wing_d) * (v < ny + 0.02), skin * 0.5)
        c.paint(0.95 * c.cover(_ellipse(u, v, nx, ny, nose.nostril_rx, nose.nostril_ry)), skin * 0.12)


def _draw_mouth(canvas: _Canvas, identity: Identity, capture: Capture) -> None:
    mouth = identity.mouth
    half, lift, gap = _mouth_line(mouth, capture)
    c = canvas.window(-half - 0.05, half + 0.05, mouth.y - abs(lift) - mouth.upper - 0.05,
                      mouth.y + abs(lift) + gap + mouth.lower + 0.05)
    u, v = c.u, c.v
    t = u / half
    bulge = np.clip(1 - t**2, 0, 1)
    line = mouth.y - lift * t**2
    ends = (np.abs(t) - 1) * half
    top = line - mouth.upper * bulge**0.6 * (1 - mouth.bow * np.exp(-((t / 0.2) ** 2)))
    bottom = line + gap * bulge + mouth.lower * bulge**0.8
    c.paint(c.cover(np.maximum(np.maximum(top - v, v - line), ends)), mouth.color * 0.85)
    c.paint(c.cover(np.maximum(np.maximum(line + gap * bulge - v, v - bottom), ends)), mouth.color)
    opening = np.maximum(np.maximum(line - v, v - line - gap * bulge), ends)
    c.paint(c.cover(opening), np.array([0.1, 0.05, 0.05]))
    c.paint(0.7 * c.cover(np.maximum(np.abs(v - line) - 0.01, ends - 0.01)), mouth.color * 0.4)


def _draw_glasses(canvas: _Canvas, identity: Identity) -> None:
    glasses, eyes = identity.glasses, identity.eyes
    if glasses.thickness <= 0:
        return
    cy, hw, hh, half = eyes.y + glasses.drop, glasses.half_width, glasses.half_height, glasses.thickness / 2
    c = canvas.window(-1.3, 1.3, cy - hh - 0.05, cy + hh + 0.05)
    u, v = c.u, c.v
    d = np.maximum(np.abs(v - cy + 0.4 * hh) - half, hw - np.abs(np.abs(u) - eyes.x))  # bridge and arms
    for sign in (-1.0, 1.0):
        shape = (np.abs((u - sign * eyes.x) / hw) ** glasses.power
                 + np.abs((v - cy) / hh) ** glasses.power) ** (1 / glasses.power) - 1
        d = np.minimum(d, np.abs(shape) * min(hw, hh) - half)
    c.paint(0.95 * c.cover(d), glasses.color)


def _draw_moles(canvas: _Canvas, head: Head) -> None:
    for mx, my, mr, dark in head.moles:
        c = canvas.window(mx - mr, mx + mr, my - mr, my + mr)
        c.paint(dark * c.cover(np.hypot(c.u - mx, c.v - my) - mr), head.skin * 0.35)


def _shade(capture: Capture, u: Plane, v: Plane) -> Image:
    """Lighting of the subject at face coordinates (u, v): exposure, a linear gradient and a colour tint."""
    direction = math.cos(capture.light_angle) * u + math.sin(capture.light_angle) * v
    light = capture.exposure * (1 + capture.light_strength * direction / 1.3)
    return (light[..., None] * capture.tint[None, None, :]).astype(np.float32)


def render_face(identity: Identity, capture: Capture, size: int) -> tuple[Image, Plane]:
    """Draw one capture of an identity: RGB image (size, size, 3) and subject matte (size, size), in [0, 1].

    The matte covers head, hair, ears and neck (not the background and clothes)."""
    u, v, k = _face_grid(capture, size)
    head = identity.head
    whole = (slice(0, size), slice(0, size))
    scene = _Canvas(_background(capture, size), u, v, 1.0 / k, _pose(capture, size), whole)
    back, fringe, hair_color = _hair_layers(identity, capture, u, v, scene.aa)
    scene.paint(back, hair_color * _shade(capture, u, v))
    matte = back.copy()
    collar = head.centre_y + head.lower + 0.3
    neck = scene.window(-head.neck_width, head.neck_width, head.centre_y + 0.2, 3.0)
    throat = neck.cover(np.maximum(np.abs(neck.u) - head.neck_width, head.centre_y + 0.2 - neck.v))
    neck.paint(throat, head.skin * 0.78 * _shade(capture, neck.u, neck.v))
    below_collar = neck.cover(collar + 0.12 * neck.u**2 - neck.v)
    matte[neck.box] = np.maximum(matte[neck.box], throat * (1 - below_collar))
    clothes = scene.window(-3.0, 3.0, collar, 3.0)
    clothes.paint(clothes.cover(collar + 0.12 * clothes.u**2 - clothes.v),
                  capture.clothes * _shade(capture, clothes.u, clothes.v))
    for sign in (-1.0, 1.0):
        x, rx, ry = sign * (head.width + 0.02), 0.55 * head.ear_size, head.ear_size
        ear = scene.window(x - rx, x + rx, head.ear_y - ry, head.ear_y + ry)
        cover = ear.cover(_ellipse(ear.u, ear.v, x, head.ear_y, rx, ry))
        ear.paint(cover, head.skin * 0.88 * _shade(capture, ear.u, ear.v))
        matte[ear.box] = np.maximum(matte[ear.box], cover)
    face = scene.window(-head.width, head.width, head.centre_y - head.upper, head.centre_y + head.lower)
    field = _face_field(head, face.u, face.v)
    texture = _noise(head.texture_seed, 56, 2.0, capture, size)[face.box]
    relief = head.skin_texture * texture - 0.5 * np.clip(field + 0.3, 0, 0.3)
    skin = (head.skin[None, None, :] * (1 + relief)[..., None]).astype(np.float32)
    skin_layer = _Canvas(skin, face.u, face.v, face.aa, face.pose, face.box)
    _draw_brows(skin_layer, identity, capture)
    _draw_eyes(skin_layer, identity, capture)
    _draw_nose(skin_layer, identity)
    _draw_mouth(skin_layer, identity, capture)
    _draw_moles(skin_layer, head)
    _draw_glasses(skin_layer, identity)
    skin_layer.paint(fringe[face.box], hair_color[face.box])
    outline = face.cover(field)
    face.paint(outline, skin_layer.image * _shade(capture, face.u, face.v))
    matte[face.box] = np.maximum(matte[face.box], outline)
    return np.clip(scene.image, 0.0, 1.0), matte


# region labels ------------------------------------------------------------------------------------

OUTLINE_HALF_WIDTH = 0.06  # face units (about 2.5 px at 128 px) either side of the face outline


def _box(u: Plane, v: Plane, u0: float, u1: float, v0: float, v1: float) -> NDArray[np.bool_]:
    """The ellipse inscribed in the face-frame rectangle u0..u1 x v0..v1."""
    return np.asarray(np.hypot((u - (u0 + u1) / 2) / ((u1 - u0) / 2),
                               (v - (v0 + v1) / 2) / ((v1 - v0) / 2)) <= 1.0)


def region_labels(identity: Identity, capture: Capture, size: int) -> NDArray[np.uint8]:
    """Region id (smadlrp.data.regions.REGIONS) of every pixel of `render_face`'s picture, (size, size) uint8.

    Drawn from the same geometry as the face: hair volume, then skin of ears, neck and face, the features
    (boxes around eyes with lids, brows, nose, lips), the fringe over the forehead, and last a band of
    OUTLINE_HALF_WIDTH either side of the face outline. Everything else (backdrop, clothes) is background.
    The `shortcut` region is added by the generator, in image coordinates."""
    u, v, k = _face_grid(capture, size)
    head, eyes, nose, mouth = identity.head, identity.eyes, identity.nose, identity.mouth
    labels = np.full((size, size), REGION_ID["background"], dtype=np.uint8)
    back, fringe = _hair_cover(identity, u, v, 1.0 / k)
    labels[back > 0.5] = REGION_ID["hair"]
    collar = head.centre_y + head.lower + 0.3
    neck = (np.abs(u) < head.neck_width) & (v > head.centre_y + 0.2) & (v < collar + 0.12 * u**2)
    for sign in (-1.0, 1.0):
        x, rx, ry = sign * (head.width + 0.02), 0.55 * head.ear_size, head.ear_size
        neck |= _box(u, v, x - rx, x + rx, head.ear_y - ry, head.ear_y + ry)
    field = _face_field(head, u, v)
    inside = field < 0
    labels[neck | inside] = REGION_ID["face-skin"]
    nose_v1 = nose.tip_y + nose.nostril_dy + nose.nostril_ry + 0.05
    nose_half = max(nose.half_width + nose.nostril_rx, nose.half_width + nose.wing) + 0.03
    labels[inside & _box(u, v, -nose_half, nose_half, eyes.y + 0.05, nose_v1)] = REGION_ID["nose"]
    half, lift, gap = _mouth_line(mouth, capture)
    lips = _box(u, v, -half - 0.05, half + 0.05, mouth.y - abs(lift) - mouth.upper - 0.05,
                mouth.y + abs(lift) + gap + mouth.lower + 0.05)
    labels[inside & lips] = REGION_ID["mouth"]
    for sign, name in ((-1.0, "left-eye"), (1.0, "right-eye")):
        labels[inside & (_brow_distance(identity.brows, capture, u, v, sign) < 0.03)] = REGION_ID["brows"]
        cx, reach = sign * eyes.x, eyes.half_width * 1.2
        eye = _box(u, v, cx - reach, cx + reach, eyes.y - 0.05 - eyes.upper - eyes.crease - abs(eyes.tilt),
                   eyes.y + 0.05 + eyes.lower + abs(eyes.tilt))
        labels[inside & eye] = REGION_ID[name]
    labels[inside & (fringe > 0.5)] = REGION_ID["hair"]
    labels[np.abs(field) < OUTLINE_HALF_WIDTH] = REGION_ID["face-outline"]
    return labels


# warps --------------------------------------------------------------------------------------------


def _circumcircle_contains(p: Points, tri: tuple[int, int, int], q: Vec) -> bool:
    (ax, ay), (bx, by), (cx, cy) = p[tri[0]], p[tri[1]], p[tri[2]]
    d = 2 * (ax * (by - cy) + bx * (cy - ay) + cx * (ay - by))
    ux = ((ax**2 + ay**2) * (by - cy) + (bx**2 + by**2) * (cy - ay) + (cx**2 + cy**2) * (ay - by)) / d
    uy = ((ax**2 + ay**2) * (cx - bx) + (bx**2 + by**2) * (ax - cx) + (cx**2 + cy**2) * (bx - ax)) / d
    return bool((q[0] - ux) ** 2 + (q[1] - uy) ** 2 < (ax - ux) ** 2 + (ay - uy) ** 2 - 1e-12)


def delaunay(points: Points) -> NDArray[np.int64]:
    """Delaunay triangulation (Bowyer-Watson) of (N, 2) points; (T, 3) vertex indices, counter-clockwise."""
    n = len(points)
    lo, hi = points.min(axis=0), points.max(axis=0)
    mid, span = (lo + hi) / 2, float((hi - lo).max()) * 1e5  # far enough that no hull triangle is lost
    p = np.concatenate([points, mid + np.array([[-span, -span], [span, -span], [0.0, span]])])
    tris: list[tuple[int, int, int]] = [(n, n + 1, n + 2)]
    for i in range(n):
        bad = [t for t in tris if _circumcircle_contains(p, t, p[i])]
        edges = Counter(tuple(sorted(e)) for t in bad for e in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])))
        tris = [t for t in tris if t not in bad] + [(a, b, i) for (a, b), c in edges.items() if c == 1]
    kept = np.array([t for t in tris if max(t) < n], dtype=np.int64)
    a, b, c = p[kept[:, 0]], p[kept[:, 1]], p[kept[:, 2]]
    cross = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    kept[cross < 0] = kept[cross < 0][:, [0, 2, 1]]
    return kept


@lru_cache(maxsize=1)
def triangles() -> NDArray[np.int64]:
    """The fixed triangulation of the landmark set: Delaunay of the mean landmarks of 64 reference faces."""
    rng = np.random.default_rng(20240607)
    capture = neutral_capture()
    mean = np.mean([landmarks(sample_identity(rng), capture, 1000) for _ in range(64)], axis=0)
    return delaunay(np.round(mean / 999.0, 3))


def _sample(image: Image, x: Plane, y: Plane) -> Image:
    """Bilinear sampling of `image` (H, W, C) at pixel positions (x, y), edges clamped."""
    h, w = image.shape[:2]
    x = np.clip(x, 0, w - 1.0)
    y = np.clip(y, 0, h - 1.0)
    x0 = np.minimum(x.astype(np.intp), w - 2)
    y0 = np.minimum(y.astype(np.intp), h - 2)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    flat = image.reshape(h * w, -1)
    i00 = y0 * w + x0
    top = np.take(flat, i00, axis=0)
    top += fx * (np.take(flat, i00 + 1, axis=0) - top)
    bottom = np.take(flat, i00 + w, axis=0)
    bottom += fx * (np.take(flat, i00 + w + 1, axis=0) - bottom)
    return (top + fy * (bottom - top)).astype(np.float32)


def _affine_maps(src: Points, dst: Points, tris: NDArray[np.int64]) -> NDArray[np.float64]:
    """Per triangle, the (2, 3) affine matrix taking destination (x, y, 1) to source (x, y); (T, 2, 3).

    Degenerate destination triangles get the identity map."""
    d = np.concatenate([dst[tris].transpose(0, 2, 1), np.ones((len(tris), 1, 3))], axis=1)
    s = src[tris].transpose(0, 2, 1)
    ok = np.abs(np.linalg.det(d)) > 1e-9
    maps = np.tile(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), (len(tris), 1, 1))
    maps[ok] = s[ok] @ np.linalg.inv(d[ok])
    return maps


def triangle_ids(dst: Points, size: int) -> NDArray[np.intp]:
    """Which triangle of `triangles()`, laid out on landmarks `dst`, covers each pixel; (size, size).

    Pixels no triangle covers get the number of triangles."""
    tris = triangles()
    ids = PILImage.new("I", (size, size), len(tris))
    draw = ImageDraw.Draw(ids)
    for n, corners in enumerate(dst[tris].reshape(len(tris), 6).tolist()):
        draw.polygon(corners, fill=n, outline=n)
    return np.asarray(ids, dtype=np.intp)


def piecewise_affine_map(src: Points, dst: Points, size: int,
                         ids: NDArray[np.intp] | None = None) -> tuple[Plane, Plane]:
    """Source pixel positions (x, y), each (size, size), that carry landmarks `src` onto `dst`.

    Each triangle of `triangles()` in the destination geometry is mapped affinely onto the same triangle in
    the source geometry; pixels no triangle covers keep their own position. `ids` is `triangle_ids(dst)`
    when already at hand.
    """
    if ids is None:
        ids = triangle_ids(dst, size)
    identity_map = [[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]
    maps = np.concatenate([_affine_maps(src, dst, triangles()), identity_map]).astype(np.float32)
    per_pixel = maps[ids]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    map_x = per_pixel[..., 0, 0] * xs + per_pixel[..., 0, 1] * ys + per_pixel[..., 0, 2]
    map_y = per_pixel[..., 1, 0] * xs + per_pixel[..., 1, 1] * ys + per_pixel[..., 1, 2]
    return map_x, map_y


def warp_piecewise_affine(image: Image, src: Points, dst: Points,
                          ids: NDArray[np.intp] | None = None) -> Image:
    """Warp `image` (H, W, C) so that its landmarks `src` land on `dst` (per-triangle affine, bilinear).

    `ids` is `triangle_ids(dst)` when already at hand (several images warped onto the same landmarks)."""
    map_x, map_y = piecewise_affine_map(src, dst, image.shape[0], ids)
    return _sample(image, map_x, map_y)


def warp_labels(labels: NDArray[np.uint8], src: Points, dst: Points,
                ids: NDArray[np.intp] | None = None) -> NDArray[np.uint8]:
    """`warp_piecewise_affine` for an (H, W) label map: nearest neighbour, so labels stay labels."""
    map_x, map_y = piecewise_affine_map(src, dst, labels.shape[0], ids)
    h, w = labels.shape
    rows = np.clip(np.rint(map_y), 0, h - 1).astype(np.intp)
    cols = np.clip(np.rint(map_x), 0, w - 1).astype(np.intp)
    return labels[rows, cols]


def warp_similarity(image: Image, angle: float, scale: float, shift: Vec, *, nearest: bool = False) -> Image:
    """Rotate (radians) and scale `image` (H, W, C) about its centre, then shift by `shift` pixels.

    Bilinear (nearest neighbour with `nearest`, for label maps), edges replicated; moves of up to a tenth of
    the image size are supported."""
    size = image.shape[0]
    c, pad = (size - 1) / 2.0, size // 10 + 2
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    # PIL samples the source at a*(x+0.5) + b*(y+0.5) + c0 with pixel centres at +0.5; fold that in
    x0 = pad + c - cos * (c + shift[0]) - sin * (c + shift[1]) + 0.5 - 0.5 * (cos + sin)
    y0 = pad + c + sin * (c + shift[0]) - cos * (c + shift[1]) + 0.5 - 0.5 * (cos - sin)
    coeffs = (cos, sin, x0, -sin, cos, y0)
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    resample = PILImage.Resampling.NEAREST if nearest else PILImage.Resampling.BILINEAR
    channels = [np.asarray(PILImage.fromarray(np.ascontiguousarray(padded[..., i]), mode="F").transform(
        (size, size), PILImage.Transform.AFFINE, coeffs, resample=resample)) for i in range(image.shape[2])]
    return np.stack(channels, axis=2).astype(np.float32)


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
