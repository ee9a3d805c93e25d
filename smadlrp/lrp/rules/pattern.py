"""PatternNet and PatternAttribution: backward signals through the fitted patterns of each layer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from smadlrp.core.errors import UsageError
from smadlrp.lrp.ops import LayerOp, LayerState, Prepared
from smadlrp.lrp.rules.base import Rule, register

FIT_PATTERNS_HINT = "run `smadlrp fit-patterns` and pass the fitted patterns"


@dataclass(frozen=True, eq=False)
class _PatternRule(Rule):
    """Shared parts of PatternNet/PatternAttribution: one pattern per layer, of the layer's weight shape.

    Equality (the engine's cache key) is the identity of the `patterns` mapping: treat it as read-only.
    """

    signal = True
    patterns: Mapping[str, Tensor] | None = None

    def __post_init__(self) -> None:
        if self.patterns is None:
            raise UsageError(f"rule {self.key} needs fitted patterns: {FIT_PATTERNS_HINT} (patterns=...)")
        if not isinstance(self.patterns, Mapping):
            raise UsageError(f"rule {self.key}: patterns must map layer names to tensors")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.patterns is self.patterns  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), id(self.patterns)))

    def check_layers(self, weights: Mapping[str, Tensor]) -> None:
        assert self.patterns is not None
        missing = [name for name in weights if name not in self.patterns]
        if missing:
            raise UsageError(f"rule {self.key}: no pattern for layer(s) {', '.join(missing)}; {FIT_PATTERNS_HINT}")
        for name, weight in weights.items():
            shape = tuple(self.patterns[name].shape)
            if shape != tuple(weight.shape):
                raise UsageError(
                    f"rule {self.key}: the pattern for {name!r} has shape {shape}, the layer's weight "
                    f"{tuple(weight.shape)}; {FIT_PATTERNS_HINT} for this model"
                )

    def pattern(self, name: str, weight: Tensor) -> Tensor:
        """The pattern of layer `name` in the weight's dtype, on its device."""
        self.check_layers({name: weight})
        assert self.patterns is not None
        return self.patterns[name].detach().to(device=weight.device, dtype=weight.dtype)


@register
@dataclass(frozen=True, eq=False)
class PatternNet(_PatternRule):
    """PatternNet: the backward signal with each weight W replaced by its pattern A; no multiplication by `a`."""

    key = "patternnet"
    summary = "PatternNet signal: backward pass with W replaced by the fitted pattern A (needs patterns=...)"

    def prepare(self, name: str, weight: Tensor, bias: Tensor | None) -> Prepared:
        return {"pattern": self.pattern(name, weight)}

    def relevance(self, op: LayerOp, w: Prepared, state: LayerState, r: Tensor) -> Tensor:
        return op.vjp(state.a, w["pattern"], r)


@register
@dataclass(frozen=True, eq=False)
class PatternAttribution(_PatternRule):
    """PatternAttribution: the backward signal with each weight W replaced by `A * W` (element-wise)."""

    key = "patternattribution"
    summary = "PatternAttribution: backward pass with W replaced by A * W (element-wise; needs patterns=...)"

    def prepare(self, name: str, weight: Tensor, bias: Tensor | None) -> Prepared:
        return {"pattern_w": self.pattern(name, weight) * weight}

    def relevance(self, op: LayerOp, w: Prepared, state: LayerState, r: Tensor) -> Tensor:
        return op.vjp(state.a, w["pattern_w"], r)
