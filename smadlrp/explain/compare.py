"""The work behind `smadlrp compare-rules`: run every rule and three baselines on a seeded subset of a split and
collect localisation (against artifact masks), region-perturbation and timing numbers. No printing here.

Every method gives a map (B, H, W) at model-input resolution for the target class (the attack class unless
asked otherwise): LRP rules their relevance summed over channels; the baselines `gradient` (sensitivity, the
per-pixel Euclidean norm over channels of the target logit's gradient, as Samek et al. 2017 use it),
`gradient*input` (the gradient times the normalised input, summed over channels) and `random` (i.i.d. uniform
values, seeded per image).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from smadlrp.core.distributed import Ranks, current
from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.data.loading import DataSource, ImageDataset, SplitIndex, make_loader
from smadlrp.data.protocol import csv_writer
from smadlrp.detector.checkpoint import CheckpointMeta
from smadlrp.explain.faithfulness import (
    MASK_COVER,
    BoolArray,
    FloatArray,
    aopc,
    mass_accuracy,
    patch_grid,
    perturbation_curve,
    pointing_game,
    rank_accuracy,
    resize_mask,
)
from smadlrp.lrp import Contrast, Explainer, resolve_target

RANDOM = "random"
BASELINES: tuple[str, ...] = ("gradient", "gradient*input", RANDOM)
SCORE = "target logit"
REPLACEMENT = "per-image channel mean"
MASK_RESIZING = f"area average to the model input, inside where at least {MASK_COVER:g} of a pixel is covered"
PATCH_GRID = 16  # default patch size: the input side divided by this (a 16 x 16 grid)
SCORE_BATCH_FACTOR = 4  # perturbed images are scored in batches of this many times --batch-size
MapFunction = Callable[[Tensor, Tensor, Sequence[int]], Tensor]  # (x, target, subset positions) -> (B, H, W)


@dataclass(frozen=True)
class Localisation:
    """Mean localisation metrics over `n_images` morphs with a non-empty mask (fractions in [0, 1]).
    Mass accuracy leaves out the `n_without_positive` maps that hold no positive relevance."""

    n_images: int
    mass_accuracy: float | None
    rank_accuracy: float | None
    pointing_game: float | None
    n_without_positive: int


@dataclass(frozen=True)
class MethodResult:
    """One rule or baseline: relevance time, AOPC (in target-logit units), its difference to the random order,
    the mean perturbation curve (mean f(x_0) - f(x_k), k = 0..steps) and localisation overall and per type."""

    name: str
    kind: str  # "rule" or "baseline"
    ms_per_image: float
    aopc: float
    aopc_vs_random: float
    curve: list[float]
    localisation: Localisation | None
    per_type: dict[str, Localisation] = field(default_factory=dict)


@dataclass(frozen=True)
class Comparison:
    """Everything `compare-rules` reports."""

    data: str
    split: str
    target: str
    n_images: int
    class_counts: dict[str, int]
    patch_size: int
    steps: int
    methods: list[MethodResult]
    localisation_note: str | None  # why localisation is not available, or None
    images: list[str]  # the chosen images, in the order they were processed
    score: str = SCORE
    replacement: str = REPLACEMENT
    mask_resizing: str = MASK_RESIZING

    def method(self, name: str) -> MethodResult:
        return next(m for m in self.methods if m.name == name)

    @property
    def morph_types(self) -> list[str]:
        """The morph types with localised images, in first-seen order."""
        return list(dict.fromkeys(t for m in self.methods for t in m.per_type))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Collected:
    """Per-method values gathered batch by batch: curve rows for the images at `rows`, localisation values for
    the masked images at `located` (positions in the chosen subset)."""

    seconds: float = 0.0
    rows: list[int] = field(default_factory=list)
    located: list[int] = field(default_factory=list)
    curves: list[FloatArray] = field(default_factory=list)
    mass: list[float] = field(default_factory=list)
    rank: list[float] = field(default_factory=list)
    point: list[float] = field(default_factory=list)
    types: list[str] = field(default_factory=list)


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _input_gradient(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """(B, C, H, W) gradient of each image's target logit with respect to the input."""
    with torch.inference_mode(False), torch.enable_grad():
        leaf = x.detach().clone().requires_grad_(True)
        logits = model(leaf)
        (grad,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), leaf)
    return grad


