"""Architecture registry: torchvision builders, classifier-head replacement, weight sources, feature extraction."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm

from smadlrp.core.container import read_tensors
from smadlrp.core.errors import SmadlrpError, UsageError

Notify = Callable[[str], None]


class CompactVGG(nn.Sequential):
    """A small VGG-style network for CPU work, built only from layers the LRP engine explains.

    Input (B, 3, H, W), any H, W >= 16; output logits (B, num_classes). Four Conv3x3-BatchNorm-ReLU-MaxPool2
    blocks, global average pooling, one Linear layer.
    """

    def __init__(self, num_classes: int = 2, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        layers: list[nn.Module] = []
        in_channels = 3
        for width in widths:
            layers += [
                nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            in_channels = width
        super().__init__()
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(in_channels, num_classes)


# Head replacement, as in the PyTorch fine-tuning tutorial (`model` is typed Any: torchvision's attributes vary).
def _head_vgg(model: Any, n: int) -> None:
    model.classifier[6] = nn.Linear(model.classifier[6].in_features, n)


def _head_fc(model: Any, n: int) -> None:
    model.fc = nn.Linear(model.fc.in_features, n)


def _head_squeezenet(model: Any, n: int) -> None:
    model.classifier[1] = nn.Conv2d(512, n, kernel_size=1)


def _head_densenet(model: Any, n: int) -> None:
    model.classifier = nn.Linear(model.classifier.in_features, n)


def _head_inception(model: Any, n: int) -> None:
    model.AuxLogits.fc = nn.Linear(model.AuxLogits.fc.in_features, n)
    model.fc = nn.Linear(model.fc.in_features, n)


def _head_last_linear(model: Any, n: int) -> None:
    """MobileNet and EfficientNet: the classifier is a Sequential ending in its Linear layer."""
    model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, n)


@dataclass(frozen=True)
class Architecture:
    """One registry entry: how to build the network, replace its head, and which parameters form the head.

    Every entry is built from layers and operations the LRP engine explains (tests/test_models.py checks it).
    """

    name: str
    input_size: int  # default square input side, pixels
    head: tuple[str, ...]  # parameter-name prefixes of the replaced head (trained in feature extraction)
    replace_head: Callable[[Any, int], None] | None  # None: built with the right head directly
    torchvision_name: str | None = None  # None: not a torchvision model (no ImageNet weights)

    def build(self, num_classes: int, imagenet: bool = False) -> nn.Module:
        """Build the network with a fresh `num_classes` head; ImageNet weights for the backbone if asked."""
        if self.torchvision_name is None:
            return CompactVGG(num_classes)
        kwargs: dict[str, object] = {"aux_logits": True, "init_weights": False} if self.name == "inception_v3" else {}
        weights = tvm.get_model_weights(self.torchvision_name).DEFAULT if imagenet else None
        model = tvm.get_model(self.torchvision_name, weights=weights, **kwargs)
        assert self.replace_head is not None
        self.replace_head(model, num_classes)
        return model


def _tv(name: str, head: tuple[str, ...], replace: Callable[[Any, int], None], size: int = 224) -> Architecture:
    return Architecture(name, size, head, replace, torchvision_name=name)


ARCHITECTURES: dict[str, Architecture] = {
    "vgg_compact": Architecture("vgg_compact", 64, ("classifier.",), None),
    **{n: _tv(n, ("classifier.6.",), _head_vgg) for n in
       ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")},
    "alexnet": _tv("alexnet", ("classifier.6.",), _head_vgg),
    **{n: _tv(n, ("fc.",), _head_fc) for n in
       ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d")},
    **{n: _tv(n, ("classifier.1.",), _head_squeezenet) for n in ("squeezenet1_0", "squeezenet1_1")},
    **{n: _tv(n, ("classifier.",), _head_densenet) for n in
       ("densenet121", "densenet161", "densenet169", "densenet201")},
    "inception_v3": _tv("inception_v3", ("fc.", "AuxLogits.fc."), _head_inception, size=299),
    "mobilenet_v2": _tv("mobilenet_v2", ("classifier.1.",), _head_last_linear),
    "mobilenet_v3_large": _tv("mobilenet_v3_large", ("classifier.3.",), _head_last_linear),
    "mobilenet_v3_small": _tv("mobilenet_v3_small", ("classifier.3.",), _head_last_linear),
    **{f"efficientnet_b{i}": _tv(f"efficientnet_b{i}", ("classifier.1.",), _head_last_linear, size=size)
       for i, size in enumerate((224, 240, 288, 300))},
}


def get_architecture(name: str) -> Architecture:
    """Look up a registry entry; UsageError listing the known names otherwise."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UsageError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHITECTURES)}") from None


