"""Image loading and data-set validation: ImageFolder-style splits or protocol files, any image mode, clear errors."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision.transforms import v2

from smadlrp.core.errors import SmadlrpError
from smadlrp.data.manifest import MANIFEST, read_manifest
from smadlrp.data.perturb import sample_rng
from smadlrp.data.protocol import (
    REQUIRED_COLUMNS,
    SPLIT_ALIASES,
    Protocol,
    ProtocolRow,
    leak_message,
    subject_leaks,
    subjects_of,
)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
SPLIT_NAMES: dict[str, tuple[str, ...]] = {"val": ("val", "validation"), "validation": ("validation", "val")}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
Warn = Callable[[str], None]


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file as 8-bit RGB: grayscale, palette, RGBA (composited on black) and 16-bit are converted."""
    img: Image.Image
    try:
        with Image.open(path) as img:
            img.load()
    except FileNotFoundError:
        raise SmadlrpError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise SmadlrpError(f"{path}: not a readable image ({str(exc).splitlines()[0][:100]})") from None
    if img.mode in {"I;16", "I;16B", "I;16L", "I", "F"}:  # 16/32-bit grayscale: rescale the used range to 8 bit
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode in {"RGBA", "LA", "PA"} or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: Path) -> list[Path]:
    """Image files below `folder`, recursively, sorted by path."""
    return sorted(p for p in folder.rglob("*") if is_image_file(p))


def find_split(root: str | Path, split: str) -> Path:
    """`root/split`, accepting `val` and `validation` for each other; SmadlrpError when absent."""
    root = Path(root)
    if not root.is_dir():
        raise SmadlrpError(f"data folder not found: {root}")
    for name in SPLIT_NAMES.get(split, (split,)):
        if (root / name).is_dir():
            return root / name
    present = sorted(p.name for p in root.iterdir() if _holds_class_folders(p))
    raise SmadlrpError(f"{root}: no {split!r} split folder (splits found: {', '.join(present) or 'none'}); "
                       f"choose one of those with --split, or add {root / split}/CLASS/ image folders")


def _holds_class_folders(folder: Path) -> bool:
    """Whether `folder` looks like a split: a subfolder holds images directly (unlike masks/, whose subfolders
    are splits again)."""
    if not folder.is_dir() or folder.name.startswith("."):
        return False
    return any(is_image_file(f) for c in folder.iterdir() if c.is_dir() for f in itertools.islice(c.iterdir(), 20))


@dataclass(frozen=True)
class Sample:
    """One image of a split: its path and class index."""

    path: Path
    label: int


@dataclass(frozen=True)
class SplitIndex:
    """The validated images of one split; `class_names` sorted as ImageFolder sorts them.

    groups: group column -> one value per sample (from a protocol file, or a folder's manifest.csv; "" when a
    sample has none).
    """

    root: Path
    split: str
    class_names: list[str]
    samples: list[Sample]
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    groups_file: Path | None = None  # the manifest or protocol file the groups come from

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)

    def counts(self) -> dict[str, int]:
        labels = self.labels
        return {name: int((labels == i).sum()) for i, name in enumerate(self.class_names)}

    def subjects(self) -> list[tuple[str, ...]]:
        """The subject ids of each sample (from the SUBJECT_COLUMNS groups; () when unknown)."""
        columns = self.groups
        return [subjects_of({c: values[i] for c, values in columns.items()}) for i in range(len(self.samples))]


def scan_split(root: str | Path, split: str, class_names: Sequence[str] | None = None,
               warn: Warn = lambda msg: warnings.warn(msg, stacklevel=2), *,
               bonafide_only: str | None = None) -> SplitIndex:
    """Index `root/split/<class>/**/image` and validate it.

    Every class folder must exist and hold at least one image. Files whose header cannot be read are skipped with
    a warning (documented policy); the pixels are decoded later, when the image is used. `bonafide_only` names
    the attack class when a split may lack it (training on bona fide images alone): its folder may then be
    missing or empty, and a single class folder is the bona fide one.
    """
    folder = find_split(root, split)
    if class_names is None:
        class_names = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if bonafide_only is not None and len(class_names) == 1:
            class_names = sorted({*class_names, bonafide_only})
        if len(class_names) < 2:
            raise SmadlrpError(f"{folder}: needs two class folders (e.g. bonafide/ and morph/), found {class_names}")
    samples: list[Sample] = []
    for label, name in enumerate(class_names):
        class_dir = folder / name
        if bonafide_only == name and not any(list_images(class_dir) if class_dir.is_dir() else ()):
            continue
        if not class_dir.is_dir():
            raise SmadlrpError(f"{folder}: class folder {name!r} is missing (every split needs every class)")
        found = 0
        paths = list_images(class_dir)
        for path, readable in zip(paths, _headers_readable(paths), strict=True):
            if readable:
                samples.append(Sample(path, label))
                found += 1
            else:
                warn(f"skipping unreadable image {path}")
        if found == 0:
            raise SmadlrpError(f"{class_dir}: no readable images (every split needs every class)")
    groups = _manifest_groups(Path(root), samples)
    return SplitIndex(Path(root), split, list(class_names), samples, groups,
                      Path(root) / MANIFEST if groups else None)


