"""Implicit feature shapes in the face frame: outlines, signed distances and coverages (drawing and labels)."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from smadlrp.data.synthetic.arrays import Plane
from smadlrp.data.synthetic.people import Brows, Capture, Hair, Head, Identity, Mouth


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


def mouth_line(mouth: Mouth, capture: Capture) -> tuple[float, float, float]:
    """Mouth half-width, corner lift and opening height for a capture's expression."""
    smile = capture.smile
    return mouth.half_width * (1 + 0.12 * smile), mouth.curve + 0.05 * smile, 0.07 * capture.mouth_open


def cover(d: NDArray[np.float32] | NDArray[np.float64], aa: float) -> Plane:
    """Anti-aliased coverage in [0, 1] of a shape with signed distance `d` (< 0 inside), `aa` = 1 pixel."""
    return np.clip(0.5 - d / aa, 0.0, 1.0).astype(np.float32)


def hair_cover(identity: Identity, u: Plane, v: Plane, aa: float) -> tuple[Plane, Plane]:
    """Coverage of the hair volume behind the face and of the fringe over the forehead."""
    head, hair = identity.head, identity.hair
    dy = v - head.centre_y
    angles = np.linspace(-math.pi, math.pi, 721)  # the outline is smooth: tabulate it every half degree
    top = np.hypot(u, dy) - np.interp(np.arctan2(dy, u), angles, _hair_radius(head, hair, angles))
    left, right = _hair_radius(head, hair, np.array([-math.pi, 0.0]))
    side_radius = np.where(u < 0, left, right)
    sides = np.maximum(np.abs(u) - side_radius, dy - hair.length - 0.04 * np.sin(23.0 * u))
    back = cover(np.where(dy < 0, top, sides), aa)
    amp, freq, phase = hair.line_wave
    line = hair.line_y + hair.line_curve * u**2 + hair.line_slope * u + amp * np.sin(freq * u + phase)
    return back, cover(v - line, aa)


def face_field(head: Head, u: Plane, v: Plane) -> Plane:
    """Implicit outline value: < 0 inside the face, 0 on the outline (approximately face units)."""
    dy = v - head.centre_y
    lower = np.abs(u / head.width) ** head.jaw_power + np.abs(dy / head.lower) ** head.jaw_power
    upper = np.hypot(u / head.width, dy / head.upper)
    return (np.where(dy > 0, lower ** (1.0 / head.jaw_power), upper) - 1.0).astype(np.float32)


def brow_distance(brows: Brows, capture: Capture, u: Plane, v: Plane, sign: float) -> Plane:
    """Approximate signed distance (face units) to the brow on side `sign` (-1: image left)."""
    span = brows.outer - brows.inner
    t = (sign * u - brows.inner) / span
    half = 0.5 * brows.thickness * (1 - brows.taper * np.clip(t, 0, 1))
    d = np.maximum(np.abs(v - _brow_y(brows, capture, t)) - half, np.maximum(-t, t - 1) * span)
    return d.astype(np.float32)
