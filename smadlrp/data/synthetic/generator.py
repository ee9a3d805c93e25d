"""The default synthetic S-MAD set (generated once, reused), and the generator's public names in one place.

The set exercises the pipeline and the explanations; it says nothing about real-world MAD accuracy. The work is
done by config, plan, sources, morph, shortcut, sample, statistics and writer (files and layout: see writer).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from smadlrp.core.fileio import cache_home, encode_png
from smadlrp.data.synthetic.config import (
    CLASSES,
    CORNERS,
    MAX_IMAGE_SIZE,
    MIN_IDENTITIES,
    MIN_IMAGE_SIZE,
    MORPH_TYPES,
    SHORTCUT_KINDS,
    SPLITS,
    SynthConfig,
    config_dict,
)
from smadlrp.data.synthetic.morph import MASK_THRESHOLD, MorphParts, morph_parts
from smadlrp.data.synthetic.plan import MANIFEST_COLUMNS, PARTIAL_REGIONS, SamplePlan, plan_samples, split_identities
from smadlrp.data.synthetic.sample import Sample, bona_fide_image, bona_fide_regions, render_sample
from smadlrp.data.synthetic.shortcut import MARK_AMPLITUDE, mark_box, plant_mark, shortcut_region_box
from smadlrp.data.synthetic.sources import capture, contributor, identity
from smadlrp.data.synthetic.statistics import GLOBAL_STATISTICS, global_statistics
from smadlrp.data.synthetic.writer import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SynthSummary,
    generate_dataset,
    is_synthetic_set,
)

__all__ = [
    "CLASSES", "CORNERS", "DATA_DIR_ENV", "DEFAULT_CONFIG", "FORMAT_NAME", "FORMAT_VERSION", "GLOBAL_STATISTICS",
    "MANIFEST_COLUMNS", "MARK_AMPLITUDE", "MASK_THRESHOLD", "MAX_IMAGE_SIZE", "MIN_IDENTITIES", "MIN_IMAGE_SIZE",
    "MORPH_TYPES", "PARTIAL_REGIONS", "SHORTCUT_KINDS", "SPLITS", "MorphParts", "Sample", "SamplePlan",
    "SynthConfig", "SynthSummary", "bona_fide_image", "bona_fide_regions", "capture", "contributor",
    "default_dataset_dir", "encode_png", "ensure_default_dataset", "generate_dataset", "global_statistics",
    "identity", "is_synthetic_set", "mark_box", "morph_parts", "plan_samples", "plant_mark", "render_sample",
    "shortcut_region_box", "split_identities",
]

DATA_DIR_ENV = "SMADLRP_DATA_DIR"


def default_dataset_dir() -> Path:
    """Where the default set lives: $SMADLRP_DATA_DIR if set, else ~/.cache/smadlrp/synthetic-v2."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return cache_home() / f"synthetic-v{FORMAT_VERSION}"


def _matches(folder: Path, config: SynthConfig) -> bool:
    if not is_synthetic_set(folder):
        return False
    info = json.loads((folder / "synthetic.json").read_text(encoding="utf-8"))
    return bool(info.get("version") == FORMAT_VERSION and info.get("config") == config_dict(config))


DEFAULT_CONFIG = SynthConfig()


def ensure_default_dataset(notify: Callable[[str], None],
                           progress: Callable[[int, int], None] | None = None) -> Path:
    """The default synthetic set, generated once into `default_dataset_dir()` and reused afterwards."""
    folder = default_dataset_dir()
    config = DEFAULT_CONFIG
    if _matches(folder, config):
        return folder
    notify(f"Generating the default synthetic S-MAD data set in {folder} (once; set {DATA_DIR_ENV} to use "
           "another folder). It is synthetic: it exercises the pipeline and the explanations, "
           "not real-world MAD accuracy.")
    generate_dataset(folder, config, overwrite=True, progress=progress)
    return folder
