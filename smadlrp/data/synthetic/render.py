"""Drawing a face: one capture of an identity as an RGB picture and its subject matte."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image as PILImage

from smadlrp.data.synthetic.arrays import Image, Plane, Vec
from smadlrp.data.synthetic.geometry import face_grid, pose
from smadlrp.data.synthetic.people import Capture, Head, Identity
from smadlrp.data.synthetic.shapes import brow_distance, cover, face_field, hair_cover, mouth_line


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
        return cover(d, self.aa)

    def paint(self, alpha: Plane, color: Image | Vec) -> None:
        """Composite `color` (RGB or (H, W, 3)) over the image in place with opacity `alpha` (H, W)."""
        image = self.image
        image += alpha[..., None] * (np.asarray(color, dtype=np.float32) - image)


def _noise(seed: int, cells: int, extent: float, capture: Capture, size: int) -> Plane:
    """A smooth random field (unit variance) fixed in face coordinates, (size, size).

    A `cells` x `cells` grid of normal samples spans face coordinates -extent..extent and is resampled
    bilinearly through the capture's pose (zero outside the grid)."""
    grid = np.random.default_rng(seed).standard_normal((cells, cells)).astype(np.float32)
    (cx, cy), k, angle = pose(capture, size)
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


def _hair_layers(identity: Identity, capture: Capture, u: Plane, v: Plane,
                 aa: float) -> tuple[Plane, Plane, Image]:
    """Coverage of the hair volume behind the face, of the fringe over the forehead, and the hair colour."""
    head, hair = identity.head, identity.hair
    back, fringe = hair_cover(identity, u, v, aa)
    crown_y = head.centre_y - head.upper - 0.1
    psi = np.arctan2(v - crown_y, u - hair.crown_x)
    wobble = _noise(hair.texture_seed, 10, 2.5, capture, u.shape[0])
    strands = np.sin(hair.strand_freq * psi + 2.0 * wobble)
    color = hair.color[None, None, :] * (1 + hair.strand_contrast * strands + 0.08 * wobble)[..., None]
    return back, fringe, color.astype(np.float32)


def _draw_brows(canvas: _Canvas, identity: Identity, capture: Capture) -> None:
    brows = identity.brows
    top = -(brows.height + abs(capture.brow_raise) + abs(brows.tilt) + brows.arch + brows.thickness)
    for sign in (-1.0, 1.0):
        c = canvas.window(min(sign * brows.inner, sign * brows.outer) - 0.05,
                          max(sign * brows.inner, sign * brows.outer) + 0.05, top - 0.05, 0.05)
        d = brow_distance(brows, capture, c.u, c.v, sign)
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
    half, lift, gap = mouth_line(mouth, capture)
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
    u, v, k = face_grid(capture, size)
    head = identity.head
    whole = (slice(0, size), slice(0, size))
    scene = _Canvas(_background(capture, size), u, v, 1.0 / k, pose(capture, size), whole)
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
    field = face_field(head, face.u, face.v)
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
