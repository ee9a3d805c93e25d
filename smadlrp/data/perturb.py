"""Image perturbations as named, parameterised, deterministic transforms: `jpeg:Q`, `resize:F`, `blur:SIGMA`,
`noise:STD`, `gamma:G` and `print-scan`, built from PIL and torchvision.

Every perturbation maps an 8-bit RGB PIL image to one of the same size and mode. Random ones (`noise`,
`print-scan`) draw from the `numpy.random.Generator` they are given, so one seed gives one output. A spec is
`NAME:VALUE` (`print-scan` takes none); an augmentation spec is a comma-separated list of `NAME:LOW-HIGH` (or
`NAME:VALUE`) items whose values are drawn uniformly per sample.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from smadlrp.core.errors import UsageError

Rng = np.random.Generator


def jpeg(image: Image.Image, quality: float) -> Image.Image:
    """PIL's own JPEG round trip at `quality` (1..95, PIL's default chroma subsampling)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(round(quality)))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def resize(image: Image.Image, factor: float) -> Image.Image:
    """Down by `factor` (0 < F <= 1) and back to the original size, bicubic both ways (PIL antialiases down)."""
    if factor >= 1.0:
        return image.copy()
    small = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    return image.resize(small, Image.Resampling.BICUBIC).resize(image.size, Image.Resampling.BICUBIC)


def blur(image: Image.Image, sigma: float) -> Image.Image:
    """Gaussian blur of standard deviation `sigma` pixels (kernel 2 * ceil(3 sigma) + 1; 0 = unchanged)."""
    if sigma <= 0:
        return image.copy()
    size = 2 * math.ceil(3 * sigma) + 1
    return F.gaussian_blur(image, [size, size], [sigma, sigma])  # type: ignore[no-any-return]


def _torch_generator(rng: Rng) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**62)))


def noise(image: Image.Image, std: float, rng: Rng) -> Image.Image:
    """Additive Gaussian noise of `std` (fraction of the full 0..1 range), clipped and rounded to 8 bit."""
    pixels = F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)
    noisy = pixels + std * torch.randn(pixels.shape, generator=_torch_generator(rng))
    return F.to_pil_image(F.to_dtype(noisy.clamp(0, 1), torch.uint8, scale=True))


def gamma(image: Image.Image, value: float) -> Image.Image:
    """Gamma curve out = in ** G on intensities in [0, 1] (G > 1 darkens, G < 1 brightens)."""
    return F.adjust_gamma(image, value)  # type: ignore[no-any-return]


# ---- print-scan ---------------------------------------------------------------------------------------------
# Ferrara, Franco & Maltoni, "Face morphing detection in the presence of printing/scanning and heterogeneous image
# sources", IET Biometrics 10(3), 2021 (arXiv:1901.08811), with the parameters of the Revelio framework's
# PrintScan step (Borghi et al.). Their stages: a point-spread blur whose sigma grows with the image diagonal,
# noise along edges, the printer/scanner tone curve, noise in dark areas, a second blur. A scanner stores JPEG,
# so a JPEG round trip ends the chain here.
PS_SIGMA_AT = ((195.6, 0.8), (1799.3, 4.0))  # (image diagonal in px, PSF sigma in px), linear between, >= 0.8
PS_TONE = (8.3, 35.0, 0.6, 20.0)  # out = alpha * max(in - beta_x, 0) ** gamma + beta_k, on 0..255
PS_DARK_NOISE = (32.0, 20.0)  # dark-area noise: at most 20 grey levels, a logistic cut-off at level 32
PS_EDGE_NOISE = 1.0  # edge noise std per unit of local contrast (|image - its sigma-1 blur|)
PS_COLOUR_CAST = 0.03  # per-channel gain drawn uniformly in 1 +- this (ink and scanner colour balance)
PS_JPEG_QUALITY = 85


def print_scan_sigma(image: Image.Image) -> float:
    """The PSF sigma (px) for this image's diagonal."""
    (d1, s1), (d2, s2) = PS_SIGMA_AT
    diagonal = math.hypot(image.width, image.height)
    return max(0.8, s1 + (s2 - s1) * (diagonal - d1) / (d2 - d1))


def _tone_lut() -> list[int]:
    alpha, beta_x, power, beta_k = PS_TONE
    return [int(min(255, round(alpha * max(v - beta_x, 0.0) ** power + beta_k))) for v in range(256)] * 3


def _dark_lut() -> list[int]:
    cutoff, peak = PS_DARK_NOISE
    return [int(round(peak / (1.0 + math.exp(v - cutoff)))) for v in range(256)] * 3


def print_scan(image: Image.Image, rng: Rng) -> Image.Image:
    """Simulated print and scan: PSF blur, edge noise, colour cast and tone curve, dark-area (paper) noise,
    scanner blur, JPEG at quality 85."""
    sigma = print_scan_sigma(image)
    generator = _torch_generator(rng)
    image = blur(image, sigma)
    pixels = F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)
    edges = (pixels - F.to_dtype(F.pil_to_tensor(blur(image, 1.0)), torch.float32, scale=True)).abs()
    pixels = pixels + PS_EDGE_NOISE * edges * torch.randn(pixels.shape, generator=generator)
    gains = 1.0 + PS_COLOUR_CAST * (2 * torch.rand(3, 1, 1, generator=generator) - 1)
    image = F.to_pil_image(F.to_dtype((pixels * gains).clamp(0, 1), torch.uint8, scale=True))
    image = image.point(_tone_lut())
    dark = F.pil_to_tensor(image.point(_dark_lut())).float() / 255.0
    pixels = F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)
    pixels = pixels + dark * torch.rand(pixels.shape, generator=generator)
    image = F.to_pil_image(F.to_dtype(pixels.clamp(0, 1), torch.uint8, scale=True))
    return jpeg(blur(image, sigma), PS_JPEG_QUALITY)


