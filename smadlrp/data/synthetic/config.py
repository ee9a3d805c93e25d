"""What a synthetic set is made of: its configuration, checked on creation, and the random streams it draws from."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from smadlrp.core.errors import UsageError

MORPH_TYPES: tuple[str, ...] = ("complete", "splicing", "partial")
SPLITS: tuple[str, ...] = ("train", "val", "test")
CLASSES: tuple[str, ...] = ("bonafide", "morph")
SHORTCUT_KINDS: tuple[str, ...] = ("corner-mark",)
CORNERS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
MIN_IDENTITIES = 6
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 1024
# independent random streams: changing what one draws leaves the others (and the rest of the set) as they were
STREAM_PLAN, STREAM_IDENTITY, STREAM_CAPTURE, STREAM_POST, STREAM_ALIGN, STREAM_SHORTCUT = 0, 1, 2, 3, 4, 5


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. The same configuration always gives byte-identical files.

    `type_weights` are the relative frequencies of complete, splicing and partial morphs (MORPH_TYPES order);
    types missing from `morph_types` are skipped. `jpeg_probability` is the share of images (both classes)
    re-encoded as JPEG before being stored as PNG. `shortcut` (a SHORTCUT_KINDS value, or "" for none) plants
    a shortcut in `shortcut_fraction` of the morphs of each split in `shortcut_splits`; a `corner-mark` is a
    faint fixed checkerboard near the `shortcut_corner` of the picture (see `mark_box`).
    """

    identities: int = 260
    image_size: int = 128
    seed: int = 0
    morph_types: tuple[str, ...] = MORPH_TYPES
    captures_per_identity: int = 6
    type_weights: tuple[float, float, float] = (0.45, 0.35, 0.20)
    jpeg_probability: float = 0.35
    shortcut: str = ""
    shortcut_fraction: float = 0.5
    shortcut_splits: tuple[str, ...] = ("train",)
    shortcut_corner: str = "top-left"

    def __post_init__(self) -> None:
        if self.identities < MIN_IDENTITIES:
            raise UsageError(f"identities must be at least {MIN_IDENTITIES} (two per split), "
                             f"got {self.identities}")
        if not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            raise UsageError(f"image size must be {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels, "
                             f"got {self.image_size}")
        if self.seed < 0:
            raise UsageError(f"seed must be zero or positive, got {self.seed}")
        if self.captures_per_identity < 1:
            raise UsageError(f"captures per identity must be at least 1, got {self.captures_per_identity}")
        unknown = [t for t in self.morph_types if t not in MORPH_TYPES]
        if unknown or not self.morph_types or len(set(self.morph_types)) != len(self.morph_types):
            raise UsageError(f"morph types must be distinct values of {', '.join(MORPH_TYPES)}; "
                             f"got {', '.join(self.morph_types) or 'none'}")
        if len(self.type_weights) != len(MORPH_TYPES) or min(self.type_weights) < 0 or \
                sum(self._weights()) <= 0:
            raise UsageError("type weights must be three non-negative numbers, "
                             "positive for a chosen morph type")
        if not 0.0 <= self.jpeg_probability <= 1.0:
            raise UsageError(f"JPEG probability must be between 0 and 1, got {self.jpeg_probability}")
        if self.shortcut not in ("", *SHORTCUT_KINDS):
            raise UsageError(f"unknown shortcut {self.shortcut!r}; choose one of: {', '.join(SHORTCUT_KINDS)}")
        if not 0.0 <= self.shortcut_fraction <= 1.0:
            raise UsageError(f"shortcut fraction must be between 0 and 1, got {self.shortcut_fraction}")
        bad = [s for s in self.shortcut_splits if s not in SPLITS]
        if bad or not self.shortcut_splits or len(set(self.shortcut_splits)) != len(self.shortcut_splits):
            raise UsageError(f"shortcut splits must be distinct values of {', '.join(SPLITS)}; "
                             f"got {', '.join(self.shortcut_splits) or 'none'}")
        if self.shortcut_corner not in CORNERS:
            raise UsageError(f"unknown corner {self.shortcut_corner!r}; choose one of: {', '.join(CORNERS)}")

    def _weights(self) -> list[float]:
        return [w for t, w in zip(MORPH_TYPES, self.type_weights, strict=True) if t in self.morph_types]

    def morph_probabilities(self) -> dict[str, float]:
        """Probability of each chosen morph type."""
        chosen = [t for t in MORPH_TYPES if t in self.morph_types]
        weights = self._weights()
        return {t: w / sum(weights) for t, w in zip(chosen, weights, strict=True)}


def stream(config: SynthConfig, *key: int) -> np.random.Generator:
    """The random generator of one stream (STREAM_* and its own keys) of a configuration."""
    return np.random.default_rng([config.seed, *key])


def config_dict(config: SynthConfig) -> dict[str, object]:
    """The configuration as JSON values (tuples as lists), as synthetic.json records it."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
