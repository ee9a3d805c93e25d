"""People and their captures: identity and capture parameters of drawn faces, sampled from a random stream."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from smadlrp.data.synthetic.arrays import Vec


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