def baseline_maps(model: nn.Module, seed: int) -> dict[str, MapFunction]:
    """The three baselines as map functions."""

    def gradient(x: Tensor, target: Tensor, positions: Sequence[int]) -> Tensor:
        return _input_gradient(model, x, target).norm(dim=1)

    def gradient_input(x: Tensor, target: Tensor, positions: Sequence[int]) -> Tensor:
        return (_input_gradient(model, x, target) * x).sum(dim=1)

    def random(x: Tensor, target: Tensor, positions: Sequence[int]) -> Tensor:
        shape = x.shape[2:]
        maps = np.stack([np.random.default_rng([seed, p]).random(shape, dtype=np.float32) for p in positions])
        return torch.from_numpy(maps).to(x.device)

    return {"gradient": gradient, "gradient*input": gradient_input, RANDOM: random}


def rule_maps(explainers: Mapping[str, Explainer], contrast: bool = False) -> dict[str, MapFunction]:
    """Each explainer as a map function: its relevance summed over channels (with `contrast`, of the target's
    logit minus the other's)."""

    def bind(explainer: Explainer) -> MapFunction:
        return lambda x, target, positions: explainer.explain(
            x, Contrast(target) if contrast else target).relevance.sum(dim=1)

    return {name: bind(explainer) for name, explainer in explainers.items()}


