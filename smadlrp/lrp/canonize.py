"""Model rewrites that keep the function and make LRP exact, as a list of passes over an eval-mode copy.

A canonization is a function that rewrites a model in place and says whether it changed anything
(`Canonization`); `CANONIZATIONS` runs in order: attention written out as explicit nodes (`attention`), a
BatchNorm that also applies its activation split into the two (timm's `BatchNormAct2d`), then BatchNorm folding.
Register another with `CANONIZATIONS.append(...)`.

BatchNorm folding: every BatchNorm folded into the Conv2d/Linear whose output it normalises, and every other
BatchNorm an explicit element-wise affine layer.

A BatchNorm in eval mode is the affine map `y = (x - mean) * g / sqrt(var + eps) + beta`. Folded into the
Conv2d/Linear right before it (`w' = w * g / sqrt(var + eps)`, `b' = (b - mean) * g / sqrt(var + eps) + beta`),
the network computes the same function and relevance is no longer rescaled by `g / sigma` on its way back.
The folded BatchNorm is replaced by a `FoldedBatchNorm` (an `nn.Identity`). "Right before" is read on the
traced graph: the BatchNorm's input is the output of a Conv2d (BatchNorm2d) or Linear (BatchNorm1d) that
feeds nothing else, whichever module owns it (ResNet's downsample branch included). Any other BatchNorm
(DenseNet's BatchNorm -> ReLU -> Conv after a concatenation) becomes an `AffineBatchNorm`, `y = s x + t`, which
the engine explains with the z-rule. Every Conv2d/Linear keeps its qualified name.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx, nn

from smadlrp.core.errors import UsageError
from smadlrp.lrp.attention import explicit_attention
from smadlrp.lrp.tracing import LeafModule, trace_model

# Which layer a BatchNorm must directly follow (its input is that layer's output) to be folded.
FOLDS_INTO: dict[type[nn.Module], type[nn.Module]] = {nn.BatchNorm2d: nn.Conv2d, nn.BatchNorm1d: nn.Linear}


class FoldedBatchNorm(LeafModule, nn.Identity):
    """What remains of a BatchNorm after folding it into the layer `folded_into` (qualified name)."""

    def __init__(self, folded_into: str) -> None:
        super().__init__()
        self.folded_into = folded_into

    def extra_repr(self) -> str:
        return f"folded into {self.folded_into!r}"


class AffineBatchNorm(LeafModule, nn.Module):
    """An eval-mode BatchNorm that cannot be folded, as the element-wise affine map `y = scale * x + shift`
    (per channel, channels in dimension 1; scale and shift are buffers of shape (C,))."""

    lrp_kind = "affine"
    scale: Tensor
    shift: Tensor

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, name: str) -> None:
        super().__init__()
        scale, shift = _affine_of(bn, name)
        self.register_buffer("scale", scale.to(bn.running_var.dtype))  # type: ignore[union-attr]
        self.register_buffer("shift", shift.to(bn.running_var.dtype))  # type: ignore[union-attr]
        self.batchnorm_type = type(bn).__name__

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1, *([1] * (x.dim() - 2)))
        return torch.addcmul(self.shift.view(shape), x, self.scale.view(shape))

    def extra_repr(self) -> str:
        return f"{self.batchnorm_type} as y = scale * x + shift, {self.scale.numel()} channels"


Canonization = Callable[[nn.Module], bool]


def canonize(model: nn.Module, *, share_weights: bool = False) -> nn.Module:
    """An eval-mode copy of `model` rewritten by every pass of `CANONIZATIONS` (attention as explicit nodes,
    BatchNorm1d/2d folded into the Conv2d/Linear it follows, or made an `AffineBatchNorm`).

    `model` is never modified. With `share_weights` the copy's parameters that need no folding share storage
    with `model` (read-only, requires_grad False) instead of being copied. UsageError for a model torch.fx
    cannot trace, or a BatchNorm that keeps no running statistics.
    """
    clone = _copy(model, share_weights).eval()
    for canonization in CANONIZATIONS:
        canonization(clone)
    return clone


def fold_batchnorms(model: nn.Module) -> bool:
    """Fold every BatchNorm1d/2d of `model` (in place) into the Conv2d/Linear it follows, or make it an
    `AffineBatchNorm`; True when there was any."""
    graph = trace_model(model)
    modules = dict(model.named_modules())
    calls = {str(n.target): 0 for n in graph.nodes if n.op == "call_module"}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] += 1
    changed = False
    for node in graph.nodes:
        bn = modules.get(str(node.target)) if node.op == "call_module" else None
        if type(bn) not in FOLDS_INTO:
            continue
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
        bn_name = str(node.target)
        layer_name = _foldable_into(node, modules, calls, FOLDS_INTO[type(bn)])
        if layer_name is not None and calls[bn_name] == 1:
            fold_batchnorm(modules[layer_name], bn, bn_name)
            replacement: nn.Module = FoldedBatchNorm(layer_name)
        else:
            replacement = AffineBatchNorm(bn, bn_name)
        parent, _, child = bn_name.rpartition(".")
        setattr(model.get_submodule(parent), child, replacement)
        modules[bn_name] = replacement
        changed = True
    return changed


def _foldable_into(node: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int],
                   wanted: type[nn.Module]) -> str | None:
    """The qualified name of the layer `node` (a BatchNorm call) can be folded into, or None."""
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
        return None
    name = str(source.target)
    layer = modules.get(name)
    if type(layer) is not wanted or calls[name] != 1:
        return None
    bn = modules[str(node.target)]
    assert isinstance(layer, (nn.Conv2d, nn.Linear)) and isinstance(bn, nn.modules.batchnorm._BatchNorm)
    return name if layer.weight.shape[0] == bn.num_features else None


def _affine_of(bn: nn.modules.batchnorm._BatchNorm, name: str) -> tuple[Tensor, Tensor]:
    """(scale, shift) of eval-mode `bn` in float64, shape (C,)."""
    if bn.running_mean is None or bn.running_var is None:
        raise UsageError(
            f"cannot fold {name!r}: it keeps no running statistics (track_running_stats=False), so it "
            "normalises with batch statistics and is not a fixed affine map"
        )
    with torch.no_grad():
        scale = bn.running_var.double().add(bn.eps).rsqrt()
        shift = -bn.running_mean.double() * scale
        if bn.affine:
            scale = scale * bn.weight.double()
            shift = shift * bn.weight.double() + bn.bias.double()
    return scale, shift


def fold_batchnorm(layer: nn.Module, bn: nn.Module, bn_name: str = "BatchNorm") -> None:
    """Fold eval-mode `bn` into `layer` (Conv2d or Linear) in place: new weight and bias parameters."""
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm) and isinstance(layer, (nn.Conv2d, nn.Linear))
    out = layer.weight.shape[0]
    if out != bn.num_features:
        raise UsageError(f"cannot fold {bn_name!r}: it has {bn.num_features} features, the layer before it {out}")
    scale, shift = _affine_of(bn, bn_name)
    with torch.no_grad():
        weight = layer.weight.double()
        bias = scale * layer.bias.double() + shift if layer.bias is not None else shift
        new_weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    requires_grad = layer.weight.requires_grad
    layer.weight = nn.Parameter(new_weight.to(layer.weight.dtype), requires_grad=requires_grad)
    layer.bias = nn.Parameter(bias.to(layer.weight.dtype), requires_grad=requires_grad)


def split_norm_act(model: nn.Module) -> bool:
    """Replace every BatchNorm2d subclass that also applies a dropout and an activation after normalising (timm's
    `BatchNormAct2d`: `act(drop(batch_norm(x)))`) by a plain BatchNorm2d followed by its `drop` and `act` modules,
    in place; True when there was any. The BatchNorm can then be folded and the activation given its rule."""
    replaced = False
    for name, module in list(model.named_modules()):
        drop, act = getattr(module, "drop", None), getattr(module, "act", None)
        if not (isinstance(module, nn.BatchNorm2d) and type(module) is not nn.BatchNorm2d
                and isinstance(drop, nn.Module) and isinstance(act, nn.Module)):
            continue
        plain = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):  # the same tensors
            setattr(plain, key, getattr(module, key))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, nn.Sequential(plain.eval(), drop, act))
        replaced = True
    return replaced


def _copy(model: nn.Module, share_weights: bool) -> nn.Module:
    if not share_weights:
        return copy.deepcopy(model)
    memo: dict[int, Any] = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in model.parameters()}
    memo.update({id(b): b.detach() for b in model.buffers()})
    return copy.deepcopy(model, memo)



CANONIZATIONS: list[Canonization] = [explicit_attention, split_norm_act, fold_batchnorms]
