"""LRP-gamma and LRP-gamma with the epsilon denominator: contributions of the output's sign amplified."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from smadlrp.lrp.ops import LayerOp, LayerState, Prepared, batched, cached, modified, stabilized_divide, z_rule
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
        # gamma = 0 is the z-rule, whatever the inputs' signs: no need to look at them
        object.__setattr__(self, "sign_sensitive", self.gamma != 0.0)

    def _denominator_epsilon(self) -> float:
        return self.stabilizer

    def needs_output(self, nonnegative_input: bool) -> bool:
        return True

    def _abs_scale(self) -> float:
        """k = gamma / (2 + gamma), the scale of |W| once the denominator is divided by 1 + gamma/2."""
        return self.gamma / (2.0 + self.gamma)

    def relevance(self, op: LayerOp, w: Prepared, state: LayerState, r: Tensor) -> Tensor:
        a, z, eps, gamma = state.a, state.z, self._denominator_epsilon(), self.gamma
        assert z is not None
        if gamma == 0.0:  # rho(w) = w: the z-rule with the stabiliser
            return z_rule(op, w["weight"], state, r, eps)
        if state.input_nonnegative():
            return self._share_nonnegative(op, w, state, r)
        # (a w)+ = (a w + |a| |w|) / 2, so the denominator z + gamma z+ is (1 + gamma/2) (z + k (|a| |W| + |b|))
        # with k = gamma / (2 + gamma): one product, a is not split. Everything below is divided by 1 + gamma/2
        # (the stabiliser too), so that no pass scales by it: R = a W^T s + |a| (k |W|)^T t, with the signed
        # signal s = R / denominator and its magnitude t = R / |denominator|.
        eps /= 1.0 + gamma / 2
        a_abs = a.abs()
        if state.rectified and op.stackable:  # (the first layer): one product of twice the width each way
            return self._share_stacked(op, w, a, a_abs, r, eps)
        k = self._abs_scale()
        w_abs = modified(w, "w_abs_k", lambda: w["weight"].abs().mul_(k), op, a)
        b_abs = cached(w, "b_abs_k", lambda: w["bias"].abs().mul_(k)) if "bias" in w else None
        d = op.forward(a_abs, w_abs, b_abs)  # k (|a| |W| + |b|)
        if state.rectified:  # after a ReLU no relevance arrives where z < 0: s = t
            t = stabilized_divide(r, d.add_(z), eps, overwrite=True)
            return op.vjp(a, w["weight"], t).mul_(a).addcmul_(op.vjp(a, w_abs, t), a_abs)
        # Where z < 0 the denominator is z + gamma z- = (2 + gamma) z - (1 + gamma/2) (d + z), of magnitude
        # (1 + gamma/2) (d + |z|); s = t sign(z), with sign(0) = +1. Arithmetic on the sign instead of a mask:
        # a masked select is several times slower.
        sign = torch.copysign(d.new_tensor(1.0), z)
        t = stabilized_divide(r, d.addcmul_(z, sign), eps, nonnegative=True, overwrite=True)  # |z| = z sign(z)
        s = sign * t if batched(t) else sign.mul_(t)
        del sign
        signed = op.vjp(a, w["weight"], s).mul_(a)
        del s  # its memory goes back before the second product
        return signed.addcmul_(op.vjp(a, w_abs, t), a_abs)

    def _share_nonnegative(self, op: LayerOp, w: Prepared, state: LayerState, r: Tensor) -> Tensor:
        """Inputs `a >= 0`: rho(w) = w + gamma w+ (and rho(b) = b + gamma b+) where z >= 0, and the denominator
        z + gamma z- = (2 + gamma) z - d_pos where z < 0 (z- = z - z+)."""
        a, z, eps, gamma = state.a, state.z, self._denominator_epsilon(), self.gamma
        assert z is not None
        w_rho = modified(w, "w_rho", lambda: w["weight"].clamp(min=0).mul_(gamma).add_(w["weight"]), op, a)
        b_rho = cached(w, "b_rho", lambda: w["bias"].clamp(min=0).mul_(gamma).add_(w["bias"])) if "bias" in w else None
        d_pos = op.forward(a, w_rho, b_rho)
        if state.rectified:
            return op.vjp(a, w_rho, stabilized_divide(r, d_pos, eps, overwrite=True)).mul_(a)
        # With q = d_pos - (2 + gamma) min(z, 0), t = R / q and t- = t sign(min(z, 0)) (-t where z < 0, 0
        # elsewhere), the relevance is a (rho^T t + (2 + gamma) W^T t-). Two products: stacking them is no
        # faster, and slower on some shapes.
        low = z.clamp(max=0)
        t = stabilized_divide(r, d_pos.sub_(low, alpha=2.0 + gamma), eps, nonnegative=True, overwrite=True)
        t_neg = low.sign_() * t if batched(t) else low.sign_().mul_(t)  # batched: t does not fit into low
        return op.vjp(a, w_rho, t).add_(op.vjp(a, w["weight"], t_neg), alpha=2.0 + gamma).mul_(a)

    def _share_stacked(self, op: LayerOp, w: Prepared, a: Tensor, a_abs: Tensor, r: Tensor, eps: float) -> Tensor:
        """Inputs of both signs before a ReLU (s = t), `R = a W^T t + |a| (k |W|)^T t`, with [a, |a|] stacked
        against [W, k |W|]: the denominator (the rho bias, b + k |b|, included) in one convolution and the
        relevance in one vjp, of twice the width; on a layer with three input channels that costs about what one
        of the plain width costs."""
        k = self._abs_scale()
        both = cached(w, "w_signed", lambda: torch.cat([w["weight"], w["weight"].abs().mul_(k)], 1))
        bias = cached(w, "b_signed", lambda: w["bias"].abs().mul_(k).add_(w["bias"])) if "bias" in w else None
        x = torch.cat([a, a_abs], op.channel_dim)
        t = stabilized_divide(r, op.forward(x, both, bias), eps, overwrite=True)
        first, second = op.vjp(x, both, t).mul_(x).chunk(2, op.channel_dim)
        return torch.add(first, second)


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