def _manifest_groups(root: Path, samples: Sequence[Sample]) -> dict[str, tuple[str, ...]]:
    """Group columns of a folder's manifest.csv for `samples` (column -> value per sample); {} without one."""
    rows = {(root / row["path"]).resolve(): row for row in read_manifest(root)}
    if not rows:
        return {}
    columns = [c for c in next(iter(rows.values())) if c not in REQUIRED_COLUMNS]
    found = [rows.get(s.path.resolve(), {}) for s in samples]
    return {c: tuple(row.get(c) or "" for row in found) for c in columns}


def _protocol_split(protocol: Protocol, split: str, class_names: Sequence[str] | None, attack_class: str,
                    warn: Warn, bonafide_only: bool = False) -> SplitIndex:
    """The rows of one protocol split as a SplitIndex: the attack label maps to `attack_class`, bona fide to
    the other class (default class names: "bonafide" and `attack_class`, sorted as ImageFolder sorts them)."""
    names = list(class_names) if class_names is not None else sorted({"bonafide", attack_class})
    if len(names) != 2 or attack_class not in names:
        raise SmadlrpError(f"a protocol file has two classes (bona fide and attack); the model's classes are "
                           f"{names} with attack class {attack_class!r}")
    attack = names.index(attack_class)
    kept: list[ProtocolRow] = []
    rows = protocol.rows_of(split)
    for row, readable in zip(rows, _headers_readable([row.path for row in rows]), strict=True):
        if readable:
            kept.append(row)
        else:
            warn(f"skipping unreadable image {row.path} ({protocol.file}, line {row.line})")
    for label, name in ((0, "bona fide"), (1, "attack"))[:1 if bonafide_only else 2]:
        if not any(row.label == label for row in kept):
            raise SmadlrpError(f"{protocol.file}: split {split!r} has no readable {name} images")
    samples = [Sample(row.path, attack if row.label else 1 - attack) for row in kept]
    groups = {c: tuple(row.groups[c] for row in kept) for c in protocol.group_columns}
    return SplitIndex(protocol.base, SPLIT_ALIASES.get(split, split), names, samples, groups, protocol.file)


@dataclass(frozen=True)
class DataSource:
    """Where a command's images come from: a folder of train/val/test split folders (`root`), or a protocol file
    (`protocol`, its paths already resolved)."""

    root: Path
    protocol: Protocol | None = None

    @property
    def name(self) -> str:
        return str(self.protocol.file if self.protocol is not None else self.root)

    def split(self, split: str, class_names: Sequence[str] | None = None, attack_class: str = "morph",
              warn: Warn = lambda msg: warnings.warn(msg, stacklevel=2), *, bonafide_only: bool = False
              ) -> SplitIndex:
        """Index and validate one split. Folder class names come from the folders unless given. With
        `bonafide_only` the split may hold no attack images."""
        if self.protocol is not None:
            return _protocol_split(self.protocol, split, class_names, attack_class, warn, bonafide_only)
        return scan_split(self.root, split, class_names, warn=warn,
                          bonafide_only=attack_class if bonafide_only else None)

    def leak_warning(self) -> str | None:
        """A warning when a subject column shows one subject in two splits (protocol rows, or the folder's
        manifest.csv), else None."""
        if self.protocol is not None:
            rows = [(row.split, row.groups) for row in self.protocol.rows]
        else:
            rows = [(SPLIT_ALIASES.get(r.get("split", ""), r.get("split", "")), r) for r in read_manifest(self.root)]
        return leak_message(subject_leaks(rows), self.name)


def _headers_readable(paths: Sequence[Path]) -> list[bool]:
    """Whether each image's header can be read, several files at a time: the check waits on storage (on a
    network file system most of all), so threads overlap the waits."""
    if len(paths) < 64:
        return [_header_readable(p) for p in paths]
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(_header_readable, paths))


