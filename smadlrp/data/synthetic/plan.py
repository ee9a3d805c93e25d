"""Planning a synthetic set: the subject-disjoint split and every image's plan (who, which captures, what morph)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from smadlrp.data.regions import REGIONS_FOLDER
from smadlrp.data.synthetic.config import SPLITS, STREAM_PLAN, STREAM_SHORTCUT, SynthConfig, stream

PARTIAL_REGIONS: tuple[str, ...] = ("eyes", "nose", "mouth", "hair")
MANIFEST_COLUMNS: tuple[str, ...] = ("path", "label", "split", "morph_type", "morph_region", "identity_a",
                                     "identity_b", "blend_factor", "shortcut", "mask_path", "region_path")
_SPLIT_SHARE = (0.8, 0.1, 0.1)


@dataclass(frozen=True)
class SamplePlan:
    """One image of the set: where it goes and what it shows.

    A bona fide image shows capture `capture_a` of `identity_a`; a morph is made from that capture and capture
    `capture_b` of `identity_b` (the same captures the set holds as bona fide images)."""

    index: int
    split: str
    label: str
    identity_a: int
    capture_a: int = 0
    identity_b: int | None = None
    capture_b: int = 0
    morph_type: str = ""
    region: str = ""
    blend: float = 0.0
    shortcut: str = ""

    @property
    def filename(self) -> str:
        if self.label == "bonafide":
            return f"id{self.identity_a:04d}_{self.capture_a:02d}.png"
        kind = f"partial-{self.region}" if self.morph_type == "partial" else self.morph_type
        return f"{kind}_{self.index:05d}_id{self.identity_a:04d}_id{self.identity_b:04d}.png"

    @property
    def captures(self) -> tuple[tuple[int, int], ...]:
        """(identity, capture) of each capture the image is made from: one for bona fide, two for a morph."""
        if self.identity_b is None:
            return ((self.identity_a, self.capture_a),)
        return ((self.identity_a, self.capture_a), (self.identity_b, self.capture_b))

    @property
    def path(self) -> str:
        return f"{self.split}/{self.label}/{self.filename}"

    @property
    def mask_path(self) -> str:
        return f"masks/{self.path}"

    @property
    def region_path(self) -> str:
        return f"{REGIONS_FOLDER}/{self.path}"

    def manifest_row(self) -> dict[str, str]:
        morph = self.label == "morph"
        return {
            "path": self.path, "label": self.label, "split": self.split, "morph_type": self.morph_type,
            "morph_region": self.region, "identity_a": str(self.identity_a),
            "identity_b": str(self.identity_b) if morph else "",
            "blend_factor": f"{self.blend:.3f}" if morph else "", "shortcut": self.shortcut,
            "mask_path": self.mask_path, "region_path": self.region_path,
        }


def split_identities(config: SynthConfig) -> dict[str, list[int]]:
    """Subject-disjoint split of identity numbers 0..identities-1 (about 80/10/10, at least two per split)."""
    n = config.identities
    n_val = max(2, round(n * _SPLIT_SHARE[1]))
    n_test = max(2, round(n * _SPLIT_SHARE[2]))
    order = [int(i) for i in stream(config, STREAM_PLAN, 0).permutation(n)]
    parts = {"train": order[: n - n_val - n_test], "val": order[n - n_val - n_test: n - n_test],
             "test": order[n - n_test:]}
    return {split: sorted(ids) for split, ids in parts.items()}


def draw_blend(rng: np.random.Generator) -> float:
    """A blend factor around 0.5 (normal, sd 0.06, clipped to 0.38..0.62, three decimals)."""
    return round(float(np.clip(rng.normal(0.5, 0.06), 0.38, 0.62)), 3)


def plan_samples(config: SynthConfig) -> tuple[SamplePlan, ...]:
    """Every image of the set in writing order: per split, its bona fide captures then as many morphs."""
    rng = stream(config, STREAM_PLAN, 1)
    probabilities = config.morph_probabilities()
    types, weights = list(probabilities), list(probabilities.values())
    plans: list[SamplePlan] = []
    for split, ids in split_identities(config).items():
        for person in ids:
            for number in range(config.captures_per_identity):
                plans.append(SamplePlan(len(plans), split, "bonafide", person, number))
        for _ in range(len(ids) * config.captures_per_identity):
            a, b = (int(i) for i in rng.choice(ids, size=2, replace=False))
            capture_a, capture_b = (int(c) for c in rng.integers(config.captures_per_identity, size=2))
            morph_type = types[int(rng.choice(len(types), p=weights))]
            region = {"complete": "subject", "splicing": "inner-face"}.get(morph_type, "")
            if morph_type == "partial":
                region = PARTIAL_REGIONS[int(rng.integers(len(PARTIAL_REGIONS)))]
            blend = draw_blend(rng)
            plans.append(SamplePlan(len(plans), split, "morph", a, capture_a, b, capture_b,
                                    morph_type=morph_type, region=region, blend=blend))
    return _plant_shortcuts(config, plans)


def _plant_shortcuts(config: SynthConfig, plans: list[SamplePlan]) -> tuple[SamplePlan, ...]:
    """Mark `shortcut_fraction` of the morphs of each shortcut split (drawn from a stream of their own, so
    the rest of the set is the same with or without a shortcut)."""
    if config.shortcut:
        for split in config.shortcut_splits:
            morphs = [p.index for p in plans if p.split == split and p.label == "morph"]
            rng = stream(config, STREAM_SHORTCUT, SPLITS.index(split))
            for index in rng.choice(morphs, size=round(config.shortcut_fraction * len(morphs)), replace=False):
                plans[int(index)] = replace(plans[int(index)], shortcut=config.shortcut)
    return tuple(plans)
