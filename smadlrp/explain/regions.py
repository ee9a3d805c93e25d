"""Where relevance goes over a whole split: per face region, per class and group, and mean maps.

One relevance pass (batched, on the device) gives every image's channel-summed map; everything else here is
arithmetic on those maps and the images' region maps (smadlrp.data.regions). No printing, no plotting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.data.loading import SplitIndex
from smadlrp.data.regions import REGIONS, read_region_map, region_map_path, resize_region_map
from smadlrp.detector.checkpoint import CheckpointMeta
from smadlrp.explain.run import image_batches, to_uint8
from smadlrp.lrp import Contrast, Explainer

FloatArray = npt.NDArray[np.float64]
REGION_PATH_COLUMN = "region_path"
NO_GROUP = "none"  # the group of a class's images without a value, when others of the class have one


@dataclass(frozen=True)
class RegionInputs:
    """The images of a split to analyse, with their class index, group value ("" for none) and region map
    file."""

    paths: list[Path]
    labels: npt.NDArray[np.int64]
    groups: list[str]
    maps: list[Path]


def choose(n: int, limit: int | None) -> list[int]:
    """Positions of at most `limit` of `n` items, evenly spread over the (class-sorted) list."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise UsageError(f"--max-images must be at least 1, got {limit}")
    return sorted({int(i) for i in np.linspace(0, n - 1, limit).round()})


def region_inputs(index: SplitIndex, *, by: str | None, regions_folder: Path | None,
                  max_images: int | None, attack_index: int) -> RegionInputs:
    """The split's images (at most `max_images`), their groups from column `by` of the manifest or protocol,
    and their region maps: below `regions_folder` when given, else the `region_path` column."""
    picked = choose(len(index.samples), max_images)
    columns = index.groups
    source = str(index.groups_file) if index.groups_file is not None else f"{index.root} (no manifest.csv)"
    if by is not None and by not in columns:
        raise UsageError(f"--by {by}: no such column in {source} (columns: {', '.join(columns) or 'none'})")
    groups = [columns[by][i] if by is not None else "" for i in picked]
    labels = index.labels[picked]
    if by is not None and not any(groups[i] for i in range(len(picked)) if labels[i] == attack_index):
        raise SmadlrpError(f"--by {by}: no morph of split {index.split!r} has a {by} value "
                           f"({int((labels == attack_index).sum())} morphs among the {len(picked)} images)")
    paths = [index.samples[i].path for i in picked]
    if regions_folder is not None:
        maps = [region_map_path(regions_folder, index.root, p) for p in paths]
    elif REGION_PATH_COLUMN in columns:
        maps = [index.root / columns[REGION_PATH_COLUMN][i] for i in picked]
    else:
        raise SmadlrpError(f"no region maps for {source}: give --regions FOLDER (the PNG-label format of "
                           "docs/regions.md) or use a synthetic set, whose maps are in its regions/ folder")
    return RegionInputs(paths, labels, groups, maps)


def load_region_ids(inputs: RegionInputs, size: int) -> npt.NDArray[np.uint8]:
    """Every image's region ids at the model's input size, (N, size, size) uint8; SmadlrpError naming the first
    map that is missing, unreadable, not an id map or of another size than its image."""
    ids = np.empty((len(inputs.paths), size, size), dtype=np.uint8)
    for n, (image, region_map) in enumerate(zip(inputs.paths, inputs.maps, strict=True)):
        with Image.open(image) as img:
            image_size = img.size
        ids[n] = resize_region_map(read_region_map(region_map, image_size), size)
    return ids


@dataclass(frozen=True)
class RelevanceMaps:
    """A split's channel-summed relevance maps (N, H, W) float32, its input pixels as the model saw them
    (N, H, W, 3) uint8, and the model's P(attack) per image (N,)."""

    maps: npt.NDArray[np.float32]
    pixels: npt.NDArray[np.uint8]
    p_attack: FloatArray


def relevance_maps(paths: Sequence[Path], meta: CheckpointMeta, explainer: Explainer,
                   target: int | str | Contrast | None, *, batch_size: int, workers: int, device: torch.device,
                   on_batch: Callable[[int], None] = lambda n: None) -> RelevanceMaps:
    """One batched relevance pass over `paths` on `device`."""
    size = meta.input_size
    maps = np.empty((len(paths), size, size), dtype=np.float32)
    pixels = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    p_attack = np.empty(len(paths), dtype=np.float64)
    for x, positions in image_batches(list(paths), meta, batch_size, workers, device):
        result = explainer.explain(x, target)
        maps[positions] = result.relevance.sum(dim=1).float().cpu().numpy()
        pixels[positions] = to_uint8(x, meta.mean, meta.std)
        p_attack[positions] = torch.softmax(result.logits.double(), dim=1)[:, meta.attack_index].cpu().numpy()
        on_batch(len(positions))
    return RelevanceMaps(maps, pixels, p_attack)


@dataclass(frozen=True)
class RegionSums:
    """Per image and region (N, R): positive relevance, absolute relevance, pixel count."""

    positive: FloatArray
    absolute: FloatArray
    area: FloatArray