class LogitDifference(nn.Module):
    """A two-class model's logits minus their swap, (B, 2): column t holds z_t - z_other, the log-odds of class t;
    what a contrastive comparison scores, and differentiates for its gradient baselines."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        return logits - logits.flip(1)  # type: ignore[no-any-return]


def compare_methods(model: nn.Module, meta: CheckpointMeta, explainers: Mapping[str, Explainer], data: DataSource, *,
                    split: str = "test", max_images: int = 200, batch_size: int = 32, patch_size: int | None = None,
                    steps: int = 50, seed: int = 0, target: int | str | Contrast | None = None, workers: int = 0,
                    device: torch.device | None = None, warn: Callable[[str], None] = lambda message: None,
                    on_start: Callable[[int, int], None] = lambda share, n: None,
                    on_batch: Callable[[int], None] = lambda n: None, ranks: Ranks | None = None) -> Comparison:
    """Compare `explainers` and the baselines on up to `max_images` images of one split of `data` (seeded subset).

    `target`: the class (index or name) explained and scored for every image; None: the attack class; a
    `Contrast`: its logit minus the other's is explained, scored (AOPC in logit-difference units) and
    differentiated by the baselines.
    `on_start(share, n)` gets this process's and the total number of chosen images, `on_batch(n)` the size of
    each finished batch. Under torchrun (`ranks`, default: the current ones) each rank takes a share of whole
    batches and the per-image values are gathered in image order, so every average equals one process's.
    """
    ranks = ranks or current()
    device = device or next(model.parameters()).device
    size = meta.input_size
    patch = default_patch_size(size) if patch_size is None else patch_size
    check_perturbation(size, patch, steps)
    if seed < 0:
        raise UsageError(f"--seed {seed}: must be zero or positive")
    index = data.split(split, meta.class_names, meta.attack_class, warn=warn)
    chosen = select_subset(index.labels, max_images, seed)
    samples = [index.samples[i] for i in chosen]
    share = ranks.shard(len(samples), batch_size)
    on_start(len(share), len(samples))
    masks, note = artifact_masks(index, chosen.tolist(), meta.attack_index, size)
    contrast = isinstance(target, Contrast)
    if contrast and len(meta.class_names) != 2:
        raise UsageError(f"--target contrast explains z_attack - z_other of a two-class detector; this one has "
                         f"{len(meta.class_names)} classes")
    scored = LogitDifference(model) if contrast else model
    methods = {**rule_maps(explainers, contrast), **baseline_maps(scored, seed)}
    collected = {name: _Collected() for name in methods}
    chosen_class = target.target if isinstance(target, Contrast) else target
    if not (chosen_class is None or isinstance(chosen_class, (int, str))):
        raise UsageError("compare-rules explains one class, by index or name, for every image")
    wanted = meta.attack_class if chosen_class is None else chosen_class
    dataset = ImageDataset(samples, size, meta.mean, meta.std)
    with ranks.shared_failure():
        _run_batches(scored, methods, collected, Subset(dataset, share), wanted, meta, masks, patch, steps,
                     batch_size, workers, device, on_batch)
    if ranks.distributed:
        collected = _merge(ranks.gather(collected))
    results = _results(collected, explainers, len(samples))
    counts = {name: int((index.labels[chosen] == i).sum()) for i, name in enumerate(meta.class_names)}
    target_name = wanted if isinstance(wanted, str) else meta.class_names[wanted]
    if contrast:
        target_name += f" - {meta.class_names[1 - meta.class_names.index(target_name)]}"
    return Comparison(data=data.name, split=split, target=target_name, n_images=len(samples), class_counts=counts,
                      patch_size=patch, steps=steps, methods=results, localisation_note=note,
                      images=[str(s.path) for s in samples])


def _run_batches(model: nn.Module, methods: Mapping[str, MapFunction], collected: Mapping[str, _Collected],
                 dataset: Dataset[tuple[Tensor, int, int]], wanted: int | str, meta: CheckpointMeta,
                 masks: Mapping[int, tuple[BoolArray, str]], patch: int, steps: int, batch_size: int, workers: int,
                 device: torch.device, on_batch: Callable[[int], None]) -> None:
    """Every method on every batch of `dataset`, values into `collected`."""
    warm = False
    for x, _, positions in make_loader(dataset, batch_size, workers=workers, device=device):
        x = x.to(device)
        with torch.no_grad():
            target_index = resolve_target(model(x), wanted, meta.class_names)
        if not warm:  # first use prepares modified weights and kernels: keep it out of the timings
            for function in methods.values():
                function(x[:1], target_index[:1], positions[:1].tolist())
            warm = True
        for name, function in methods.items():
            _run_method(model, function, x, target_index, positions.tolist(), masks, patch, steps,
                        SCORE_BATCH_FACTOR * batch_size, collected[name])
        on_batch(len(positions))


def _merge(parts: Sequence[Mapping[str, _Collected]]) -> dict[str, _Collected]:
    """Every rank's values of each method as one `_Collected` in image order, as one process collects them;
    the seconds are added (time per image stays the compute time of one image)."""
    merged = {}
    for name in parts[0]:
        each = [part[name] for part in parts]
        rows = np.argsort([r for c in each for r in c.rows], kind="stable")
        located = np.argsort([r for c in each for r in c.located], kind="stable")
        curves = np.concatenate([curve for c in each for curve in c.curves])

        def pick(values: list[Any], order: npt.NDArray[np.int64] = located) -> list[Any]:
            return [values[i] for i in order]

        merged[name] = _Collected(
            seconds=sum(c.seconds for c in each), rows=pick([r for c in each for r in c.rows], rows),
            located=pick([r for c in each for r in c.located]), curves=[curves[rows]],
            mass=pick([v for c in each for v in c.mass]), rank=pick([v for c in each for v in c.rank]),
            point=pick([v for c in each for v in c.point]), types=pick([v for c in each for v in c.types]))
    return merged


def _run_method(model: nn.Module, function: MapFunction, x: Tensor, target: Tensor, positions: list[int],
                masks: Mapping[int, tuple[BoolArray, str]], patch: int, steps: int, chunk: int,
                into: _Collected) -> None:
    """Time one method's maps for a batch, then score their localisation and perturbation curves into `into`."""
    _sync(x.device)
    start = time.perf_counter()
    maps = function(x, target, positions).detach()
    _sync(x.device)
    into.seconds += time.perf_counter() - start
    rows = [row for row, position in enumerate(positions) if position in masks]
    into.rows += positions
    into.located += [positions[row] for row in rows]
    if rows:
        chosen = maps[rows].double().cpu().numpy()
        truth = np.stack([masks[positions[row]][0] for row in rows])
        into.mass += mass_accuracy(chosen, truth).tolist()
        into.rank += rank_accuracy(chosen, truth).tolist()
        into.point += pointing_game(chosen, truth).tolist()
        into.types += [masks[positions[row]][1] for row in rows]
    with torch.no_grad():
        curves = perturbation_curve(model, x, target, maps.float(), patch, steps, chunk)
    into.curves.append(curves.double().cpu().numpy())


