"""Normalisation layers with sigma held constant: the map whose Jacobian `NormFunction` shares relevance with.

For LayerNorm, GroupNorm, RMSNorm and `F.normalize`, `frozen(call)` returns `x -> (C x) / sigma * w`: the centring
C (none for RMSNorm and `F.normalize`), sigma computed from the detached input (a constant of the forward pass),
the scale w, and no bias (which absorbs its share of relevance like any bias). Its value differs from the layer's
output only by the bias; its Jacobian is the one of the linearised layer (AttnLRP, Prop. 3.4).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smadlrp.core.errors import UsageError
from smadlrp.lrp.op_kinds import NodeCall

NORM_MODULES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
NORM_FUNCTIONS: tuple[Any, ...] = (F.layer_norm, F.group_norm, F.rms_norm, F.normalize)


def _scaled(t: Tensor, weight: Tensor | None, dtype: torch.dtype, channel_first: bool = False) -> Tensor:
    if weight is None:
        return t
    w = weight.detach().to(dtype)
    return t * (w.view(1, -1, *([1] * (t.dim() - 2))) if channel_first else w)


def frozen_layer_norm(shape: tuple[int, ...], weight: Tensor | None, eps: float, dtype: torch.dtype
                      ) -> Callable[[Tensor], Tensor]:
    """`x -> (x - mean) / sigma * w` over the last len(shape) dims, sigma from the detached x."""
    dims = tuple(range(-len(shape), 0))

    def f(x: Tensor) -> Tensor:
        sigma = torch.sqrt(x.detach().var(dims, unbiased=False, keepdim=True) + eps)
        return _scaled((x - x.mean(dims, keepdim=True)) / sigma, weight, dtype)

    return f


def frozen_group_norm(groups: int, weight: Tensor | None, eps: float, dtype: torch.dtype
                      ) -> Callable[[Tensor], Tensor]:
    """`x -> (x - mean) / sigma * w` per group of channels (dim 1), sigma from the detached x."""

    def f(x: Tensor) -> Tensor:
        g = x.reshape(x.shape[0], groups, -1)
        sigma = torch.sqrt(g.detach().var(-1, unbiased=False, keepdim=True) + eps)
        return _scaled(((g - g.mean(-1, keepdim=True)) / sigma).reshape(x.shape), weight, dtype, channel_first=True)

    return f


def frozen_rms_norm(shape: tuple[int, ...], weight: Tensor | None, eps: float | None, dtype: torch.dtype
                    ) -> Callable[[Tensor], Tensor]:
    """`x -> x / rms * w` over the last len(shape) dims, rms from the detached x."""
    dims = tuple(range(-len(shape), 0))

    def f(x: Tensor) -> Tensor:
        e = torch.finfo(x.dtype).eps if eps is None else eps
        return _scaled(x / torch.sqrt(x.detach().pow(2).mean(dims, keepdim=True) + e), weight, dtype)

    return f


def frozen_normalize(p: float, dim: int, eps: float) -> Callable[[Tensor], Tensor]:
    """`x -> x / max(||x||_p, eps)` along `dim`, the norm from the detached x."""

    def f(x: Tensor) -> Tensor:
        return x / x.detach().norm(p, dim, keepdim=True).clamp_min(eps)

    return f


def _bound(function: Callable[..., Any], call: NodeCall) -> dict[str, Any]:
    bound = inspect.signature(function).bind(*call.args, **call.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def frozen(call: NodeCall) -> Callable[[Tensor], Tensor]:
    """The frozen map of the normalisation node `call` (a module of NORM_MODULES or a NORM_FUNCTIONS call)."""
    m, dtype = call.plain, call.dtype
    if isinstance(m, nn.LayerNorm):
        return frozen_layer_norm(tuple(m.normalized_shape), m.weight, m.eps, dtype)
    if isinstance(m, nn.GroupNorm):
        return frozen_group_norm(m.num_groups, m.weight, m.eps, dtype)
    if isinstance(m, nn.RMSNorm):
        return frozen_rms_norm(tuple(m.normalized_shape), m.weight, m.eps, dtype)
    if m in (F.layer_norm, F.rms_norm, F.group_norm, F.normalize):
        a = _bound(m, call)  # type: ignore[arg-type]
        if m is F.layer_norm:
            return frozen_layer_norm(tuple(a["normalized_shape"]), a["weight"], a["eps"], dtype)
        if m is F.rms_norm:
            return frozen_rms_norm(tuple(a["normalized_shape"]), a["weight"], a["eps"], dtype)
        if m is F.group_norm:
            return frozen_group_norm(a["num_groups"], a["weight"], a["eps"], dtype)
        return frozen_normalize(a["p"], a["dim"], a["eps"])
    raise UsageError(f"no frozen form for normalisation {call.plan.op}")
