"""The work behind `smadlrp compare-rules`: run every rule and three baselines (explain/methods.py) on a seeded
subset of a split and collect localisation (against artifact masks), region perturbation in both orders (AOPC,
ABPC), class sensitivity, optionally the randomisation checks (MPRT, eMPRT; explain/sanity.py), the verdicts in
words (explain/checks.py) and timing numbers. No printing here.

Every method gives a map (B, H, W) at model-input resolution for the target class (the attack class unless
asked otherwise): LRP rules their relevance summed over channels, the baselines as explain/methods.py says.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from smadlrp.core.distributed import Ranks, current
from smadlrp.core.errors import UsageError
from smadlrp.data.loading import DataSource, ImageDataset, make_loader
from smadlrp.detector.checkpoint import CheckpointMeta
from smadlrp.explain.checks import THRESHOLDS, CheckValues, in_words, verdicts
from smadlrp.explain.faithfulness import (
    BoolArray,
    FloatArray,
    abpc,
    aopc,
    mass_accuracy,
    perturbation_curve,
    pointing_game,
    rank_accuracy,
)
from smadlrp.explain.imputation import DEFAULT_IMPUTATION, IMPUTATIONS, describe, road_noise
from smadlrp.explain.methods import BASELINES, RANDOM, MapFunction, method_maps, runner_up, scored_model
from smadlrp.explain.randomisation import randomised_layers
from smadlrp.explain.sanity import Batch, class_correlation, methods_for, randomisation_checks, relative_rise
from smadlrp.explain.subset import (
    MASK_RESIZING,
    PATCH_GRID,
    artifact_masks,
    check_perturbation,
    default_patch_size,
    select_subset,
)
from smadlrp.lrp import Contrast, Explainer, resolve_target

__all__ = ["BASELINES", "PATCH_GRID", "RANDOM", "Comparison", "Localisation", "MethodResult", "Randomisation",
           "artifact_masks", "check_perturbation", "compare_methods", "default_patch_size", "select_subset"]
SCORE = "target logit"
SCORE_BATCH_FACTOR = 4  # perturbed images are scored in batches of this many times --batch-size


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
class Randomisation:
    """MPRT and eMPRT of one method, means over the images: Spearman and SSIM of |map| against the trained model's
    map per randomised depth (index 0: the output layer randomised, last: every layer), eMPRT (the relative rise
    of the histogram entropy at full randomisation) and the mean entropies (nats) of the trained and fully
    randomised maps."""

    spearman: list[float | None]
    ssim: list[float | None]
    emprt: float | None
    entropy_trained: float | None
    entropy_randomised: float | None


@dataclass(frozen=True)
class MethodResult:
    """One rule or baseline: relevance time, AOPC (in target-logit units) of the most-relevant-first (MoRF) curve,
    its difference to the random order, the mean MoRF curve (mean f(x_0) - f(x_k), k = 0..steps) and localisation
    overall and per type; the least-relevant-first (LeRF) AOPC and curve, ABPC (mean f_LeRF(x_k) - f_MoRF(x_k)),
    class sensitivity (mean Spearman correlation of the maps of the target and the runner-up class; None for a
    contrastive target), the randomisation checks (with --sanity), and the verdicts of explain/checks.py."""

    name: str
    kind: str  # "rule" or "baseline"
    ms_per_image: float
    aopc: float
    aopc_vs_random: float
    curve: list[float]
    localisation: Localisation | None
    per_type: dict[str, Localisation] = field(default_factory=dict)
    lerf_aopc: float = 0.0
    abpc: float = 0.0
    lerf_curve: list[float] = field(default_factory=list)
    class_sensitivity: float | None = None
    randomisation: Randomisation | None = None
    checks: dict[str, bool | None] = field(default_factory=dict)
    summary: str = ""


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
    replacement: str = describe(DEFAULT_IMPUTATION)
    mask_resizing: str = MASK_RESIZING
    imputation: str = DEFAULT_IMPUTATION
    randomised_layers: list[str] | None = None  # with --sanity: the layers in cascading order, output first
    thresholds: dict[str, float] = field(default_factory=lambda: dict(THRESHOLDS))

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
    """Per-method values gathered batch by batch: curve rows (MoRF, LeRF, class correlation) for the images at
    `rows`, localisation values for the masked images at `located`, randomisation values for the images at
    `sanity_rows` (positions in the chosen subset)."""

    seconds: float = 0.0
    rows: list[int] = field(default_factory=list)
    located: list[int] = field(default_factory=list)
    curves: list[FloatArray] = field(default_factory=list)
    lerf: list[FloatArray] = field(default_factory=list)
    class_rho: list[FloatArray] = field(default_factory=list)
    mass: list[float] = field(default_factory=list)
    rank: list[float] = field(default_factory=list)
    point: list[float] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    sanity_rows: list[int] = field(default_factory=list)
    spearman: list[FloatArray] = field(default_factory=list)
    ssim: list[FloatArray] = field(default_factory=list)
    entropy: list[FloatArray] = field(default_factory=list)


@dataclass(frozen=True)
class _Setup:
    """What every batch needs besides the methods."""

    wanted: int | str
    meta: CheckpointMeta
    masks: Mapping[int, tuple[BoolArray, str]]
    patch: int
    steps: int
    chunk: int
    imputation: str
    seed: int
    class_check: bool
    keep: bool  # keep the batches (on the CPU) for the randomisation checks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare_methods(model: nn.Module, meta: CheckpointMeta, explainers: Mapping[str, Explainer], data: DataSource, *,
                    split: str = "test", max_images: int = 200, batch_size: int = 32, patch_size: int | None = None,
                    steps: int = 50, seed: int = 0, target: int | str | Contrast | None = None, workers: int = 0,
                    imputation: str = DEFAULT_IMPUTATION, sanity: bool = False, pattern_kind: str = "positive",
                    device: torch.device | None = None, warn: Callable[[str], None] = lambda message: None,
                    on_start: Callable[[int, int], None] = lambda share, n: None,
                    on_batch: Callable[[int], None] = lambda n: None,
                    on_sanity: Callable[[int | None, int], None] = lambda total, n: None,
                    ranks: Ranks | None = None) -> Comparison:
    """Compare `explainers` and the baselines on up to `max_images` images of one split of `data` (seeded subset).

    `target`: the class (index or name) explained and scored for every image; None: the attack class; a
    `Contrast`: its logit minus the other's is explained, scored (AOPC in logit-difference units) and
    differentiated by the baselines. `imputation`: what removed patches become (explain/imputation.py).
    `sanity`: also run the randomisation checks, with pattern rules refitted (`pattern_kind`) per model.
    `on_start(share, n)` gets this process's and the total number of chosen images, `on_batch(n)` the size of
    each finished batch, `on_sanity(total, 0)` the randomisation checks' image-passes, then `on_sanity(None, n)`
    each finished batch of them. Under torchrun (`ranks`, default: the current ones) each rank takes a share of
    whole batches and the per-image values are gathered in image order, so every average equals one process's.
    """
    ranks = ranks or current()
    device = device or next(model.parameters()).device
    size = meta.input_size
    patch = default_patch_size(size) if patch_size is None else patch_size
    check_perturbation(size, patch, steps)
    if seed < 0:
        raise UsageError(f"--seed {seed}: must be zero or positive")
    if imputation not in IMPUTATIONS:
        raise UsageError(f"--impute {imputation!r}: choose {', '.join(IMPUTATIONS)}")
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
    methods = method_maps(model, explainers, contrast, seed)
    collected = {name: _Collected() for name in methods}
    chosen_class = target.target if isinstance(target, Contrast) else target
    if not (chosen_class is None or isinstance(chosen_class, (int, str))):
        raise UsageError("compare-rules explains one class, by index or name, for every image")
    wanted = meta.attack_class if chosen_class is None else chosen_class
    dataset = ImageDataset(samples, size, meta.mean, meta.std)
    setup = _Setup(wanted, meta, masks, patch, steps, SCORE_BATCH_FACTOR * batch_size, imputation, seed,
                   not contrast, sanity)
    layers = None
    with ranks.shared_failure():
        kept = _run_batches(scored_model(model, contrast), methods, collected, Subset(dataset, share), setup,
                            batch_size, workers, device, on_batch)
        if sanity:
            depths = len(randomised_layers(model)) + 1
            on_sanity(depths * len(share), 0)
            methods_of = methods_for(explainers, kept, contrast=contrast, seed=seed, pattern_kind=pattern_kind,
                                     device=device)
            layers, values = randomisation_checks(model, methods_of, kept, seed=seed, device=device,
                                                  on_batch=lambda n: on_sanity(None, n))
            for name, v in values.items():
                c = collected[name]
                c.sanity_rows, c.spearman, c.ssim, c.entropy = v.positions, [v.spearman], [v.ssim], [v.entropy]
    if ranks.distributed:
        collected = _merge(ranks.gather(collected))
    results = _results(collected, explainers, len(samples))
    counts = {name: int((index.labels[chosen] == i).sum()) for i, name in enumerate(meta.class_names)}
    target_name = wanted if isinstance(wanted, str) else meta.class_names[wanted]
    if contrast:
        target_name += f" - {meta.class_names[1 - meta.class_names.index(target_name)]}"
    return Comparison(data=data.name, split=split, target=target_name, n_images=len(samples), class_counts=counts,
                      patch_size=patch, steps=steps, methods=results, localisation_note=note,
                      images=[str(s.path) for s in samples], replacement=describe(imputation), imputation=imputation,
                      randomised_layers=layers)


def _run_batches(model: nn.Module, methods: Mapping[str, MapFunction], collected: Mapping[str, _Collected],
                 dataset: Dataset[tuple[Tensor, int, int]], setup: _Setup, batch_size: int, workers: int,
                 device: torch.device, on_batch: Callable[[int], None]) -> list[Batch]:
    """Every method on every batch of `dataset`, values into `collected`; the batches when `setup.keep`."""
    warm = False
    kept: list[Batch] = []
    for x, _, positions in make_loader(dataset, batch_size, workers=workers, device=device):
        x = x.to(device)
        with torch.no_grad():
            logits = model(x)
        target_index = resolve_target(logits, setup.wanted, setup.meta.class_names)
        other = runner_up(logits, target_index) if setup.class_check else None
        if not warm:  # first use prepares modified weights and kernels: keep it out of the timings
            for function in methods.values():
                function(x[:1], target_index[:1], positions[:1].tolist())
            warm = True
        noise = None
        if setup.imputation == "road":
            noise = road_noise(positions.tolist(), x.shape[1:], setup.seed, setup.meta.std).to(device, x.dtype)
        for name, function in methods.items():
            _run_method(model, function, x, target_index, other, positions.tolist(), setup, noise, collected[name])
        if setup.keep:
            kept.append((x.cpu(), target_index.cpu(), positions.tolist()))
        on_batch(len(positions))
    return kept


def _merge(parts: Sequence[Mapping[str, _Collected]]) -> dict[str, _Collected]:
    """Every rank's values of each method as one `_Collected` in image order, as one process collects them;
    the seconds are added (time per image stays the compute time of one image)."""
    merged = {}
    for name in parts[0]:
        each = [part[name] for part in parts]
        rows = np.argsort([r for c in each for r in c.rows], kind="stable")
        located = np.argsort([r for c in each for r in c.located], kind="stable")
        sanity = np.argsort([r for c in each for r in c.sanity_rows], kind="stable")

        def pick(values: list[Any], order: npt.NDArray[np.int64] = located) -> list[Any]:
            return [values[i] for i in order]

        def stacked(chunks: list[FloatArray], order: npt.NDArray[np.int64]) -> list[FloatArray]:
            return [np.concatenate(chunks)[order]] if chunks else []

        merged[name] = _Collected(
            seconds=sum(c.seconds for c in each), rows=pick([r for c in each for r in c.rows], rows),
            located=pick([r for c in each for r in c.located]),
            curves=stacked([a for c in each for a in c.curves], rows),
            lerf=stacked([a for c in each for a in c.lerf], rows),
            class_rho=stacked([a for c in each for a in c.class_rho], rows),
            mass=pick([v for c in each for v in c.mass]), rank=pick([v for c in each for v in c.rank]),
            point=pick([v for c in each for v in c.point]), types=pick([v for c in each for v in c.types]),
            sanity_rows=pick([r for c in each for r in c.sanity_rows], sanity),
            spearman=stacked([a for c in each for a in c.spearman], sanity),
            ssim=stacked([a for c in each for a in c.ssim], sanity),
            entropy=stacked([a for c in each for a in c.entropy], sanity))
    return merged


def _run_method(model: nn.Module, function: MapFunction, x: Tensor, target: Tensor, other: Tensor | None,
                positions: list[int], setup: _Setup, noise: Tensor | None, into: _Collected) -> None:
    """Time one method's maps for a batch, then score their localisation, class sensitivity and perturbation
    curves in both orders into `into`."""
    _sync(x.device)
    start = time.perf_counter()
    maps = function(x, target, positions).detach()
    _sync(x.device)
    into.seconds += time.perf_counter() - start
    rows = [row for row, position in enumerate(positions) if position in setup.masks]
    into.rows += positions
    into.located += [positions[row] for row in rows]
    chosen = maps.double().cpu().numpy()
    if rows:
        truth = np.stack([setup.masks[positions[row]][0] for row in rows])
        into.mass += mass_accuracy(chosen[rows], truth).tolist()
        into.rank += rank_accuracy(chosen[rows], truth).tolist()
        into.point += pointing_game(chosen[rows], truth).tolist()
        into.types += [setup.masks[positions[row]][1] for row in rows]
    if other is not None:
        into.class_rho.append(class_correlation(function, x, target, other, positions, chosen))
    with torch.no_grad():  # most relevant first, then least relevant first (the negated map), in one pass
        both = perturbation_curve(model, torch.cat([x, x]), torch.cat([target, target]),
                                  torch.cat([maps, -maps]).float(), setup.patch, setup.steps, setup.chunk,
                                  setup.imputation, None if noise is None else torch.cat([noise, noise]))
    curves = both.double().cpu().numpy()
    into.curves.append(curves[:len(x)])
    into.lerf.append(curves[len(x):])


def _localisation(mass: FloatArray, rank: FloatArray, point: FloatArray) -> Localisation:
    return Localisation(len(mass), _mean(mass), _mean(rank), _mean(point), int(np.isnan(mass).sum()))


def _mean(values: npt.ArrayLike) -> float | None:
    """Mean of the finite values, None when there is none."""
    array = np.asarray(values, dtype=np.float64)
    finite = array[np.isfinite(array)]
    return float(finite.mean()) if finite.size else None


def _randomisation(c: _Collected) -> Randomisation | None:
    if not c.spearman:
        return None
    rho, index, entropy = np.concatenate(c.spearman), np.concatenate(c.ssim), np.concatenate(c.entropy)
    return Randomisation(spearman=[_mean(rho[:, d]) for d in range(rho.shape[1])],
                         ssim=[_mean(index[:, d]) for d in range(index.shape[1])],
                         emprt=_mean(relative_rise(entropy)), entropy_trained=_mean(entropy[:, 0]),
                         entropy_randomised=_mean(entropy[:, 1]))


def _results(collected: Mapping[str, _Collected], explainers: Mapping[str, Explainer],
             n_images: int) -> list[MethodResult]:
    per_image = {name: np.concatenate(c.curves) for name, c in collected.items()}
    random_aopc = float(aopc(per_image[RANDOM]).mean())
    random_mass = _mean(collected[RANDOM].mass)
    results = []
    for name, c in collected.items():
        curves, lerf = per_image[name], np.concatenate(c.lerf)
        area, between = float(aopc(curves).mean()), float(abpc(curves, lerf).mean())
        mass, rank, point = (np.asarray(v, dtype=np.float64) for v in (c.mass, c.rank, c.point))
        types = np.asarray(c.types, dtype=object)
        per_type = {t: _localisation(mass[types == t], rank[types == t], point[types == t])
                    for t in dict.fromkeys(c.types) if t}
        localisation = _localisation(mass, rank, point) if c.mass else None
        randomisation = _randomisation(c)
        class_rho = _mean(np.concatenate(c.class_rho)) if c.class_rho else None
        values = CheckValues(
            mass_accuracy=None if localisation is None else localisation.mass_accuracy,
            random_mass_accuracy=random_mass, abpc=between, class_sensitivity=class_rho,
            mprt_spearman=None if randomisation is None else randomisation.spearman[-1],
            emprt=None if randomisation is None else randomisation.emprt, is_random=name == RANDOM)
        passed = verdicts(values)
        results.append(MethodResult(
            name=name, kind="rule" if name in explainers else "baseline",
            ms_per_image=1000.0 * c.seconds / n_images, aopc=area, aopc_vs_random=area - random_aopc,
            curve=(curves[:, :1] - curves).mean(axis=0).tolist(), localisation=localisation, per_type=per_type,
            lerf_aopc=float(aopc(lerf).mean()), abpc=between, lerf_curve=(lerf[:, :1] - lerf).mean(axis=0).tolist(),
            class_sensitivity=class_rho, randomisation=randomisation, checks=passed,
            summary=in_words(values, passed)))
    return results
