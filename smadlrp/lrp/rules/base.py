"""The base of every LRP layer rule: the `Rule` class, parameter validation and the registry of rule keys."""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from smadlrp.core.errors import UsageError
from smadlrp.lrp.ops import LayerOp, LayerState, Prepared

# Denominator stabiliser of the rules without epsilon: 0 means a zero denominator gives 0 (its contributions are
# all zero too); a positive value s turns the denominator z into z + s sign(z) like epsilon does.
DEFAULT_STABILIZER = 0.0


def as_number(rule: str, name: str, value: object) -> float:
    """Parameter `name` of rule `rule` as a finite float (a one-element tensor counts); UsageError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, Tensor) and value.numel() == 1:
            return float(value.item())
        raise UsageError(f"rule {rule}: {name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise UsageError(f"rule {rule}: {name} must be finite, got {number}")
    return number


def as_non_negative(rule: str, name: str, value: object) -> float:
    """Parameter `name` of rule `rule` as a finite float >= 0; UsageError otherwise."""
    number = as_number(rule, name, value)
    if number < 0:
        raise UsageError(f"rule {rule}: {name} must be >= 0, got {number:g}")
    return number


def as_numbers(rule: str, name: str, value: object) -> tuple[float, ...] | None:
    """A scalar or a per-channel sequence/tensor as a tuple of floats (None stays None)."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        value = value.detach().flatten().tolist()
    elif hasattr(value, "tolist"):  # numpy arrays and scalars
        value = value.tolist()
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise UsageError(f"rule {rule}: {name} is empty")
    return tuple(as_number(rule, name, item) for item in items)


@dataclass(frozen=True)
class Rule(ABC):
    """Base of every rule. Subclasses are frozen dataclasses: equal parameters mean an equal (cacheable) rule."""

    key: ClassVar[str]
    summary: ClassVar[str]
    # Input-layer rules: given alone as `rule=`, they apply to the first layer and LRP-0 to every other one.
    input_layer: ClassVar[bool] = False
    # Signal rules (PatternNet family) propagate a backward signal, not relevance; pools then use the gradient.
    signal: ClassVar[bool] = False
    # Rules that treat inputs of both signs differently from inputs >= 0 (the engine then finds out which).
    sign_sensitive: ClassVar[bool] = False
    # Rules whose relevance is `a_i` times something (none to a zero input): after them a ReLU passes relevance
    # unchanged, which equals its gradient. flat, wsquare and zbox give relevance to zero inputs too.
    zero_for_zero_input: ClassVar[bool] = True

    def needs_output(self, nonnegative_input: bool) -> bool:
        """Whether `relevance` reads the layer output `z` (kept from the forward pass)."""
        return False

    def prepare(self, name: str, weight: Tensor, bias: Tensor | None) -> Prepared:
        """Modified weights for layer `name` (float32 `weight`, `bias`); computed once per layer."""
        return {}

    def check(self, name: str, op: LayerOp, a: Tensor) -> None:
        """Refuse (UsageError) a layer input this rule cannot work with; every input is fine by default."""
        return None

    def check_layers(self, weights: Mapping[str, Tensor]) -> None:
        """Refuse (UsageError) a model whose explained layers (name -> weight) this rule cannot work with."""
        return None

    @abstractmethod
    def relevance(self, op: LayerOp, w: Prepared, state: LayerState, r: Tensor) -> Tensor:
        """Relevance (or signal) at the input, shape of `state.a`, from `r` at the output."""


RULES: dict[str, type[Rule]] = {}


def register(cls: type[Rule]) -> type[Rule]:
    """Class decorator: add a rule class to the registry under its `key`."""
    if cls.key in RULES:
        raise ValueError(f"rule key {cls.key!r} registered twice")
    RULES[cls.key] = cls
    return cls


def rule_names() -> tuple[str, ...]:
    """Every registered rule key, in registration order."""
    return tuple(RULES)


def rule_class(key: str) -> type[Rule]:
    """The rule class registered under `key`; UsageError listing the keys when unknown."""
    try:
        return RULES[key]
    except KeyError:
        raise UsageError(f"unknown rule {key!r}; rules: {', '.join(RULES)}") from None


def rule_parameters(key: str) -> dict[str, Any]:
    """Parameter names of rule `key` with their defaults."""
    return {f.name: f.default for f in dataclasses.fields(rule_class(key)) if f.init}


def make_rule(key: str, **params: Any) -> Rule:
    """Build rule `key` with `params` (validated); UsageError for an unknown key or parameter."""
    cls = rule_class(key)
    accepted = rule_parameters(key)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        have = ", ".join(accepted) or "none"
        raise UsageError(f"rule {key} has no parameter {', '.join(unknown)} (its parameters: {have})")
    return cls(**params)
