"""The face frame: the pose that maps face units to pixels, and the landmarks of a capture in pixels."""

from __future__ import annotations

import math

import numpy as np

from smadlrp.data.synthetic.arrays import Plane, Points, Vec
from smadlrp.data.synthetic.people import Capture, Head, Identity

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


def pose(capture: Capture, size: int) -> tuple[Vec, float, float]:
    """Face-frame origin in pixels, pixels per face unit, rotation angle."""
    centre = np.array([0.5 * (size - 1), _EYE_ROW * (size - 1)]) + capture.shift * size
    return centre, _FACE_SCALE * size * capture.scale, capture.angle


def _to_pixels(points: Points, capture: Capture, size: int) -> Points:
    centre, k, angle = pose(capture, size)
    c, s = math.cos(angle), math.sin(angle)
    x, y = points[:, 0], points[:, 1]
    return np.column_stack([centre[0] + k * (c * x - s * y), centre[1] + k * (s * x + c * y)])


def face_grid(capture: Capture, size: int) -> tuple[Plane, Plane, float]:
    """Face-frame coordinates (u, v) of every pixel, each (H, W), and pixels per face unit."""
    centre, k, angle = pose(capture, size)
    c, s = math.cos(angle), math.sin(angle)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = (xs - centre[0]) / k, (ys - centre[1]) / k
    return (c * dx + s * dy).astype(np.float32), (-s * dx + c * dy).astype(np.float32), k


def _jaw_point(head: Head, phi: float) -> tuple[float, float]:
    """Point of the lower face outline at parameter angle `phi` in [0, pi] (0 = right temple)."""
    c, s = math.cos(phi), math.sin(phi)
    e = 2.0 / head.jaw_power
    return head.width * math.copysign(abs(c) ** e, c), head.centre_y + head.lower * abs(s) ** e


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
