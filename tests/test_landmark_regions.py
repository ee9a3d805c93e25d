"""Face-region maps of real faces from 68 landmarks: every region where the landmarks say it is."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import hopper_photo
from PIL import Image

from smadlrp.data.landmark_regions import region_map
from smadlrp.data.regions import REGION_ID


@pytest.mark.dlib
def test_regions_of_a_real_face_lie_on_its_landmarks() -> None:
    import dlib  # type: ignore[import-not-found]

    from smadlrp.data.align import model_file

    pixels = np.asarray(Image.open(hopper_photo()).convert("RGB"))
    box = dlib.get_frontal_face_detector()(pixels, 1)[0]
    shape = dlib.shape_predictor(str(model_file("shape_predictor_68_face_landmarks.dat")))(pixels, box)
    points = np.array([(shape.part(i).x, shape.part(i).y) for i in range(68)], dtype=np.float64)
    ids = region_map(points, pixels.shape[0], pixels.shape[1])

    def at(xy: np.ndarray) -> int:
        return int(ids[round(xy[1]), round(xy[0])])

    assert at(points[36:42].mean(0)) == REGION_ID["left-eye"]  # the subject's right eye, on the image's left
    assert at(points[42:48].mean(0)) == REGION_ID["right-eye"]
    assert at(points[30]) == REGION_ID["nose"] and at(points[19]) == REGION_ID["brows"]
    assert at(points[48:60].mean(0)) == REGION_ID["mouth"]
    assert at((points[3] + points[30]) / 2) == REGION_ID["face-skin"]
    assert ids[0, 0] == ids[-1, -1] == REGION_ID["background"]
    skin = (ids != REGION_ID["background"]).mean()
    assert 0.1 < skin < 0.5  # the face, not the photograph
