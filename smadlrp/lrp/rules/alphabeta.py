"""LRP-alpha-beta: positive and negative contributions shared separately, alpha - beta = 1."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from smadlrp.core.errors import UsageError
from smadlrp.lrp.ops import (
    LayerOp,
    LayerState,
    Prepared,
    cached,
    forward_parts,
    share_parts,
    signed_parts,
    stabilized_divide,
    stacked_like,
)
from smadlrp.lrp.rules.base import DEFAULT_STABILIZER, Rule, as_non_negative, register


@register
@dataclass(frozen=True)
class AlphaBeta(Rule):
    """LRP-alpha-beta: positive and negative contributions (biases included) shared separately.

    `R_i = sum_j (alpha (a_i w_ij)+ / z+_j - beta (a_i w_ij)- / z-_j) R_j` with
    `z+_j = sum_i (a_i w_ij)+ + b+_j`, `z-_j = sum_i (a_i w_ij)- + b-_j` and alpha - beta = 1.
    """

    key = "alpha1beta0"
    summary = "LRP-alpha-beta: alpha (a w)+ / z+ - beta (a w)- / z-, biases included, alpha - beta = 1"
    sign_sensitive = True
    alpha: float = 1.0
    beta: float = 0.0
    stabilizer: float = DEFAULT_STABILIZER

    def __post_init__(self) -> None:
        alpha = as_non_negative(self.key, "alpha", self.alpha)
        beta = as_non_negative(self.key, "beta", self.beta)
        if abs(alpha - beta - 1.0) > 1e-9:
            raise UsageError(f"rule {self.key}: alpha - beta must be 1, got alpha={alpha:g}, beta={beta:g}")
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "beta", beta)
        object.__setattr__(self, "stabilizer", as_non_negative(self.key, "stabilizer", self.stabilizer))

    def needs_output(self, nonnegative_input: bool) -> bool:
        return True

    def prepare(self, name: str, weight: Tensor, bias: Tensor | None) -> Prepared:
        prepared = {"w_pos": weight.clamp(min=0)}
        if bias is not None:
            prepared["b_pos"] = bias.clamp(min=0)
        return prepared

    def relevance(self, op: LayerOp, w: Prepared, state: LayerState, r: Tensor) -> Tensor:
        a, w_pos, eps = state.a, w["w_pos"], self.stabilizer
        assert state.z is not None
        if not state.input_nonnegative():
            return self._relevance_signed(op, w, state, r)
        # a >= 0: (a w)+ = a w+, (a w)- = a w-, and z+ = a W+ + b+ >= 0
        z_pos = op.forward(a, w_pos, w.get("b_pos"))
        if self.beta == 0.0:
            dead = _dead_signal(r, z_pos, state.z)
            s = stabilized_divide(r, z_pos, eps, nonnegative=True, scale=self.alpha, overwrite=True)
            c = op.vjp(a, w_pos, s)
            if dead is not None:
                c.add_(op.vjp(a, w["weight"], dead))
            return c.mul_(a)
        t_pos, t_neg = self._signals(r, z_pos, state.z)
        # W-^T t- = W^T t- - W+^T t-: W- is never stored
        c = op.vjp(a, w_pos, t_pos.sub_(t_neg))
        del t_pos  # released before the second product
        return c.add_(op.vjp(a, w["weight"], t_neg)).mul_(a)

    def _signals(self, r: Tensor, z_pos: Tensor, z: Tensor, out: Sequence[Tensor] = ()) -> tuple[Tensor, Tensor]:
        """(t+, t-) with R_i = sum_j (a w)+_ij t+_j + (a w)-_ij t-_j: `alpha R / z+` and `beta R / -z-`, except
        where one side has no contributions: there the other side takes all of R (`R / z+`, or `R / z-` through
        t-), so relevance is conserved at every output. `z_pos` is overwritten; `out`: tensors for (t+, t-)."""
        eps = self.stabilizer
        t_pos, t_neg = out if out else (None, None)
        z_neg = torch.sub(z_pos, z)  # -z- >= 0, also where an in-place ReLU has turned z into relu(z)
        # z- = 0 up to rounding (z- is taken as z+ - z): z_neg <= rtol z+, tested without a temporary
        no_neg = z_neg.sub_(z_pos, alpha=_NO_CONTRIBUTION_RTOL) <= 0
        z_neg.add_(z_pos, alpha=_NO_CONTRIBUTION_RTOL)
        no_pos = z_pos == 0  # z+ is a sum of exact zeros there
        t_pos = stabilized_divide(r, z_pos, eps, nonnegative=True, scale=self.alpha, overwrite=True, out=t_pos)
        # -beta (a w)- / z- = beta (a w)- / (z+ - z): a non-negative denominator
        t_neg = stabilized_divide(r, z_neg, eps, nonnegative=True, scale=self.beta, overwrite=True, out=t_neg)
        if bool(no_neg.any()):  # all of R to the positive side
            t_pos[no_neg] /= self.alpha
            t_neg.masked_fill_(no_neg, 0.0)
        if bool(no_pos.any()):  # all of R to the negative side, R / z- with z- = z there
            t_neg[no_pos] = stabilized_divide(r[no_pos], z[no_pos], eps)
        return t_pos, t_neg

    def _relevance_signed(self, op: LayerOp, w: Prepared, state: LayerState, r: Tensor) -> Tensor:
        """Inputs of both signs: (a w)+ = a+ w+ + a- w-, (a w)- = a+ w- + a- w+, with [a+, a-] stacked along the
        channels before a ReLU (the first layer: few channels, where one product of twice the width costs no
        more than one of the plain width)."""
        if not state.rectified:
            return self._relevance_magnitudes(op, w, state, r)
        w_pos, eps = w["w_pos"], self.stabilizer
        assert state.z is not None
        w_neg = cached(w, "w_neg", lambda: w["weight"].clamp(max=0))
        parts = signed_parts(state.a)
        z_pos = forward_parts(op, parts, [w_pos, w_neg], w.get("b_pos"))  # exactly 0 without positive parts
        if self.beta == 0.0:
            dead = _dead_signal(r, z_pos, state.z)
            s = stabilized_divide(r, z_pos, eps, nonnegative=True, scale=self.alpha, overwrite=True)
            out = share_parts(op, parts, [[w_pos, w_neg]], s)
            if dead is not None:
                out.add_(op.vjp(state.a, w["weight"], dead).mul_(state.a))
            return out
        t = stacked_like(op, r, 2)  # [t+, t-], written in place
        self._signals(r, z_pos, state.z, out=t.chunk(2, op.channel_dim))
        del z_pos
        return share_parts(op, parts, [[w_pos, w_neg], [w_neg, w_pos]], t)

    def _relevance_magnitudes(self, op: LayerOp, w: Prepared, state: LayerState, r: Tensor) -> Tensor:
        """Inputs of both signs, not before a ReLU (every layer after a SiLU or Hardswish): (a w)+- = (a w +-
        |a| |w|) / 2, so 2 z+ = u + z and -2 z- = u - z with u = |a| |W| + |b| (one convolution), and
        R = 1/2 a W^T (t+ + t-) + 1/2 |a| |W|^T (t+ - t-) (two vjps) for the signals of `_signals`. z+ and z-
        come out of a difference here, so an output counts as having no contributions of one sign when they are
        below _NO_CONTRIBUTION_RTOL of the other sign's."""
        a, z, eps = state.a, state.z, 2.0 * self.stabilizer  # (denominators are doubled below)
        assert z is not None
        w_abs = cached(w, "w_abs", lambda: w["weight"].abs())
        b_abs = cached(w, "b_abs", lambda: w["bias"].abs()) if "bias" in w else None
        a_abs = a.abs()
        u = op.forward(a_abs, w_abs, b_abs)
        twice_pos = torch.add(u, z)
        twice_neg = u.sub_(z)
        no_pos = twice_pos <= twice_neg * _NO_CONTRIBUTION_RTOL
        no_neg = twice_neg <= twice_pos * _NO_CONTRIBUTION_RTOL if self.beta != 0.0 else None
        t_pos = stabilized_divide(r, twice_pos, eps, nonnegative=True, scale=2.0 * self.alpha, overwrite=True)
        t_neg: Tensor | None = None
        if no_neg is not None:
            t_neg = stabilized_divide(r, twice_neg, eps, nonnegative=True, scale=2.0 * self.beta, overwrite=True)
            if bool(no_neg.any()):  # all of R to the positive side
                t_pos[no_neg] /= self.alpha
                t_neg.masked_fill_(no_neg, 0.0)
        if bool(no_pos.any()):  # all of R to the negative side: R / z- with z- = z there
            t_pos.masked_fill_(no_pos, 0.0)
            t_neg = torch.zeros_like(t_pos) if t_neg is None else t_neg
            t_neg[no_pos] = stabilized_divide(r[no_pos], z[no_pos], self.stabilizer)
        if t_neg is None:  # alpha1beta0 and every output with positive contributions: (a w)+ only
            return op.vjp(a, w["weight"], t_pos).mul_(a).add_(op.vjp(a, w_abs, t_pos).mul_(a_abs)).mul_(0.5)
        total = torch.add(t_pos, t_neg)
        out = op.vjp(a, w["weight"], total).mul_(a)
        del total
        return out.add_(op.vjp(a, w_abs, t_pos.sub_(t_neg)).mul_(a_abs)).mul_(0.5)


# alpha-beta: an output whose negative contributions are below this share of its positive ones has none.
_NO_CONTRIBUTION_RTOL = 1e-5


def _dead_signal(r: Tensor, z_pos: Tensor, z: Tensor) -> Tensor | None:
    """For alpha1beta0: `R / z` at the outputs without positive contributions (z+ = 0, so every contribution
    is negative and z = z-), 0 elsewhere; None when there are none. There the negative contributions take
    the relevance, which is otherwise lost."""
    dead = z_pos == 0
    if not bool(dead.any()):
        return None
    return stabilized_divide(r, z, 0.0).mul_(dead)


@register
@dataclass(frozen=True)
class Alpha2Beta1(AlphaBeta):
    """LRP-alpha-beta with alpha = 2, beta = 1 by default."""

    key = "alpha2beta1"
    summary = "LRP-alpha-beta with alpha = 2, beta = 1"
    alpha: float = 2.0
    beta: float = 1.0
