"""Which images compare-rules scores and the masks it scores them against: the seeded subset of a split, the
artifact masks at model-input resolution, and the patch grid's settings checked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.data.loading import SplitIndex
from smadlrp.explain.faithfulness import MASK_COVER, BoolArray, patch_grid, resize_mask

PATCH_GRID = 16  # default patch size: the input side divided by this (a 16 x 16 grid)
MASK_RESIZING = f"area average to the model input, inside where at least {MASK_COVER:g} of a pixel is covered"


def default_patch_size(input_size: int) -> int:
    """Patch side (pixels) for a PATCH_GRID x PATCH_GRID grid on a square input."""
    return max(1, input_size // PATCH_GRID)


def check_perturbation(input_size: int, patch_size: int, steps: int) -> None:
    """UsageError unless `patch_size` fits the input and `steps` does not exceed the number of patches."""
    if not 1 <= patch_size <= input_size:
        raise UsageError(f"--patch-size {patch_size}: must lie in 1..{input_size} (the model input side)")
    rows, cols = patch_grid(input_size, input_size, patch_size)
    if not 1 <= steps <= rows * cols:
        raise UsageError(f"--steps {steps}: must lie in 1..{rows * cols}, the patches of a {rows}x{cols} grid "
                         f"of {patch_size}-pixel patches")


def select_subset(labels: npt.ArrayLike, max_images: int, seed: int) -> npt.NDArray[np.int64]:
    """Sorted positions of a seeded random subset of at most `max_images` images, drawn per class in proportion to
    the class sizes (largest remainders), every class at least once when `max_images` allows."""
    y = np.asarray(labels)
    if max_images >= len(y):
        return np.arange(len(y), dtype=np.int64)
    classes, counts = np.unique(y, return_counts=True)
    exact = max_images * counts / len(y)
    quota = np.floor(exact).astype(np.int64)
    quota[np.argsort(quota - exact, kind="stable")[: max_images - int(quota.sum())]] += 1
    while max_images >= len(classes) and (quota == 0).any():
        quota[int(np.argmax(quota))] -= 1
        quota[int(np.argmin(quota))] += 1
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(y == c), size=int(q), replace=False)
             for c, q in zip(classes, quota, strict=True)]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def _read_mask(path: Path, listed_in: Path) -> npt.NDArray[np.uint8]:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L"))
    except FileNotFoundError:
        raise SmadlrpError(f"artifact mask not found: {path} (listed in {listed_in})") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise SmadlrpError(f"{path}: not a readable mask image ({str(exc).splitlines()[0][:100]})") from None


def artifact_masks(index: SplitIndex, chosen: Sequence[int], attack_index: int,
                   size: int) -> tuple[dict[int, tuple[BoolArray, str]], str | None]:
    """Position in `chosen` (indices into `index.samples`) -> ((size, size) mask, morph type) for every morph whose
    mask_path group (manifest or protocol column) names a non-empty mask at model-input resolution, and a reason
    when there is none."""
    mask_paths = index.groups.get("mask_path")
    if mask_paths is None or not any(mask_paths):
        return {}, f"{index.root} has no manifest.csv or protocol with a mask_path column"
    types = index.groups.get("morph_type", ("",) * len(index.samples))
    found: dict[int, tuple[BoolArray, str]] = {}
    for position, i in enumerate(chosen):
        if index.samples[i].label != attack_index or not mask_paths[i]:
            continue
        mask = resize_mask(_read_mask(index.root / mask_paths[i], index.groups_file or index.root), size, size)
        if mask.any():
            found[position] = (mask, types[i])
    if not found:
        return {}, f"none of the {len(chosen)} chosen images is a morph with a non-empty artifact mask"
    return found, None