def _localisation(mass: FloatArray, rank: FloatArray, point: FloatArray) -> Localisation:
    def mean(values: FloatArray) -> float | None:
        finite = values[np.isfinite(values)]
        return float(finite.mean()) if finite.size else None

    return Localisation(len(mass), mean(mass), mean(rank), mean(point), int(np.isnan(mass).sum()))


def _results(collected: Mapping[str, _Collected], explainers: Mapping[str, Explainer],
             n_images: int) -> list[MethodResult]:
    per_image = {name: np.concatenate(c.curves) for name, c in collected.items()}
    random_aopc = float(aopc(per_image[RANDOM]).mean())
    results = []
    for name, c in collected.items():
        curves = per_image[name]
        area = float(aopc(curves).mean())
        mass, rank, point = (np.asarray(v, dtype=np.float64) for v in (c.mass, c.rank, c.point))
        types = np.asarray(c.types, dtype=object)
        per_type = {t: _localisation(mass[types == t], rank[types == t], point[types == t])
                    for t in dict.fromkeys(c.types) if t}
        results.append(MethodResult(
            name=name, kind="rule" if name in explainers else "baseline",
            ms_per_image=1000.0 * c.seconds / n_images, aopc=area, aopc_vs_random=area - random_aopc,
            curve=(curves[:, :1] - curves).mean(axis=0).tolist(),
            localisation=_localisation(mass, rank, point) if c.mass else None, per_type=per_type))
    return results


CSV_METRICS: tuple[str, ...] = ("mass_accuracy", "rank_accuracy", "pointing_game", "n_images")


def comparison_csv(comparison: Comparison) -> str:
    """One row per method: timing, AOPC, localisation overall and per morph type (empty cells: not available)."""
    types = comparison.morph_types
    header = ["method", "kind", "ms_per_image", "aopc", "aopc_vs_random", *CSV_METRICS,
              *(f"{t}.{metric}" for t in types for metric in CSV_METRICS)]
    buffer = io.StringIO()
    writer = csv_writer(buffer)
    writer.writerow(header)
    for m in comparison.methods:
        cells: list[object] = [m.name, m.kind, f"{m.ms_per_image:.4f}", f"{m.aopc:.6f}", f"{m.aopc_vs_random:.6f}",
                               *_csv_cells(m.localisation)]
        for t in types:
            cells += _csv_cells(m.per_type.get(t))
        writer.writerow(cells)
    return buffer.getvalue()


def _csv_cells(loc: Localisation | None) -> list[str]:
    if loc is None:
        return [""] * len(CSV_METRICS)
    values = (loc.mass_accuracy, loc.rank_accuracy, loc.pointing_game)
    return [*("" if v is None else f"{v:.6f}" for v in values), str(loc.n_images)]