def region_sums(maps: npt.NDArray[np.float32], ids: npt.NDArray[np.uint8]) -> RegionSums:
    """Sum each (H, W) map's positive and absolute relevance, and count pixels, inside each region."""
    n, regions = len(maps), len(REGIONS)
    flat_ids = torch.from_numpy(ids.reshape(n, -1).astype(np.int64))
    values = torch.from_numpy(maps.reshape(n, -1)).double()

    def per_region(v: torch.Tensor) -> FloatArray:
        return torch.zeros(n, regions, dtype=torch.float64).scatter_add_(1, flat_ids, v).numpy()

    return RegionSums(per_region(values.clamp(min=0)), per_region(values.abs()), per_region(torch.ones_like(values)))


def _shares(values: FloatArray) -> tuple[FloatArray, int]:
    """Mean over images of each image's shares (rows that sum to 0 are left out) and the images used."""
    totals = values.sum(axis=1)
    used = totals > 0
    if not used.any():
        return np.full(values.shape[1], np.nan), 0
    return (values[used] / totals[used, None]).mean(axis=0), int(used.sum())


@dataclass(frozen=True)
class RegionRow:
    """One row of the region table: a class, or a class and group; shares per region (REGIONS order), each the
    mean over the row's images of that image's share. `area` is the share of pixels (what a uniform map would
    give); `images` counts the row's images, `used` those with positive relevance at all."""

    class_name: str
    group: str
    images: int
    used: int
    positive: FloatArray
    absolute: FloatArray
    area: FloatArray

    @property
    def name(self) -> str:
        return f"{self.class_name} {self.group}" if self.group else self.class_name

    def as_dict(self) -> dict[str, object]:
        return {"class": self.class_name, "group": self.group or None, "images": self.images, "used": self.used,
                **{kind: dict(zip(REGIONS, getattr(self, kind).tolist(), strict=True))
                   for kind in ("positive", "absolute", "area")}}


def row_keys(labels: npt.NDArray[np.int64], groups: Sequence[str],
             class_names: Sequence[str]) -> list[tuple[str, str, npt.NDArray[np.bool_]]]:
    """(class, group, which images) for each class, then each class and group value it holds. In a class where
    some images have a value and others have none, those others are the group NO_GROUP."""
    keys = []
    values = np.array(groups, dtype=object)
    for label, name in enumerate(class_names):
        members = labels == label
        if members.any():
            keys.append((name, "", members))
        found = {g for g, m in zip(groups, members, strict=True) if m}
        for group in sorted(found - {""}) + ([NO_GROUP] if "" in found and len(found) > 1 else []):
            keys.append((name, group, members & (values == (group if group != NO_GROUP else ""))))
    return keys


def region_table(sums: RegionSums, labels: npt.NDArray[np.int64], groups: Sequence[str],
                 class_names: Sequence[str]) -> list[RegionRow]:
    """The region shares of each class, and of each class and group."""
    rows = []
    for name, group, members in row_keys(labels, groups, class_names):
        positive, used = _shares(sums.positive[members])
        absolute, _ = _shares(sums.absolute[members])
        area, _ = _shares(sums.area[members])
        rows.append(RegionRow(name, group, int(members.sum()), used, positive, absolute, area))
    return rows


def normalised(maps: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Each (H, W) map divided by its total absolute relevance (all-zero maps stay zero), so every image counts
    once in a mean."""
    totals = np.abs(maps).reshape(len(maps), -1).sum(axis=1)
    return (maps / np.where(totals > 0, totals, 1.0)[:, None, None]).astype(np.float32)


@dataclass(frozen=True)
class MeanMap:
    """The mean input (H, W, 3) uint8 and mean normalised relevance map (H, W) of a class or class and group."""

    class_name: str
    group: str
    images: int
    mean_input: npt.NDArray[np.uint8]
    mean_map: npt.NDArray[np.float32]

    @property
    def name(self) -> str:
        return f"{self.class_name} {self.group}" if self.group else self.class_name


def mean_maps(maps: npt.NDArray[np.float32], pixels: npt.NDArray[np.uint8], labels: npt.NDArray[np.int64],
              groups: Sequence[str], class_names: Sequence[str]) -> list[MeanMap]:
    """Mean input and mean normalised relevance per class and per class and group (`row_keys` order)."""
    unit = normalised(maps)
    return [MeanMap(name, group, int(members.sum()),
                    np.rint(pixels[members].mean(axis=0)).astype(np.uint8), unit[members].mean(axis=0))
            for name, group, members in row_keys(labels, groups, class_names)]


def difference_map(means: Sequence[MeanMap], attack_class: str) -> npt.NDArray[np.float32] | None:
    """Mean attack-class map minus mean map of the other class (None unless both classes are present)."""
    whole = {m.class_name: m.mean_map for m in means if not m.group}
    others = [name for name in whole if name != attack_class]
    if attack_class not in whole or not others:
        return None
    return whole[attack_class] - whole[others[0]]
