"""Classifier heads: replacing a network's output layers by fresh ones with another number of classes."""

from __future__ import annotations

from torch import nn


def fresh_output_layer(old: nn.Module, outputs: int) -> nn.Module:
    """A new layer like `old` (a Linear, or a 1x1 Conv2d as in SqueezeNet) with `outputs` outputs and PyTorch's
    default initialisation (never all zeros, unlike torchvision's ViT head)."""
    if isinstance(old, nn.Linear):
        return nn.Linear(old.in_features, outputs, bias=old.bias is not None)
    if isinstance(old, nn.Conv2d) and old.kernel_size == (1, 1) and old.stride == (1, 1) and old.padding == (0, 0):
        return nn.Conv2d(old.in_channels, outputs, kernel_size=1, bias=old.bias is not None)
    raise TypeError(f"cannot replace the output layer {old}: only a Linear or a 1x1 Conv2d")


def replace_heads(model: nn.Module, layers: tuple[str, ...], outputs: int) -> None:
    """Replace each output layer of `model` at the module paths `layers` (e.g. "classifier.6", "fc") by a fresh one
    with `outputs` outputs, created on the default device."""
    for path in layers:
        parent_path, _, attribute = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, attribute, fresh_output_layer(parent.get_submodule(attribute), outputs))
