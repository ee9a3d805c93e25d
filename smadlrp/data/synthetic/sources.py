"""The people of a configuration: its identities, their captures, and each capture as an 8-bit photo."""

from __future__ import annotations

import functools

import numpy as np
from numpy.typing import NDArray

from smadlrp.data.synthetic.arrays import Image
from smadlrp.data.synthetic.config import STREAM_CAPTURE, STREAM_IDENTITY, SynthConfig, stream
from smadlrp.data.synthetic.people import Capture, Identity, sample_capture, sample_identity
from smadlrp.data.synthetic.render import render_face


@functools.lru_cache(maxsize=4096)
def identity(config: SynthConfig, number: int) -> Identity:
    """The identity with this number (the same in every split and image of a configuration)."""
    return sample_identity(stream(config, STREAM_IDENTITY, number))


def capture(config: SynthConfig, person: int, number: int) -> Capture:
    """Capture `number` of identity `person` (pose, expression, lighting, background, clothes)."""
    return sample_capture(stream(config, STREAM_CAPTURE, person, number))


def contributor(config: SynthConfig, person: int, number: int) -> Image:
    """Capture `number` of identity `person` as an 8-bit photo would hold it: (H, W, 4) float32, RGB and the
    subject matte, each quantised to steps of 1/255."""
    shot = capture(config, person, number)
    image, matte = render_face(identity(config, person), shot, config.image_size)
    return from_bytes(to_bytes(np.dstack([image, matte])))


def to_bytes(values: Image) -> NDArray[np.uint8]:
    """Values in [0, 1] as 8-bit steps (0..255), same shape."""
    return np.clip(np.round(values * 255), 0, 255).astype(np.uint8)


def from_bytes(pixels: NDArray[np.uint8]) -> Image:
    """8-bit steps back to float32 values in [0, 1], same shape."""
    return pixels.astype(np.float32) / np.float32(255)
