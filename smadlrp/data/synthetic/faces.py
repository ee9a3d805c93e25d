"""Procedurally drawn faces in one namespace: identities, landmarks, rendering, region labels and image warps.

The work is done by arrays, people, geometry, shapes, render, labels, warp and raster; this module
re-exports their public names for code that imports `smadlrp.data.synthetic.faces`.
"""

from __future__ import annotations

from smadlrp.data.synthetic.arrays import Image, Plane, Points, Vec
from smadlrp.data.synthetic.geometry import EYES, JAW, NOSE_ROOT, border_points, face_landmarks, landmarks
from smadlrp.data.synthetic.labels import OUTLINE_HALF_WIDTH, region_labels
from smadlrp.data.synthetic.people import (
    Brows,
    Capture,
    Eyes,
    Glasses,
    Hair,
    Head,
    Identity,
    Mouth,
    Nose,
    neutral_capture,
    sample_capture,
    sample_identity,
)
from smadlrp.data.synthetic.raster import gaussian_blur, polygon_mask
from smadlrp.data.synthetic.render import render_face
from smadlrp.data.synthetic.warp import (
    delaunay,
    piecewise_affine_map,
    triangle_ids,
    triangles,
    warp_labels,
    warp_piecewise_affine,
    warp_similarity,
)

__all__ = [
    "EYES", "JAW", "NOSE_ROOT", "OUTLINE_HALF_WIDTH", "Brows", "Capture", "Eyes", "Glasses", "Hair", "Head",
    "Identity", "Image", "Mouth", "Nose", "Plane", "Points", "Vec", "border_points", "delaunay", "face_landmarks",
    "gaussian_blur", "landmarks", "neutral_capture", "piecewise_affine_map", "polygon_mask", "region_labels",
    "render_face", "sample_capture", "sample_identity", "triangle_ids", "triangles", "warp_labels",
    "warp_piecewise_affine", "warp_similarity",
]
