"""An independent reference for LRP-0 on transformers: the network linearised at its input.

Inside `linearised()`, torch's own layers compute with every normalisation's sigma, every activation's gain
f(x)/x, every gate and every attention probability detached: the forward value is unchanged, and the network is
linear in its input and its additive terms, so gradient x input of that network is what LRP-0 with CP attention
must return. Nothing here uses smadlrp.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor


def _gain(f: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def frozen(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        y = f(x.clone(), *args, **kwargs)  # an in-place activation must not change x
        gain = torch.where(x == 0, torch.zeros_like(x), y / torch.where(x == 0, torch.ones_like(x), x))
        return x * gain.detach()

    return frozen


def _layer_norm(x: Tensor, shape: Any, weight: Tensor | None = None, bias: Tensor | None = None,
                eps: float = 1e-5) -> Tensor:
    dims = tuple(range(-len(shape), 0))
    y = (x - x.mean(dims, keepdim=True)) / torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + eps).detach()
    return y * (1 if weight is None else weight) + (0 if bias is None else bias)


def _normalize(x: Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12, out: Any = None) -> Tensor:
    return x / x.norm(p, dim, keepdim=True).clamp_min(eps).detach()


def _softmax(x: Tensor, dim: int | None = None, *args: Any, **kwargs: Any) -> Tensor:
    return torch.softmax(x.detach(), dim=dim).detach()


def _attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
               is_causal: bool = False, scale: float | None = None, **_: Any) -> Tensor:
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if attn_mask is not None:
        scores = scores + attn_mask
    return torch.softmax(scores, -1).detach() @ v


@contextlib.contextmanager
def linearised(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """torch's layers linearised at the forward pass (see the module docstring)."""
    sigmoid, hardsigmoid = torch.sigmoid, F.hardsigmoid
    with monkeypatch.context() as m:
        for name in ("gelu", "silu", "hardswish", "mish", "relu6", "hardtanh"):  # nn.ReLU6 calls F.hardtanh
            m.setattr(F, name, _gain(getattr(F, name)))
        m.setattr(torch, "tanh", _gain(torch.tanh))
        m.setattr(torch, "sigmoid", lambda x, *a, **k: sigmoid(x).detach())
        m.setattr(F, "hardsigmoid", lambda x, *a, **k: hardsigmoid(x).detach())
        m.setattr(F, "layer_norm", _layer_norm)
        m.setattr(F, "normalize", _normalize)
        m.setattr(F, "softmax", _softmax)
        m.setattr(F, "scaled_dot_product_attention", _attention)
        yield
