"""Writing a synthetic set: every image, mask and region map, the manifest, staged and moved into place whole.

Layout written by `generate_dataset` (paths relative to the output folder):

    {train,val,test}/{bonafide,morph}/*.png        images (ImageFolder layout)
    masks/{train,val,test}/{bonafide,morph}/*.png  binary L-mode artifact masks, same file names
    regions/{train,val,test}/{bonafide,morph}/*.png  L-mode face-region maps (ids of data.regions.REGIONS)
    manifest.csv                                   one row per image (see MANIFEST_COLUMNS)
    synthetic.json                                 the generator version, configuration and counts
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smadlrp.core.errors import SmadlrpError
from smadlrp.core.fileio import encode_png, make_staging, remove_abandoned, replace_folder, write_text_atomic
from smadlrp.core.processes import leave_if_reimported, map_in_processes
from smadlrp.data.protocol import csv_dict_writer
from smadlrp.data.regions import REGIONS_FOLDER
from smadlrp.data.synthetic.config import CLASSES, MORPH_TYPES, SPLITS, SynthConfig, config_dict
from smadlrp.data.synthetic.plan import MANIFEST_COLUMNS, SamplePlan, plan_samples
from smadlrp.data.synthetic.sample import render_sample
from smadlrp.data.synthetic.sources import contributor, from_bytes, to_bytes

FORMAT_NAME = "smadlrp-synthetic"
FORMAT_VERSION = 2
_RENDERS = ".renders"  # contributor captures shared by bona fide images and morphs while a set is written


@dataclass(frozen=True)
class SynthSummary:
    """What `generate_dataset` wrote: images per split and class, morphs per split and type, wall time."""

    out: Path
    counts: Mapping[str, Mapping[str, int]]
    morph_counts: Mapping[str, Mapping[str, int]]
    shortcut_counts: Mapping[str, int]
    seconds: float

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())


def _render_path(root: Path, person: int, number: int) -> Path:
    return root / _RENDERS / f"{person:05d}_{number:03d}.npy"


def _write_sample(job: tuple[SynthConfig, SamplePlan, str]) -> int:
    """Render and write one plan's image and mask under `root`. A bona fide capture is also kept (8-bit RGB
    and matte) for the morphs made from it, which read it back instead of drawing it again."""
    config, plan, folder = job
    root = Path(folder)
    if plan.label == "bonafide":
        render = contributor(config, *plan.captures[0])
        np.save(_render_path(root, *plan.captures[0]), to_bytes(render))
        sample = render_sample(config, plan, (render,))
    else:
        renders = tuple(from_bytes(np.load(_render_path(root, *c))) for c in plan.captures)
        sample = render_sample(config, plan, renders)
    (root / plan.path).write_bytes(encode_png(sample.image))
    (root / plan.mask_path).write_bytes(encode_png(sample.mask.astype(np.uint8) * 255))
    (root / plan.region_path).write_bytes(encode_png(sample.regions))
    return plan.index


def is_synthetic_set(folder: Path) -> bool:
    """True when `folder` holds a set written by this generator (its manifest and synthetic.json)."""
    info = folder / "synthetic.json"
    if not (folder / "manifest.csv").is_file() or not info.is_file():
        return False
    try:
        return json.loads(info.read_text(encoding="utf-8")).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SmadlrpError(f"{out} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise SmadlrpError(f"{out} is not empty; choose an empty folder, or replace the synthetic set there with "
                           "--overwrite (overwrite=True in Python)")
    if not is_synthetic_set(out):
        raise SmadlrpError(f"{out} is not a smadlrp synthetic data set (no manifest.csv/synthetic.json); "
                           "refusing to replace it")


def _folders() -> list[str]:
    """The folders of a set being written, below its staging folder: images, masks, region maps, captures."""
    below = [f"{split}/{label}" for split in SPLITS for label in CLASSES]
    return [f"{top}{path}" for path in below for top in ("", "masks/", f"{REGIONS_FOLDER}/")] + [_RENDERS]


def _write_manifest(folder: Path, plans: tuple[SamplePlan, ...], config: SynthConfig,
                    counts: Mapping[str, Mapping[str, int]],
                    morph_counts: Mapping[str, Mapping[str, int]]) -> None:
    text = io.StringIO()
    writer = csv_dict_writer(text, MANIFEST_COLUMNS)
    writer.writeheader()
    writer.writerows(plan.manifest_row() for plan in plans)
    write_text_atomic(folder / "manifest.csv", text.getvalue())
    info = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": config_dict(config),
            "counts": counts, "morph_counts": morph_counts,
            "shortcut_counts": _shortcut_counts(plans),
            "note": "synthetic faces: exercises the pipeline and the explanations, "
                    "not real-world MAD accuracy"}
    write_text_atomic(folder / "synthetic.json", json.dumps(info, indent=2, sort_keys=True) + "\n")


def _shortcut_counts(plans: tuple[SamplePlan, ...]) -> dict[str, int]:
    """Morphs that carry the shortcut, per split."""
    return {s: sum(p.split == s and bool(p.shortcut) for p in plans) for s in SPLITS}


def _count(plans: tuple[SamplePlan, ...]) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    counts = {s: {c: 0 for c in CLASSES} for s in SPLITS}
    morph_counts = {s: {t: 0 for t in MORPH_TYPES} for s in SPLITS}
    for plan in plans:
        counts[plan.split][plan.label] += 1
        if plan.label == "morph":
            morph_counts[plan.split][plan.morph_type] += 1
    return counts, morph_counts


def _can_spawn() -> bool:
    """Whether worker processes can be started: a spawned worker re-imports the main script, which fails
    when it was read from standard input."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    return main is None or Path(main).is_file()


