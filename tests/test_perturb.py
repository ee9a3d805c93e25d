"""Perturbations: determinism for a seed, equality with PIL's own operations, parsing errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from smadlrp.core.errors import UsageError
from smadlrp.data.perturb import (
    KINDS,
    parse_augmentation,
    parse_perturbation,
    parse_perturbations,
    print_scan_sigma,
    sample_rng,
)

SPECS = ["jpeg:30", "resize:0.5", "blur:1.5", "noise:0.05", "gamma:1.5", "print-scan"]


@pytest.fixture(scope="module")
def face() -> Image.Image:
    """A smooth 48 px colour image with an edge (enough structure for every perturbation to act)."""
    y, x = np.mgrid[0:48, 0:48]
    pixels = np.stack([x * 5, y * 5, 128 + 60 * np.sin(x / 4.0)], axis=-1)
    pixels[16:32, 16:32] = (30, 200, 90)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_every_kind_is_covered() -> None:
    assert {s.partition(":")[0] for s in SPECS} == set(KINDS)


@pytest.mark.parametrize("spec", SPECS)
def test_deterministic_for_a_seed_and_changes_the_image(face: Image.Image, spec: str) -> None:
    perturbation = parse_perturbation(spec)
    first = perturbation(face, sample_rng(7, 3))
    again = perturbation(face, sample_rng(7, 3))
    assert first.size == face.size and first.mode == "RGB"
    assert np.array_equal(_array(first), _array(again))
    assert not np.array_equal(_array(first), _array(face))


@pytest.mark.parametrize("spec", ["noise:0.05", "print-scan"])
def test_random_ones_differ_between_seeds(face: Image.Image, spec: str) -> None:
    perturbation = parse_perturbation(spec)
    first, second = (_array(perturbation(face, sample_rng(seed, 0))) for seed in (0, 1))
    assert not np.array_equal(first, second)


def test_jpeg_equals_pil_round_trip(face: Image.Image) -> None:
    buffer = io.BytesIO()
    face.save(buffer, format="JPEG", quality=30)
    expected = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    assert np.array_equal(_array(parse_perturbation("jpeg:30")(face, sample_rng(0, 0))), _array(expected))


def test_resize_is_a_pil_round_trip(face: Image.Image) -> None:
    small = face.resize((24, 24), Image.Resampling.BICUBIC)
    expected = small.resize((48, 48), Image.Resampling.BICUBIC)
    assert np.array_equal(_array(parse_perturbation("resize:0.5")(face, sample_rng(0, 0))), _array(expected))


def test_gamma_and_noise_values(face: Image.Image) -> None:
    out = _array(parse_perturbation("gamma:2")(face, sample_rng(0, 0)))
    expected = np.floor(255 * (_array(face) / 255.0) ** 2 + 0.5)  # torchvision's PIL gamma table
    assert np.abs(out - expected).max() <= 1
    flat = Image.new("RGB", (64, 64), (128, 128, 128))
    noisy = _array(parse_perturbation("noise:0.04")(flat, sample_rng(0, 0))) / 255.0
    assert noisy.std() == pytest.approx(0.04, rel=0.05)


def test_print_scan_blur_follows_the_image_diagonal() -> None:
    assert print_scan_sigma(Image.new("RGB", (64, 64))) == 0.8
    assert print_scan_sigma(Image.new("RGB", (1000, 1000))) == pytest.approx(
        0.8 + 3.2 * (1414.21 - 195.6) / (1799.3 - 195.6), abs=1e-3)


def test_augmentation_draws_in_range_and_is_seeded(face: Image.Image) -> None:
    augmentation = parse_augmentation("jpeg:50-95,resize:0.5-1,blur:0-1.5")
    assert augmentation.spec == "jpeg:50-95,resize:0.5-1,blur:0-1.5"
    drawn = [item.draw(sample_rng(0, i)) for i in range(50) for item in augmentation.items]
    qualities = [p.value for p in drawn if p.kind.name == "jpeg"]
    assert all(50 <= q <= 95 and q == int(q) for q in qualities if q is not None) and len(set(qualities)) > 5
    assert np.array_equal(_array(augmentation(face, sample_rng(4, 2))), _array(augmentation(face, sample_rng(4, 2))))


@pytest.mark.parametrize(("text", "message"), [
    ("jpg:30", "unknown perturbation 'jpg'"),
    ("jpeg:abc", "expected jpeg:NUMBER"),
    ("jpeg:0", "lies in [1, 95]"),
    ("resize:1.5", "lies in [0.01, 1]"),
    ("print-scan:3", "takes no value"),
    ("blur", "expected blur:NUMBER"),
])
def test_bad_specs_are_one_line(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        parse_perturbation(text)
    assert "\n" not in info.value.message


def test_bad_augmentation_and_duplicates() -> None:
    with pytest.raises(UsageError, match="low end exceeds"):
        parse_augmentation("jpeg:95-50")
    with pytest.raises(UsageError, match="expected blur:LOW-HIGH"):
        parse_augmentation("blur:0..1")
    with pytest.raises(UsageError, match="given twice"):
        parse_perturbations(["jpeg:30", "jpeg:30.0"])
