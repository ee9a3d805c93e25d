"""The sanity checks of compare-rules: class sensitivity, and the model-parameter randomisation checks (every
method's maps on cascadingly randomised copies of the detector, compared with its maps on the trained one).
No printing here.

- Class sensitivity (Sixt et al., ICML 2020): `class_correlation`, the Spearman correlation of the maps of two
  classes' logits for the same image.

- MPRT (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018): per randomised depth d (the d layers
  nearest the output randomised, explain/randomisation.py), the Spearman rank correlation and the SSIM between
  |e| (the trained model's map) and |e_d|, per image. A map that stays alike while the weights it should explain
  are destroyed does not explain the model.
- eMPRT (Hedström et al., "Sanity Checks Revisited: An Exploration to Repair the Model Parameter Randomisation
  Test", XAI in Action workshop, NeurIPS 2023): the relative rise of the map's complexity from the trained to the
  fully randomised model, (H(e_D) - H(e)) / H(e), H the histogram entropy (explain/map_similarity.py). A faithful
  map of a model that computes noise should itself look like noise.

Pattern rules are refitted on the compared images for every model, the trained one included, so that the
trained and randomised maps come from patterns fitted on the same sample.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from torch import Tensor, nn

from smadlrp.core.errors import UsageError
from smadlrp.explain.map_similarity import histogram_entropy, spearman, ssim, unit_scaled
from smadlrp.explain.methods import MapFunction, method_maps
from smadlrp.explain.randomisation import cascading, randomised_layers, rebind, refit_patterns, uses_patterns
from smadlrp.lrp import Explainer

FloatArray = npt.NDArray[np.float64]
Batch = tuple[Tensor, Tensor, list[int]]  # model input (B, C, H, W) on the CPU, target (B,), subset positions


@dataclass
class RandomisationValues:
    """One method's per-image values, rows in the order of `positions`: `spearman` and `ssim` (N, D) against the
    trained map at each randomised depth, `entropy` (N, 2) of the trained and the fully randomised map."""

    positions: list[int]
    spearman: FloatArray
    ssim: FloatArray
    entropy: FloatArray


def _maps(methods: Mapping[str, MapFunction], batch: Batch, device: object) -> dict[str, npt.NDArray[np.float32]]:
    """Every method's maps of one batch, float32 on the CPU (the trained ones are kept for the whole check)."""
    x, target, positions = batch
    x, target = x.to(device), target.to(device)  # type: ignore[call-overload]
    return {name: function(x, target, positions).detach().float().cpu().numpy()
            for name, function in methods.items()}


MethodsOf = Callable[[nn.Module], Mapping[str, MapFunction]]  # a model -> its methods


def methods_for(explainers: Mapping[str, Explainer], batches: Sequence[Batch], *, contrast: bool, seed: int,
                pattern_kind: str, device: object) -> MethodsOf:
    """The compared methods of any copy of the model: the rules of `explainers` rebound to it (pattern rules with
    patterns refitted on the images of `batches`) and its baselines."""
    refit = any(uses_patterns(e.composite) for e in explainers.values())
    images = [x.to(device) for x, _, _ in batches] if refit else []  # type: ignore[call-overload]

    def methods_of(model: nn.Module) -> dict[str, MapFunction]:
        patterns = refit_patterns(model, images, pattern_kind, device) if refit else None  # type: ignore[arg-type]
        return method_maps(model, rebind(explainers, model, patterns), contrast, seed)

    return methods_of


def randomisation_checks(model: nn.Module, methods_of: MethodsOf, batches: Sequence[Batch], *, seed: int,
                         device: object, on_batch: Callable[[int], None] = lambda n: None
                         ) -> tuple[list[str], dict[str, RandomisationValues]]:
    """The randomised layers (output first) and, per method of `methods_of(model)`, the MPRT and eMPRT values on
    `batches`. Costs one map per method, image and depth (the trained model and each of the D layers), plus
    what `methods_of` costs per model (a pattern fit when a pattern rule is compared). `on_batch(n)` follows each
    batch of each depth."""
    layers = randomised_layers(model)
    if not layers:
        raise UsageError("--sanity: the model has no layer with weights to randomise")
    methods = methods_of(model)
    names = list(methods)
    trained = []
    for batch in batches:
        trained.append(_maps(methods, batch, device))
        on_batch(len(batch[2]))
    empty = np.zeros((0, len(layers)))
    rho = {name: [empty] for name in names}
    index = {name: [empty] for name in names}
    entropy = {name: [np.zeros((0, 2))] for name in names}
    rows: dict[str, list[list[tuple[FloatArray, FloatArray]]]] = {name: [[] for _ in batches] for name in names}
    for depth, (_, randomised) in enumerate(cascading(model, seed), start=1):
        methods = methods_of(randomised)
        for i, (batch, reference) in enumerate(zip(batches, trained, strict=True)):
            maps = _maps(methods, batch, device)
            for name in names:
                rows[name][i].append(_similarity(reference[name], maps[name]))
                if depth == len(layers):
                    entropy[name].append(np.stack([histogram_entropy(reference[name]),
                                                   histogram_entropy(maps[name])], axis=1))
            on_batch(len(batch[2]))
    for name in names:
        rho[name] += [np.stack([r for r, _ in batch_rows], axis=1) for batch_rows in rows[name]]
        index[name] += [np.stack([s for _, s in batch_rows], axis=1) for batch_rows in rows[name]]
    positions = [p for _, _, batch_positions in batches for p in batch_positions]
    return layers, {name: RandomisationValues(positions, np.concatenate(rho[name]), np.concatenate(index[name]),
                                              np.concatenate(entropy[name])) for name in names}


def _similarity(reference: npt.ArrayLike, maps: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Spearman and SSIM (N,) between the absolute maps (SSIM on each scaled to [0, 1] by its maximum)."""
    return spearman(np.abs(reference), np.abs(maps)), ssim(unit_scaled(reference), unit_scaled(maps))


def class_correlation(function: MapFunction, x: Tensor, target: Tensor, other: Tensor, positions: list[int],
                      maps: FloatArray | None = None) -> FloatArray:
    """Class sensitivity (Sixt et al., "When Explanations Lie: Why Many Modified BP Attributions Fail", ICML
    2020) per image (B,): the Spearman rank correlation between the signed maps of the `target` and the `other`
    class's logit (`maps`: the target's, when already computed). Near 1: the map hardly depends on the class it
    is asked to explain."""
    if maps is None:
        maps = function(x, target, positions).detach().double().cpu().numpy()
    return spearman(maps, function(x, other, positions).detach().double().cpu().numpy())


def relative_rise(entropy: npt.ArrayLike) -> FloatArray:
    """eMPRT per image (N,) from entropies (N, 2) of the trained and the fully randomised map: (H_D - H_0) / H_0;
    NaN where H_0 = 0 (a constant trained map)."""
    h = np.asarray(entropy, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(h[:, 0] > 0, (h[:, 1] - h[:, 0]) / h[:, 0], np.nan)