def _render_all(plans: tuple[SamplePlan, ...], config: SynthConfig, staging: Path, workers: int,
                progress: Callable[[int, int], None] | None) -> None:
    """Bona fide images first (they leave the captures the morphs are made from), then the morphs."""
    phases = [[(config, p, str(staging)) for p in plans if p.label == label] for label in CLASSES]
    total, done = len(plans), 0
    for jobs in phases:
        results = map_in_processes(_write_sample, jobs, workers, "generate_dataset") if workers > 1 else \
            map(_write_sample, jobs)
        for _ in results:
            done += 1
            if progress is not None:
                progress(done, total)
    shutil.rmtree(staging / _RENDERS)


def generate_dataset(out: Path, config: SynthConfig, *, overwrite: bool = False,
                     progress: Callable[[int, int], None] | None = None,
                     workers: int | None = None) -> SynthSummary:
    """Write the synthetic set described by `config` into `out` and return what was written.

    Files are written into a hidden sibling folder that is renamed onto `out` at the end, so an interrupted
    run leaves no half set. `out` must be absent or empty, or (with `overwrite`) a previous synthetic set.
    `progress(done, total)` is called as images are written; `workers` processes render in parallel
    (default: one per CPU, at most 4, for sets of 64 images or more); the files do not depend on it.
    """
    leave_if_reimported()
    start = time.perf_counter()
    out = Path(out).expanduser()
    _check_target(out, overwrite)
    remove_abandoned(out)
    plans = plan_samples(config)
    if workers is None:
        workers = min(4, os.cpu_count() or 1) if len(plans) >= 64 else 1
    if not _can_spawn():
        workers = 1
    staging = make_staging(out, _folders())
    try:
        counts, morph_counts = _count(plans)
        _render_all(plans, config, staging, workers, progress)
        _write_manifest(staging, plans, config, counts, morph_counts)
        _check_target(out, overwrite)  # again: the target may have changed while rendering
        replace_folder(out, staging, "the generated set")
    except OSError as exc:  # a full disk or a folder made read-only while rendering
        shutil.rmtree(staging, ignore_errors=True)
        raise SmadlrpError(f"cannot write the synthetic set into {out}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    return SynthSummary(out=out, counts=counts, morph_counts=morph_counts,
                        shortcut_counts=_shortcut_counts(plans), seconds=seconds)
