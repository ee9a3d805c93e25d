"""A registry entry's type: how to build one network for an input side, with its head, sides and normalisation;
and the compact VGG, smadlrp's own small network."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from unittest import mock

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models import regnet
from torchvision.models.vision_transformer import interpolate_embeddings

from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.data.loading import IMAGENET_MEAN, IMAGENET_STD
from smadlrp.detector.heads import replace_heads

MIN_SIDE = 32  # px, the smallest input side offered for a torchvision network (its usual 32x reduction to 1 px)
POSITION_EMBEDDING = "encoder.pos_embedding"  # ViT's (1, 1 + patches, width) tensor, sized for one input side


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


@dataclass(frozen=True)
class Architecture:
    """One registry entry: how to build the network for an input side, and which layers form its replaced head.

    Every entry is meant to be built from layers and operations the LRP engine explains (tests/test_models.py).
    """

    name: str
    input_size: int  # default square input side, pixels
    head_layers: tuple[str, ...]  # module paths of the classifier layers replaced by fresh `num_classes` ones
    torchvision_name: str | None = None  # None: not a torchvision model (no ImageNet weights)
    min_size: int = MIN_SIDE  # smallest accepted side, pixels
    size_step: int = 1  # accepted sides are multiples of this, pixels
    size_step_reason: str = ""  # what `size_step` is, after "a multiple of", e.g. "its 16 px patch"
    side_bound: Literal["vit", "maxvit"] | None = None  # built for one side (the builder takes it)
    options: Mapping[str, object] = field(default_factory=dict)  # further torchvision builder keywords
    mean: tuple[float, ...] = tuple(IMAGENET_MEAN)  # the input normalisation its weights expect, RGB in [0, 1]
    std: tuple[float, ...] = tuple(IMAGENET_STD)

    @property
    def head(self) -> tuple[str, ...]:
        """Parameter-name prefixes of the replaced head (the parameters trained in feature extraction)."""
        return tuple(f"{layer}." for layer in self.head_layers)

    def size_problem(self, size: int) -> str | None:
        """Why this network cannot take `size` x `size` px inputs, e.g. "vit_b_16 needs a multiple of its 16 px
        patch"; None when it can."""
        if size < self.min_size:
            return f"{self.name} needs at least {self.min_size} px"
        if size % self.size_step:
            return f"{self.name} needs a multiple of {self.size_step_reason}"
        return None

    def check_image_size(self, size: int) -> None:
        """UsageError "--image-size SIZE: NAME needs ..." when the network cannot take `size` px inputs."""
        problem = self.size_problem(size)
        if problem is not None:
            raise UsageError(f"--image-size {size}: {problem}")

    @property
    def pretrained_name(self) -> str:
        """What `--weights pretrained` loads, e.g. "imagenet (torchvision)"."""
        return "imagenet (torchvision)"

    def pretrained_cached(self) -> bool:
        """True when the pretrained weights file is already in the library's cache (no download needed)."""
        if self.torchvision_name is None:
            return False
        url = tvm.get_model_weights(self.torchvision_name).DEFAULT.url
        return (Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]).is_file()

    def offline_hint(self) -> str:
        """Where to put the pretrained weights file by hand, for a machine without network."""
        return f"put the file in {Path(torch.hub.get_dir()) / 'checkpoints'}"

    def build(self, num_classes: int, pretrained: bool = False, image_size: int | None = None) -> nn.Module:
        """The network for (B, 3, S, S) inputs, S = `image_size` px (None: `input_size`), returning (B,
        `num_classes`) logits in eval mode, with pretrained weights for everything but the fresh head if asked."""
        side = self.input_size if image_size is None else image_size
        self.check_image_size(side)
        if self.torchvision_name is None:
            if pretrained:
                raise UsageError(f"{self.name} has no pretrained weights; use --weights none or --weights FILE")
            return CompactVGG(num_classes)
        options = self.builder_options(side)
        weights = tvm.get_model_weights(self.torchvision_name).DEFAULT if pretrained else None
        with _regnet_widths_on_cpu():
            if weights is not None and self.side_bound is not None and side != weights.meta["min_size"][0]:
                model = tvm.get_model(self.torchvision_name, weights=None, **options)
                model.load_state_dict(self.fit_state(weights.get_state_dict(progress=True, check_hash=True), side))
            else:
                model = tvm.get_model(self.torchvision_name, weights=weights, **options)
        replace_heads(model, self.head_layers, num_classes)
        return model

    def builder_options(self, side: int) -> dict[str, object]:
        """The torchvision builder keywords of this entry for `side` px inputs (a side-bound network takes it)."""
        if self.side_bound == "vit":
            return {**self.options, "image_size": side}
        if self.side_bound == "maxvit":
            return {**self.options, "input_size": (side, side)}
        return dict(self.options)

    def fit_state(self, state: Mapping[str, torch.Tensor], image_size: int) -> dict[str, torch.Tensor]:
        """`state` made to fit this network built for `image_size` px: a ViT's positional embedding, (1, 1 +
        patches, width), is interpolated over the grid of its `size_step` px patches with torchvision's
        `interpolate_embeddings` (bicubic); every other tensor, and every other architecture's state, is returned
        as it is."""
        if self.side_bound != "vit" or POSITION_EMBEDDING not in state:
            return dict(state)
        try:
            return dict(interpolate_embeddings(image_size, self.size_step, OrderedDict(state)))
        except ValueError as exc:
            raise SmadlrpError(f"cannot fit the {self.name} positional embedding of shape "
                               f"{tuple(state[POSITION_EMBEDDING].shape)} to {image_size} px: {exc}") from None


@contextmanager
def _regnet_widths_on_cpu() -> Iterator[None]:
    """Let torchvision's RegNet builders run while the default device is `meta`: they compute their stage widths
    with tensors on the default device and read them back as numbers, which meta tensors cannot do; those
    tensors are made on the CPU instead (nothing changes on any other device)."""
    if torch.get_default_device().type != "meta":
        yield
        return
    compute_widths = regnet.BlockParams.from_init_params

    def on_cpu(*args: Any, **kwargs: Any) -> regnet.BlockParams:
        with torch.device("cpu"):
            return compute_widths(*args, **kwargs)

    with mock.patch.object(regnet.BlockParams, "from_init_params", staticmethod(on_cpu)):
        yield
