"""Input-layer rules: z^B for inputs in a box (zbox), flat and w^2, which give relevance to zero inputs too."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from smadlrp.core.errors import UsageError
from smadlrp.lrp.ops import LayerOp, LayerState, Prepared, share_by_weight, share_parts, stabilized_divide
from smadlrp.lrp.rules.base import DEFAULT_STABILIZER, Rule, as_non_negative, as_numbers, register


@register
@dataclass(frozen=True)
class ZBox(Rule):
    """z^B for inputs bounded per channel by `low <= a <= high`.

    `R_i = sum_j (a_i w_ij - l_i w+_ij - h_i w-_ij) / sum_i (...) R_j` (bias excluded). Bounds are given as
    `low`/`high` (scalar or per channel) or derived from the normalisation `mean`/`std`: the pixel range [0, 1]
    maps to `low = (0 - mean) / std`, `high = (1 - mean) / std`.
    """

    key = "zbox"
    summary = "z^B (input layer): (a w - l w+ - h w-) / sum(...), bounds low/high or from normalisation mean/std"
    input_layer = True
    zero_for_zero_input = False
    low: float | tuple[float, ...] | None = None
    high: float | tuple[float, ...] | None = None
    mean: float | tuple[float, ...] | None = None
    std: float | tuple[float, ...] | None = None
    stabilizer: float = DEFAULT_STABILIZER

    def __post_init__(self) -> None:
        for name in ("low", "high", "mean", "std"):
            object.__setattr__(self, name, as_numbers(self.key, name, getattr(self, name)))
        object.__setattr__(self, "stabilizer", as_non_negative(self.key, "stabilizer", self.stabilizer))
        low, high = self.bounds()
        if len(low) != len(high) and 1 not in (len(low), len(high)):
            raise UsageError(f"rule zbox: low has {len(low)} channels but high has {len(high)}")
        if any(lo > hi for lo, hi in zip(_broadcast(low, len(high)), _broadcast(high, len(low)), strict=True)):
            raise UsageError(f"rule zbox: low must be <= high in every channel, got low={low}, high={high}")

    def bounds(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(low, high) per channel, from low/high or from mean/std."""
        given = {name for name in ("low", "high", "mean", "std") if getattr(self, name) is not None}
        if given == {"low", "high"}:
            assert isinstance(self.low, tuple) and isinstance(self.high, tuple)
            return self.low, self.high
        if given == {"mean", "std"}:
            assert isinstance(self.mean, tuple) and isinstance(self.std, tuple)
            if len(self.mean) != len(self.std) and 1 not in (len(self.mean), len(self.std)):
                raise UsageError(f"rule zbox: mean has {len(self.mean)} channels but std has {len(self.std)}")
            if any(s <= 0 for s in self.std):
                raise UsageError(f"rule zbox: std must be > 0, got {self.std}")
            n = max(len(self.mean), len(self.std))
            pairs = list(zip(_broadcast(self.mean, n), _broadcast(self.std, n), strict=True))
            return tuple(-m / s for m, s in pairs), tuple((1.0 - m) / s for m, s in pairs)
        raise UsageError(
            "rule zbox needs input bounds: pass either low and high (scalar or per channel) or the "
            f"normalisation mean and std (got {', '.join(sorted(given)) or 'none of them'})"
        )

    def check(self, name: str, op: LayerOp, a: Tensor) -> None:
        low, high = self.bounds()
        n, channels = max(len(low), len(high)), op.channels(a)
        if n not in (1, channels):
            raise UsageError(f"rule zbox: bounds have {n} channels but layer {name!r} has {channels} input channels")

    def needs_output(self, nonnegative_input: bool) -> bool:
        return True

    def prepare(self, name: str, weight: Tensor, bias: Tensor | None) -> Prepared:
        return {"w_abs": weight.abs()}

    def relevance(self, op: LayerOp, w: Prepared, state: LayerState, r: Tensor) -> Tensor:
        # With w+ = (w + |w|) / 2 and w- = (w - |w|) / 2: l w+ + h w- = m w + d |w| for the box's middle
        # m = (l + h) / 2 and half-width d = (l - h) / 2, so z^B = (z - b) - (m W + d |W|) and
        # R = (a - m) W^T s - d |W|^T s with s = r / z^B.
        a, (low, high) = state.a, self.bounds()
        assert state.z is not None
        one = (1, *a.shape[1:])  # the bounds are the same for every sample: compute on one and broadcast
        lo, hi = a.new_tensor(low), a.new_tensor(high)
        mid = op.per_channel((lo + hi) / 2, a).expand(one)
        half = op.per_channel((lo - hi) / 2, a).expand(one)
        shift = op.forward(mid, w["weight"], w.get("bias")).add_(op.forward(half, w["w_abs"], None))
        s = stabilized_divide(r, torch.sub(state.z, shift), self.stabilizer, overwrite=True)
        return share_parts(op, [a - mid, half.neg().expand(a.shape)], [[w["weight"], w["w_abs"]]], s)


def _broadcast(values: tuple[float, ...], n: int) -> tuple[float, ...]:
    return values * n if len(values) == 1 else values


@register
@dataclass(frozen=True)
class Flat(Rule):
    """Flat: `R_i = sum_j 1 / n_j R_j`, `n_j` the number of inputs connected to output j; ignores `a`."""

    key = "flat"
    summary = "flat (input layer): R_i = sum_j R_j / n_j, n_j = number of inputs connected to j"
    input_layer = True
    zero_for_zero_input = False

    def prepare(self, name: str, weight: Tensor, bias: Tensor | None) -> Prepared:
        return {"w_flat": torch.ones_like(weight)}

    def relevance(self, op: LayerOp, w: Prepared, state: LayerState, r: Tensor) -> Tensor:
        return share_by_weight(op, w["w_flat"], state.a, r)


@register
@dataclass(frozen=True)
class WSquare(Rule):
    """w^2: `R_i = sum_j w_ij^2 / sum_i w_ij^2 R_j`; ignores `a`."""

    key = "wsquare"
    summary = "w^2 (input layer): R_i = sum_j w_ij^2 / sum_i w_ij^2 R_j"
    input_layer = True
    zero_for_zero_input = False

    def prepare(self, name: str, weight: Tensor, bias: Tensor | None) -> Prepared:
        return {"w_sq": weight.square()}

    def relevance(self, op: LayerOp, w: Prepared, state: LayerState, r: Tensor) -> Tensor:
        return share_by_weight(op, w["w_sq"], state.a, r)