# ---- the registry -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kind:
    """One named perturbation: its parameter's meaning and valid range, and the function applying it."""

    name: str
    parameter: str  # "" for none
    low: float
    high: float
    apply: Callable[[Image.Image, float, Rng], Image.Image]
    integer: bool = False


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("jpeg", "quality", 1, 95, lambda im, v, rng: jpeg(im, v), integer=True),
    Kind("resize", "factor", 0.01, 1, lambda im, v, rng: resize(im, v)),
    Kind("blur", "sigma (px)", 0, 20, lambda im, v, rng: blur(im, v)),
    Kind("noise", "std (fraction of full range)", 0, 1, noise),
    Kind("gamma", "gamma", 0.1, 10, lambda im, v, rng: gamma(im, v)),
    Kind("print-scan", "", 0, 0, lambda im, v, rng: print_scan(im, rng)),
)}
SPEC_HELP = "jpeg:Q (1-95), resize:F (0-1], blur:SIGMA (px), noise:STD (0-1), gamma:G, print-scan"
_NUMBER = r"(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


@dataclass(frozen=True)
class Perturbation:
    """One condition: a kind with its value (None for print-scan)."""

    kind: Kind
    value: float | None

    @property
    def spec(self) -> str:
        if self.value is None:
            return self.kind.name
        return f"{self.kind.name}:{int(self.value) if self.kind.integer else f'{self.value:g}'}"

    def __call__(self, image: Image.Image, rng: Rng) -> Image.Image:
        return self.kind.apply(image, 0.0 if self.value is None else self.value, rng)


def _kind(name: str, text: str, option: str) -> Kind:
    if name not in KINDS:
        raise UsageError(f"{option} {text!r}: unknown perturbation {name!r}; use {SPEC_HELP}")
    return KINDS[name]


def _value(kind: Kind, number: str, text: str, option: str) -> float:
    value = float(number)
    if not kind.low <= value <= kind.high:
        raise UsageError(f"{option} {text!r}: {kind.name}'s {kind.parameter} lies in [{kind.low:g}, {kind.high:g}]")
    return value


def parse_perturbation(text: str, option: str = "--perturb") -> Perturbation:
    """`jpeg:30` -> Perturbation; UsageError with one line for anything else."""
    name, sep, number = text.strip().partition(":")
    kind = _kind(name, text, option)
    if not kind.parameter:
        if sep:
            raise UsageError(f"{option} {text!r}: {kind.name} takes no value")
        return Perturbation(kind, None)
    if not re.fullmatch(_NUMBER, number):
        raise UsageError(f"{option} {text!r}: expected {kind.name}:NUMBER ({kind.parameter}); use {SPEC_HELP}")
    return Perturbation(kind, _value(kind, number, text, option))


@dataclass(frozen=True)
class RandomPerturbation:
    """One augmentation item: a kind whose value is drawn uniformly from [low, high] per sample."""

    kind: Kind
    low: float
    high: float

    @property
    def spec(self) -> str:
        if not self.kind.parameter:
            return self.kind.name
        return f"{self.kind.name}:{self.low:g}" + ("" if self.low == self.high else f"-{self.high:g}")

    def draw(self, rng: Rng) -> Perturbation:
        if not self.kind.parameter:
            return Perturbation(self.kind, None)
        value = float(rng.uniform(self.low, self.high))
        return Perturbation(self.kind, float(round(value)) if self.kind.integer else value)


@dataclass(frozen=True)
class Augmentation:
    """A chain of randomly parameterised perturbations, applied in order to each sample."""

    items: tuple[RandomPerturbation, ...]

    @property
    def spec(self) -> str:
        return ",".join(item.spec for item in self.items)

    def __call__(self, image: Image.Image, rng: Rng) -> Image.Image:
        for item in self.items:
            image = item.draw(rng)(image, rng)
        return image


def parse_augmentation(text: str, option: str = "--augment") -> Augmentation:
    """`jpeg:50-95,resize:0.5-1,blur:0-1.5` -> Augmentation; UsageError with one line for a bad item."""
    items: list[RandomPerturbation] = []
    for part in (p.strip() for p in text.split(",")):
        name, sep, values = part.partition(":")
        kind = _kind(name, part, option)
        if not kind.parameter:
            if sep:
                raise UsageError(f"{option} {part!r}: {kind.name} takes no value")
            items.append(RandomPerturbation(kind, 0.0, 0.0))
            continue
        match = re.fullmatch(rf"({_NUMBER})(?:-({_NUMBER}))?", values)
        if match is None:
            raise UsageError(f"{option} {part!r}: expected {kind.name}:LOW-HIGH or {kind.name}:VALUE "
                             f"({kind.parameter})")
        low = _value(kind, match.group(1), part, option)
        high = _value(kind, match.group(2) or match.group(1), part, option)
        if high < low:
            raise UsageError(f"{option} {part!r}: the range's low end exceeds its high end")
        items.append(RandomPerturbation(kind, low, high))
    return Augmentation(tuple(items))


def sample_rng(seed: int, index: int, *stream: int) -> Rng:
    """The generator for sample `index` under `seed`: independent of the order samples are visited in."""
    return np.random.default_rng([seed, index, *stream])


def parse_perturbations(texts: Sequence[str]) -> list[Perturbation]:
    """Several `--perturb` values, refusing duplicates."""
    parsed = [parse_perturbation(t) for t in texts]
    specs = [p.spec for p in parsed]
    if len(set(specs)) != len(specs):
        raise UsageError(f"--perturb: a condition is given twice ({', '.join(specs)})")
    return parsed
