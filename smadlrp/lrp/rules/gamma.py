"""LRP-gamma and LRP-gamma with the epsilon denominator: contributions of the output's sign amplified."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from smadlrp.lrp.ops import LayerOp, LayerState, Prepared, batched, cached, stabilized_divide
from smadlrp.lrp.rules.base import DEFAULT_STABILIZER, Rule, as_non_negative, register


@register
@dataclass(frozen=True)
class Gamma(Rule):
    """LRP-gamma: the contributions of the output's sign count (1 + gamma) times.

    At an output with `z_j >= 0`, `rho(z_ij) = z_ij + gamma max(0, z_ij)` and `rho(b) = b + gamma max(0, b)`
    (with `a >= 0`: `rho(w) = w + gamma w+`); at an output with `z_j < 0` the negative contributions are
    amplified instead, `rho(z_ij) = z_ij + gamma min(0, z_ij)`. The denominator `sum_i rho(z_ij)` then has the
    sign of `z_j` and at least its size, so it never comes near zero where `z_j` does not. For inputs of both
    signs, `(a w)+ = a+ w+ + a- w- = (a w + |a| |w|) / 2`, as in alpha-beta.
    """

    key = "gamma"
    summary = "LRP-gamma: contributions of the output's sign count (1 + gamma) times (w + gamma w+ where z >= 0)"
    sign_sensitive = True
    gamma: float = 0.1
    stabilizer: float = DEFAULT_STABILIZER

    def __post_init__(self) -> None:
        object.__setattr__(self, "gamma", as_non_negative(self.key, "gamma", self.gamma))
        object.__setattr__(self, "stabilizer", as_non_negative(self.key, "stabilizer", self.stabilizer))

    def _denominator_epsilon(self) -> float:
        return self.stabilizer

    def needs_output(self, nonnegative_input: bool) -> bool:
        return True

    def prepare(self, name: str, weight: Tensor, bias: Tensor | None) -> Prepared:
        prepared = {"w_pos": weight.clamp(min=0).mul_(self.gamma).add_(weight)}
        if bias is not None:
            prepared["b"] = bias.clamp(min=0).mul_(self.gamma).add_(bias)
        return prepared

    def relevance(self, op: LayerOp, w: Prepared, state: LayerState, r: Tensor) -> Tensor:
        a, z, eps, gamma = state.a, state.z, self._denominator_epsilon(), self.gamma
        assert z is not None
        nonnegative = state.input_nonnegative()
        if nonnegative:  # the denominator z + gamma z+ with z+ = a W+ + b+
            d_pos = op.forward(a, w["w_pos"], w.get("b"))
        else:  # (a w)+ = (a w + |a| |w|) / 2, so z+ = (z + |a| |W| + |b|) / 2: one product, a is not split
            a_abs = a.abs()
            if state.rectified and op.stackable:  # (the first layer): one product of twice the width each way
                return self._share_stacked(op, w, a, a_abs, r)
            w_abs = cached(w, "w_abs", lambda: w["weight"].abs())
            b_abs = cached(w, "b_abs", lambda: w["bias"].abs()) if "bias" in w else None
            d_pos = op.forward(a_abs, w_abs, b_abs).mul_(gamma / 2).add_(z, alpha=1.0 + gamma / 2)
        if state.rectified:  # after a ReLU no relevance arrives where z < 0
            t = stabilized_divide(r, d_pos, eps, overwrite=True)
            if nonnegative:
                return op.vjp(a, w["w_pos"], t).mul_(a)
            return self._share_signed(op, w, a, a_abs, t, t)  # grouped: no stacking
        # Where z < 0 the denominator is z + gamma z- = (2 + gamma) z - d_pos (z- = z - z+). With its magnitude
        # q = d_pos - (2 + gamma) min(z, 0), t = R / q and t- = t sign(min(z, 0)) (-t where z < 0, 0 elsewhere),
        # the relevance is a (rho^T t + (2 + gamma) W^T t-), rho = W + gamma W+, for inputs >= 0. Arithmetic on
        # the sign instead of a mask: a masked select is several times slower.
        low = z.clamp(max=0)
        t = stabilized_divide(r, d_pos.sub_(low, alpha=2.0 + gamma), eps, nonnegative=True, overwrite=True)
        t_neg = low.sign_() * t if batched(t) else low.sign_().mul_(t)  # batched: t does not fit into low
        del low
        if nonnegative:  # two products: stacking them is no faster, and slower on some shapes
            return op.vjp(a, w["w_pos"], t).add_(op.vjp(a, w["weight"], t_neg), alpha=2.0 + gamma).mul_(a)
        return self._share_signed(op, w, a, a_abs, t_neg.mul_(2.0).add_(t), t)

    def _share_stacked(self, op: LayerOp, w: Prepared, a: Tensor, a_abs: Tensor, r: Tensor) -> Tensor:
        """`_share_signed` before a ReLU (s = t) with [a, |a|] stacked against [(1 + gamma/2) W, gamma/2 |W|]:
        the denominator (the rho bias included) in one convolution and the relevance in one vjp, of twice the
        width; on a layer with three input channels that costs about what one of the plain width costs."""
        g = self.gamma / 2
        both = cached(w, "w_signed", lambda: torch.cat([w["weight"] * (1.0 + g), w["weight"].abs() * g], 1))
        x = torch.cat([a, a_abs], op.channel_dim)
        t = stabilized_divide(r, op.forward(x, both, w.get("b")), self._denominator_epsilon(), overwrite=True)
        first, second = op.vjp(x, both, t).mul_(x).chunk(2, op.channel_dim)
        return torch.add(first, second)

    def _share_signed(self, op: LayerOp, w: Prepared, a: Tensor, a_abs: Tensor, s: Tensor, t: Tensor) -> Tensor:
        """Inputs of both signs: rho(a w) = a w + gamma (a w)+- = (1 + gamma/2) a w +- gamma/2 |a| |w| (+ at
        outputs z >= 0, - elsewhere), so R = (1 + gamma/2) a W^T s + gamma/2 |a| |W|^T t with the signed signal
        s = R / denominator = t + 2 t- and its magnitude t = R / |denominator|."""
        out = op.vjp(a, w["weight"], s).mul_(a).mul_(1.0 + self.gamma / 2)
        return out.add_(op.vjp(a, w["w_abs"], t).mul_(a_abs), alpha=self.gamma / 2)


@register
@dataclass(frozen=True)
class GammaEpsilon(Gamma):
    """LRP-gamma weights with the LRP-epsilon denominator `z_j + epsilon * sign(z_j)`."""

    key = "gamma+epsilon"
    summary = "LRP-gamma weights with the LRP-epsilon denominator z_j + epsilon sign(z_j)"
    gamma: float = 0.1
    epsilon: float = 0.1
    stabilizer: float = dataclasses.field(default=DEFAULT_STABILIZER, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "epsilon", as_non_negative(self.key, "epsilon", self.epsilon))

    def _denominator_epsilon(self) -> float:
        return self.epsilon
