"""Normalisation layers with sigma held constant: the linear map whose Jacobian `NormFunction` shares relevance
with.

LayerNorm, GroupNorm, RMSNorm and `F.normalize` compute `y = C(x) * (w / sigma) + b`: C the centring (subtracting
the mean over the normalised dims; none for RMSNorm and `F.normalize`), sigma from x, w the scale and b the bias.
With sigma a constant of the forward pass the layer is `x -> C(x) * w / sigma` plus b (AttnLRP, Prop. 3.4). C is
symmetric, so the vector-Jacobian product of that map is `C(v * w / sigma)`: no autograd, no second pass over x.
`freeze(call, x)` computes the layer's output with one fused kernel where torch has one, and its `FrozenNorm`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smadlrp.core.errors import UsageError
from smadlrp.lrp.op_kinds import NodeCall
from smadlrp.lrp.ops import batched

NORM_MODULES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
NORM_FUNCTIONS: tuple[Any, ...] = (F.layer_norm, F.group_norm, F.rms_norm, F.normalize)


@dataclass(frozen=True)
class FrozenNorm:
    """`x -> C(x) * rstd * weight`: `rstd` (1 / sigma) and `weight` (w) broadcast against x and kept apart (their
    product would be the size of x), C the subtraction of the mean over `dims` (none when `dims` is empty) after
    viewing x as `groups` groups per sample (GroupNorm; 0: x as it is)."""

    rstd: Tensor
    weight: Tensor | float = 1.0
    dims: tuple[int, ...] = ()
    groups: int = 0

    def centre(self, t: Tensor) -> Tensor:
        """C(t): t minus its mean over the normalised dims (t itself without centring)."""
        if not self.dims:
            return t
        g = t.reshape(t.shape[0], self.groups, -1) if self.groups else t
        return (g - g.mean(self.dims, keepdim=True)).reshape(t.shape)

    def __call__(self, x: Tensor) -> Tensor:
        return self.centre(x) * self.rstd * self.weight

    def vjp(self, v: Tensor, overwrite: bool = False) -> Tensor:
        """`J^T v = C(v * rstd * weight)` (C is symmetric); `overwrite`: v is a temporary the result may take."""
        if batched(v) or not v.is_contiguous():
            return self.centre(v * self.rstd * self.weight)
        v = v.mul_(self.rstd) if overwrite else v * self.rstd
        v.mul_(self.weight)
        if self.dims:
            g = v.view(v.shape[0], self.groups, -1) if self.groups else v
            g.sub_(g.mean(self.dims, keepdim=True))
        return v


def _weight(weight: Tensor | None, dtype: torch.dtype) -> Tensor | float:
    return 1.0 if weight is None else weight.detach().to(dtype)


def _layer_norm(x: Tensor, shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None, eps: float
                ) -> tuple[Tensor, FrozenNorm]:
    w = None if weight is None else weight.to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    y, _, rstd = torch.native_layer_norm(x, list(shape), w, b, eps)
    return y, FrozenNorm(rstd, _weight(weight, x.dtype), tuple(range(-len(shape), 0)))


def _group_norm(x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
                ) -> tuple[Tensor, FrozenNorm]:
    batch, channels = x.shape[:2]
    w = None if weight is None else weight.to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    y, _, rstd = torch.native_group_norm(x, w, b, batch, channels, x[0, 0].numel(), groups, eps)
    per_channel = rstd.repeat_interleave(channels // groups, dim=1).view(batch, channels, *([1] * (x.dim() - 2)))
    w_view = _weight(weight, x.dtype)
    if isinstance(w_view, Tensor):
        w_view = w_view.view(1, channels, *([1] * (x.dim() - 2)))
    return y, FrozenNorm(per_channel, w_view, (-1,), groups)


def _rms_norm(x: Tensor, shape: tuple[int, ...], weight: Tensor | None, eps: float | None
              ) -> tuple[Tensor, FrozenNorm]:
    dims = tuple(range(-len(shape), 0))
    e = torch.finfo(x.dtype).eps if eps is None else eps
    rstd = torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + e)
    frozen = FrozenNorm(rstd, _weight(weight, x.dtype))
    return frozen(x), frozen


def _normalize(x: Tensor, p: float, dim: int, eps: float) -> tuple[Tensor, FrozenNorm]:
    frozen = FrozenNorm(1.0 / x.norm(p, dim, keepdim=True).clamp_min(eps))
    return frozen(x), frozen


def _bound(function: Callable[..., Any], call: NodeCall) -> dict[str, Any]:
    bound = inspect.signature(function).bind(*call.args, **call.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def freeze(call: NodeCall, x: Tensor) -> tuple[Tensor, FrozenNorm]:
    """The output of the normalisation node `call` (a module of NORM_MODULES or a NORM_FUNCTIONS call) for `x`,
    computed without autograd, and its frozen linear map."""
    m = call.plain
    with torch.no_grad():
        if isinstance(m, nn.LayerNorm):
            return _layer_norm(x, tuple(m.normalized_shape), m.weight, m.bias, m.eps)
        if isinstance(m, nn.GroupNorm):
            return _group_norm(x, m.num_groups, m.weight, m.bias, m.eps)
        if isinstance(m, nn.RMSNorm):
            return _rms_norm(x, tuple(m.normalized_shape), m.weight, m.eps)
        if m is F.layer_norm:
            a = _bound(m, call)
            return _layer_norm(x, tuple(a["normalized_shape"]), a["weight"], a["bias"], a["eps"])
        if m is F.group_norm:
            a = _bound(m, call)
            return _group_norm(x, a["num_groups"], a["weight"], a["bias"], a["eps"])
        if m is F.rms_norm:
            a = _bound(m, call)
            return _rms_norm(x, tuple(a["normalized_shape"]), a["weight"], a["eps"])
        if m is F.normalize:
            a = _bound(m, call)
            return _normalize(x, a["p"], a["dim"], a["eps"])
    raise UsageError(f"no frozen form for normalisation {call.plan.op}")
