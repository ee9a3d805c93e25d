"""LRP-0 and LRP-epsilon: the relevance shared in proportion to the contributions `a_i w_ij` of each output."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from smadlrp.lrp.ops import LayerOp, LayerState, Prepared, z_rule
from smadlrp.lrp.rules.base import Rule, as_non_negative, register


@register
@dataclass(frozen=True)
class Zero(Rule):
    """LRP-0: `R_i = sum_j a_i w_ij / z_j R_j`; equals gradient x input on ReLU networks."""

    key = "zero"
    summary = "LRP-0: R_i = sum_j a_i w_ij / z_j R_j (gradient x input on ReLU networks)"

    def needs_output(self, nonnegative_input: bool) -> bool:
        return True

    def relevance(self, op: LayerOp, w: Prepared, state: LayerState, r: Tensor) -> Tensor:
        return z_rule(op, w["weight"], state, r, 0.0)


@register
@dataclass(frozen=True)
class Epsilon(Rule):
    """LRP-epsilon: the LRP-0 denominator becomes `z_j + epsilon * sign(z_j)` (sign(0) = +1)."""

    key = "epsilon"
    summary = "LRP-epsilon: denominator z_j + epsilon sign(z_j), sign(0) = +1; absorbs weak or contradictory relevance"
    epsilon: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", as_non_negative(self.key, "epsilon", self.epsilon))

    def needs_output(self, nonnegative_input: bool) -> bool:
        return True

    def relevance(self, op: LayerOp, w: Prepared, state: LayerState, r: Tensor) -> Tensor:
        return z_rule(op, w["weight"], state, r, self.epsilon)
