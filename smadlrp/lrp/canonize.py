"""Model rewrites that keep the function and make LRP exact: an eval-mode copy with every BatchNorm folded.

A BatchNorm in eval mode is the affine map `y = (x - mean) * g / sqrt(var + eps) + beta`. Folded into the
Conv2d/Linear right before it (`w' = w * g / sqrt(var + eps)`, `b' = (b - mean) * g / sqrt(var + eps) + beta`),
the network computes the same function and relevance is no longer rescaled by `g / sigma` on its way back.
The BatchNorm is replaced by a `FoldedBatchNorm` (an `nn.Identity`); every Conv2d/Linear keeps its qualified name.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from smadlrp.core.errors import UsageError

# Which layer a BatchNorm must directly follow (as the previous sibling in its parent) to be folded.
FOLDS_INTO: dict[type[nn.Module], type[nn.Module]] = {nn.BatchNorm2d: nn.Conv2d, nn.BatchNorm1d: nn.Linear}


class FoldedBatchNorm(nn.Identity):
    """What remains of a BatchNorm after folding it into the layer `folded_into` (qualified name)."""

    def __init__(self, folded_into: str) -> None:
        super().__init__()
        self.folded_into = folded_into

    def extra_repr(self) -> str:
        return f"folded into {self.folded_into!r}"


def canonize(model: nn.Module, *, share_weights: bool = False) -> nn.Module:
    """An eval-mode copy of `model` with every BatchNorm1d/2d folded into the Conv2d/Linear it follows.

    `model` is never modified. With `share_weights` the copy's parameters that need no folding share storage
    with `model` (read-only, requires_grad False) instead of being copied. UsageError for a BatchNorm that does
    not directly follow a Conv2d (BatchNorm2d) or Linear (BatchNorm1d) with matching channels, or that keeps no
    running statistics.
    """
    clone = _copy(model, share_weights).eval()
    for parent_name, parent in list(clone.named_modules()):
        children = list(parent.named_children())
        for position, (child_name, child) in enumerate(children):
            if type(child) not in FOLDS_INTO:
                continue
            bn_name = _join(parent_name, child_name)
            previous = children[position - 1] if position else None
            wanted = FOLDS_INTO[type(child)]
            if previous is None or type(previous[1]) is not wanted:
                raise UsageError(
                    f"cannot fold {type(child).__name__} {bn_name!r}: it does not directly follow a "
                    f"{wanted.__name__} in its parent module"
                )
            layer_name = _join(parent_name, previous[0])
            fold_batchnorm(previous[1], child, bn_name)
            setattr(parent, child_name, FoldedBatchNorm(layer_name))
    return clone


def fold_batchnorm(layer: nn.Module, bn: nn.Module, bn_name: str = "BatchNorm") -> None:
    """Fold eval-mode `bn` into `layer` (Conv2d or Linear) in place: new weight and bias parameters."""
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm) and isinstance(layer, (nn.Conv2d, nn.Linear))
    if bn.running_mean is None or bn.running_var is None:
        raise UsageError(
            f"cannot fold {bn_name!r}: it keeps no running statistics (track_running_stats=False), so it "
            "normalises with batch statistics and is not a fixed affine map"
        )
    out = layer.weight.shape[0]
    if out != bn.num_features:
        raise UsageError(f"cannot fold {bn_name!r}: it has {bn.num_features} features, the layer before it {out}")
    with torch.no_grad():
        weight = layer.weight.double()
        scale = bn.running_var.double().add(bn.eps).rsqrt()
        shift = -bn.running_mean.double() * scale
        if bn.affine:
            scale = scale * bn.weight.double()
            shift = shift * bn.weight.double() + bn.bias.double()
        bias = scale * layer.bias.double() + shift if layer.bias is not None else shift
        new_weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    requires_grad = layer.weight.requires_grad
    layer.weight = nn.Parameter(new_weight.to(layer.weight.dtype), requires_grad=requires_grad)
    layer.bias = nn.Parameter(bias.to(layer.weight.dtype), requires_grad=requires_grad)


def _copy(model: nn.Module, share_weights: bool) -> nn.Module:
    if not share_weights:
        return copy.deepcopy(model)
    memo: dict[int, Any] = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in model.parameters()}
    memo.update({id(b): b.detach() for b in model.buffers()})
    return copy.deepcopy(model, memo)


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child
