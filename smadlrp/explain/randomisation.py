"""Randomised copies of a detector for the model-parameter randomisation checks (MPRT, eMPRT): which layers are
randomised, in which order, with what, and the explainers of a copy. The user's model is never changed.

A *layer* is a module that owns a parameter with at least two dimensions (convolutions, dense layers, attention
projections, embeddings); normalisation layers (BatchNorm, LayerNorm: one-dimensional parameters only) keep their
trained values. Cascading randomisation (Adebayo et al., NeurIPS 2018) goes top down: depth d has the d layers
nearest the output randomised (module registration order, the forward order for the supported architectures).
Each of a layer's own parameters is redrawn i.i.d. from N(0, s^2), s the standard deviation of the trained tensor
(zero for a one-element tensor), from a generator seeded with (seed, layer index): the layer keeps the scale of
its output, so what changes is the structure the training gave it, and every depth draws the same values for the
same layer.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from smadlrp.lrp import Composite, Explainer, Rule
from smadlrp.lrp.canonize import canonize
from smadlrp.lrp.patterns import fit_patterns


def randomised_layers(model: nn.Module) -> list[str]:
    """Names of the layers of `model` in cascading order, output first ("" is the model's own parameters, such as
    a class token)."""
    names = [name for name, module in model.named_modules()
             if any(p.dim() >= 2 for p in module.parameters(recurse=False))]
    return names[::-1]


def randomise_layer(module: nn.Module, seed: int, index: int) -> None:
    """Redraw each of `module`'s own parameters in place from N(0, std(trained)^2), seeded by (seed, index)."""
    rng = np.random.default_rng([seed, index])
    with torch.no_grad():
        for parameter in module.parameters(recurse=False):
            scale = float(parameter.double().std()) if parameter.numel() > 1 else 0.0
            drawn = torch.from_numpy(rng.standard_normal(tuple(parameter.shape)) * scale)
            parameter.copy_(drawn.to(parameter.device, parameter.dtype))


def cascading(model: nn.Module, seed: int) -> Iterator[tuple[str, nn.Module]]:
    """(layer name, copy of `model` with that layer and every layer above it randomised), top down. One copy is
    made and randomised further at each step: use it (build its explainers anew) before taking the next."""
    randomised = copy.deepcopy(model).eval()
    modules = dict(randomised.named_modules())
    for index, name in enumerate(randomised_layers(model)):
        randomise_layer(modules[name], seed, index)
        yield name, randomised


def _pattern_rule(rule: Rule) -> bool:
    return getattr(rule, "patterns", None) is not None


def uses_patterns(composite: Composite) -> bool:
    """Whether any rule of `composite` reads fitted patterns (PatternNet, PatternAttribution)."""
    return any(_pattern_rule(rule) for rule in composite.rules())


def with_patterns(composite: Composite, patterns: Mapping[str, Tensor]) -> Composite:
    """`composite` with every pattern rule reading `patterns` instead."""

    def swap(rule: Rule) -> Rule:
        return dataclasses.replace(rule, patterns=patterns) if _pattern_rule(rule) else rule  # type: ignore[call-arg]

    def maybe(rule: Rule | None) -> Rule | None:
        return None if rule is None else swap(rule)

    return dataclasses.replace(composite, first=maybe(composite.first), conv=swap(composite.conv),
                               dense=swap(composite.dense), projection=maybe(composite.projection),
                               overrides={k: swap(v) for k, v in composite.overrides.items()})


def refit_patterns(model: nn.Module, batches: Iterable[Tensor], kind: str, device: torch.device
                   ) -> dict[str, Tensor]:
    """Patterns of `kind` fitted for `model` as it is now on `batches` (a list: the fit passes twice)."""
    return fit_patterns(canonize(model, share_weights=True), batches, (kind,), device=device)[kind].patterns


def rebind(explainers: Mapping[str, Explainer], model: nn.Module,
           patterns: Mapping[str, Tensor] | None = None) -> dict[str, Explainer]:
    """The same rules with the same parameters for `model`; pattern rules read `patterns` (required when any
    rule uses patterns)."""
    rebound = {}
    for name, explainer in explainers.items():
        composite = explainer.composite
        if uses_patterns(composite):
            if patterns is None:
                raise ValueError(f"{name} reads fitted patterns: give the patterns fitted for this model")
            composite = with_patterns(composite, patterns)
        rebound[name] = Explainer(model, composite, class_names=explainer.class_names)
    return rebound
