"""A face recogniser for vulnerability and look-alike pairing: dlib's ResNet embeddings (the `align` extra).

The model is dlib's public-domain face-recognition ResNet (`dlib_face_recognition_resnet_model_v1.dat`, shipped
by `face_recognition_models`): 128-D embeddings of a face found by dlib's detector and aligned by its 5-point
landmarks. Two faces are compared by the Euclidean distance of their embeddings (lower = more alike); dlib
documents 0.6 as its decision threshold (99.38 % on LFW).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from PIL import Image

from smadlrp.data.align import AlignPolicy, FaceAligner, model_file

RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
DLIB_THRESHOLD = 0.6  # Euclidean distance at which dlib calls two faces one person
Embedding = npt.NDArray[np.float64]


class FaceRecogniser:
    """Embeds the largest face of an image with dlib's ResNet. Deterministic (no jitter)."""

    name = "dlib-resnet-v1"
    comparison = "distance"  # scores are distances: a pair matches when its distance is at most the threshold
    threshold = DLIB_THRESHOLD

    def __init__(self, upsample: int = 1) -> None:
        self.aligner = FaceAligner(AlignPolicy(upsample=upsample))
        self.model = self.aligner.dlib.face_recognition_model_v1(str(model_file(RECOGNITION_MODEL)))

    def describe(self) -> str:
        return (f"{RECOGNITION_MODEL} (dlib ResNet, public domain, from face_recognition_models), Euclidean "
                f"distance, dlib threshold {DLIB_THRESHOLD}")

    def embed(self, image: Image.Image) -> Embedding | None:
        """The (128,) embedding of the largest face of `image`, or None when no face is found."""
        pixels = np.asarray(image.convert("RGB"))
        found = self.aligner.detect(pixels)
        if found is None:
            return None
        _, shape = found
        return np.asarray(self.model.compute_face_descriptor(pixels, shape), dtype=np.float64)


def distance(a: Embedding, b: Embedding) -> float:
    """Euclidean distance of two embeddings (dlib's comparison score)."""
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)))