def _header_readable(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.verify() if img.format == "PNG" else img.size  # noqa: B018 - header access validates
        return True
    except Exception:  # noqa: BLE001 - any decoder failure means unreadable
        return False


def resize_transform(size: int) -> v2.Compose:
    """PIL RGB image -> uint8 tensor (3, size, size), resized with antialiasing (what the model sees)."""
    return v2.Compose([v2.PILToTensor(), v2.Resize((size, size), antialias=True)])


def normalize_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """uint8 tensor (3, H, W) -> float32 scaled to [0, 1] and normalised per channel."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """PIL RGB image -> float tensor (3, size, size), resized (antialiased) and normalised."""
    return v2.Compose([*resize_transform(size).transforms, *normalize_transform(mean, std).transforms])


CACHE_LIMIT_BYTES = 2 * 1024**3  # decoded images are kept in memory when a split's pixels fit in this
Perturb = Callable[[Image.Image, np.random.Generator], Image.Image]
Prepare = Callable[[Image.Image], Image.Image]


class ImageDataset(Dataset[tuple[torch.Tensor, int, int]]):
    """Samples -> (normalised image (3, size, size) float32, label, index).

    `augment` adds a random horizontal flip (no crops or colour jitter that would erase morph cues). `perturb`
    (e.g. a `data.perturb` perturbation or augmentation) acts on each decoded image at its stored size, before
    the resize; its generator is `sample_rng(perturb_seed, index)`, the same for an image in every pass, or, when
    `perturb_seed` is None (training), seeded from torch's generator, so each pass draws anew and a seeded run
    repeats. `cache` keeps each decoded image in memory after its first use (resized to 3 * size * size bytes,
    or, with `perturb`, at its stored size), so later passes skip decoding; at most CACHE_LIMIT_BYTES are kept.
    `prepare` maps each decoded image before everything else (predict and explain --align crop the face).
    """

    def __init__(self, samples: Sequence[Sample], size: int, mean: Sequence[float], std: Sequence[float], *,
                 augment: bool = False, cache: bool = False, perturb: Perturb | None = None,
                 perturb_seed: int | None = 0, prepare: Prepare | None = None) -> None:
        self.samples = list(samples)
        self.prepare = prepare
        self.resize = resize_transform(size)
        self.normalize = normalize_transform(mean, std)
        self.augment = augment
        self.perturb, self.perturb_seed = perturb, perturb_seed
        self.cache: dict[int, torch.Tensor | Image.Image] | None = {} if cache else None
        self.cached_bytes = 0

    def __len__(self) -> int:
        return len(self.samples)

    def _remember(self, index: int, item: torch.Tensor | Image.Image, nbytes: int) -> None:
        if self.cache is not None and self.cached_bytes + nbytes <= CACHE_LIMIT_BYTES:
            self.cache[index] = item
            self.cached_bytes += nbytes

    def load(self, index: int) -> Image.Image:
        """Decode the image file as 8-bit RGB and apply `prepare` (e.g. a face alignment) when given."""
        path = self.samples[index].path
        image = load_rgb(path)
        if self.prepare is None:
            return image
        try:
            return self.prepare(image)
        except SmadlrpError as exc:
            raise SmadlrpError(f"{path}: {exc.message}", exc.exit_code) from None

    def decoded(self, index: int) -> Image.Image:
        """The image as stored, 8-bit RGB."""
        if self.cache is not None and index in self.cache:
            return self.cache[index]  # type: ignore[return-value]
        image = self.load(index)
        self._remember(index, image, 3 * image.width * image.height)
        return image

    def pixels(self, index: int) -> torch.Tensor:
        """The decoded (and perturbed), resized image (3, size, size) uint8."""
        if self.perturb is not None:
            seed = int(torch.randint(2**62, ())) if self.perturb_seed is None else self.perturb_seed
            return self.resize(self.perturb(self.decoded(index), sample_rng(seed, index)))
        if self.cache is not None and index in self.cache:
            return self.cache[index]  # type: ignore[return-value]
        image = self.resize(self.load(index))
        self._remember(index, image, image.numel())
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image = self.pixels(index)
        if self.augment and torch.rand(1).item() < 0.5:
            image = image.flip(-1)
        return self.normalize(image), self.samples[index].label, index


@dataclass(frozen=True)
class LoadFailure:
    """A SmadlrpError raised while loading an item, carried out of a DataLoader worker as it is (torch would
    re-raise it as a new exception whose message is the worker's traceback)."""

    message: str
    exit_code: int

    def error(self) -> SmadlrpError:
        return SmadlrpError(self.message, self.exit_code)


class _Reporting(Dataset[Any]):
    """`dataset`'s items, or the LoadFailure of an item whose loading raised a SmadlrpError."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except SmadlrpError as exc:
            return LoadFailure(exc.message, exc.exit_code)


def _collate(items: list[Any]) -> Any:
    """A batch as torch collates it, or the first LoadFailure among its items."""
    failure = next((item for item in items if isinstance(item, LoadFailure)), None)
    return failure if failure is not None else default_collate(items)


class Loader(DataLoader[tuple[torch.Tensor, int, int]]):
    """A DataLoader whose batches raise, in this process, the SmadlrpError an item raised (in a worker or not),
    with its own message and exit code."""

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        for batch in super().__iter__():
            if isinstance(batch, LoadFailure):
                raise batch.error()
            yield batch


def make_loader(dataset: Dataset[tuple[torch.Tensor, int, int]], batch_size: int, *, shuffle: bool = False,
                workers: int = 0, generator: torch.Generator | None = None,
                device: torch.device | None = None,
                sampler: Sampler[int] | None = None) -> Loader:
    """A DataLoader with pinned memory on CUDA and persistent workers when `workers` > 0 (`sampler`: the order,
    e.g. one process's share under torchrun, instead of `shuffle`). An image that cannot be loaded raises its
    SmadlrpError in this process, also with workers."""
    if batch_size < 1:
        raise SmadlrpError("--batch-size must be at least 1", exit_code=2)
    return Loader(_Reporting(dataset), batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                  generator=generator, pin_memory=device is not None and device.type == "cuda",
                  persistent_workers=workers > 0, sampler=sampler, collate_fn=_collate)