def imagenet_weights_cached(arch: Architecture) -> bool:
    """True when torchvision's ImageNet weights file for `arch` is already in torch's hub cache."""
    if arch.torchvision_name is None:
        return False
    url = tvm.get_model_weights(arch.torchvision_name).DEFAULT.url
    return (Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]).is_file()


RANDOM_INIT = "random initialisation"  # the weights source of a model built without pretrained weights
WEIGHT_CHOICES = ("auto", "imagenet", "none")  # `--weights` values that name no file


def build_model(arch_name: str, num_classes: int, weights: str = "auto",
                notify: Notify = lambda _msg: None) -> tuple[nn.Module, str]:
    """Build `arch_name` with a `num_classes` head and initial weights; return (model, weights source).

    `weights`: "imagenet" (torchvision's weights API; needs the file cached or a network), "none" (random
    initialisation), "auto" (ImageNet when cached, else random with a notice), or a path to a local
    `.safetensors` / torchvision state-dict `.pth` file of the same architecture.
    """
    arch = get_architecture(arch_name)
    if weights == "none":
        return arch.build(num_classes), RANDOM_INIT
    if weights == "auto":
        if imagenet_weights_cached(arch):
            return _build_imagenet(arch, num_classes), "imagenet (torchvision, cached)"
        notify(f"no cached ImageNet weights for {arch.name}: starting from random initialisation "
               "(use --weights imagenet or --weights FILE to change this)")
        return arch.build(num_classes), RANDOM_INIT
    if weights == "imagenet":
        return _build_imagenet(arch, num_classes), "imagenet (torchvision)"
    path = Path(weights)
    model = arch.build(num_classes)
    load_weights_file(model, arch, path)
    return model, f"file {path.name}"


def _build_imagenet(arch: Architecture, num_classes: int) -> nn.Module:
    if arch.torchvision_name is None:
        raise UsageError(f"{arch.name} has no ImageNet weights; use --weights none or --weights FILE")
    try:
        return arch.build(num_classes, imagenet=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; hub wraps some failures in RuntimeError
        raise SmadlrpError(
            f"cannot get ImageNet weights for {arch.name} ({exc.__class__.__name__}: offline?); "
            f"put the file in {Path(torch.hub.get_dir()) / 'checkpoints'}, or use --weights none or --weights FILE"
        ) from exc


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from `.safetensors` or a torchvision `.pth` (with `weights_only=True`: no code runs)."""
    if not path.is_file():
        raise SmadlrpError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return read_tensors(path)
    from smadlrp.detector.importing import load_pth  # it builds checkpoints, which build models: import late

    return load_pth(path, advice="convert it with `smadlrp import-model --trust-pickle` first")[0]


def load_weights_file(model: nn.Module, arch: Architecture, path: Path) -> None:
    """Load a local weights file into `model` (a fresh `arch` network); the head is kept fresh when its size differs.

    Names must match the architecture exactly; a shape mismatch outside the head means another architecture.
    """
    load_compatible_state(model, arch, read_state_dict(path), source=str(path))


def load_compatible_state(model: nn.Module, arch: Architecture, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model`, refusing tensors that do not fit `arch` (SmadlrpError naming them)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise SmadlrpError(
            f"{source} does not hold {arch.name} weights ({len(missing)} tensor(s) missing, {len(unexpected)} "
            f"unexpected, e.g. {example!r}): was it saved from another architecture?"
        )
    keep: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if tensor.shape == own[name].shape:
            keep[name] = tensor
        elif not name.startswith(arch.head):
            raise SmadlrpError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, {arch.name} needs {tuple(own[name].shape)}"
                " (another architecture?)"
            )
    model.load_state_dict(keep, strict=False)


def set_trainable(model: nn.Module, arch: Architecture, full: bool) -> list[nn.Parameter]:
    """Freeze all but the head (feature extraction) or nothing (`full`); return the parameters that train."""
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(full or name.startswith(arch.head))
        if param.requires_grad:
            trainable.append(param)
    return trainable
