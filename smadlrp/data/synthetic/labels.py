"""Face-region labels of a drawn face: the region id of every pixel, from the geometry the face is drawn with."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from smadlrp.data.regions import REGION_ID
from smadlrp.data.synthetic.arrays import Plane
from smadlrp.data.synthetic.geometry import face_grid
from smadlrp.data.synthetic.people import Capture, Identity
from smadlrp.data.synthetic.shapes import brow_distance, face_field, hair_cover, mouth_line

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
    u, v, k = face_grid(capture, size)
    head, eyes, nose, mouth = identity.head, identity.eyes, identity.nose, identity.mouth
    labels = np.full((size, size), REGION_ID["background"], dtype=np.uint8)
    back, fringe = hair_cover(identity, u, v, 1.0 / k)
    labels[back > 0.5] = REGION_ID["hair"]
    collar = head.centre_y + head.lower + 0.3
    neck = (np.abs(u) < head.neck_width) & (v > head.centre_y + 0.2) & (v < collar + 0.12 * u**2)
    for sign in (-1.0, 1.0):
        x, rx, ry = sign * (head.width + 0.02), 0.55 * head.ear_size, head.ear_size
        neck |= _box(u, v, x - rx, x + rx, head.ear_y - ry, head.ear_y + ry)
    field = face_field(head, u, v)
    inside = field < 0
    labels[neck | inside] = REGION_ID["face-skin"]
    nose_v1 = nose.tip_y + nose.nostril_dy + nose.nostril_ry + 0.05
    nose_half = max(nose.half_width + nose.nostril_rx, nose.half_width + nose.wing) + 0.03
    labels[inside & _box(u, v, -nose_half, nose_half, eyes.y + 0.05, nose_v1)] = REGION_ID["nose"]
    half, lift, gap = mouth_line(mouth, capture)
    lips = _box(u, v, -half - 0.05, half + 0.05, mouth.y - abs(lift) - mouth.upper - 0.05,
                mouth.y + abs(lift) + gap + mouth.lower + 0.05)
    labels[inside & lips] = REGION_ID["mouth"]
    for sign, name in ((-1.0, "left-eye"), (1.0, "right-eye")):
        labels[inside & (brow_distance(identity.brows, capture, u, v, sign) < 0.03)] = REGION_ID["brows"]
        cx, reach = sign * eyes.x, eyes.half_width * 1.2
        eye = _box(u, v, cx - reach, cx + reach, eyes.y - 0.05 - eyes.upper - eyes.crease - abs(eyes.tilt),
                   eyes.y + 0.05 + eyes.lower + abs(eyes.tilt))
        labels[inside & eye] = REGION_ID[name]
    labels[inside & (fringe > 0.5)] = REGION_ID["hair"]
    labels[np.abs(field) < OUTLINE_HALF_WIDTH] = REGION_ID["face-outline"]
    return labels
