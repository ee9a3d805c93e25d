"""Array types of the drawn faces: images, planes, points and vectors.

Faces are drawn in a face frame (x right, y down, unit about half a face width, eye line at y = 0) and
mapped to pixels by a similarity transform. Images are float32 RGB arrays of shape (H, W, 3) in [0, 1];
points are float64 arrays of shape (N, 2) holding pixel (x, y) with pixel centres at integers.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

Image = NDArray[np.float32]
Plane = NDArray[np.float32]
Points = NDArray[np.float64]
Vec = NDArray[np.float64]
