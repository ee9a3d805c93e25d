"""The architecture registry (every torchvision classification builder, a compact VGG, and open_clip / timm
backbones behind optional extras, with their input sides) and building its networks with their initial weights:
pretrained (ImageNet for torchvision), random, or a file.

Each entry (`architecture.Architecture`) knows how to build its network with a fresh `num_classes` head
(`smadlrp.detector.heads`), which parameters form that head, its default input side (the crop of torchvision's
default ImageNet weights), the sides it accepts and the input normalisation its weights expect.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm

from smadlrp.core.container import read_tensors
from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.detector.architecture import MIN_SIDE, Architecture
from smadlrp.detector.backbones import LIBRARY_ARCHITECTURES, TIMM_PREFIX, LibraryArchitecture, timm_architecture

Notify = Callable[[str], None]


def default_side(torchvision_name: str) -> int:
    """The crop side, pixels, of the default ImageNet weights of a torchvision builder."""
    return int(tvm.get_model_weights(torchvision_name).DEFAULT.transforms().crop_size[0])


def _family(names: Iterable[str], head_layers: tuple[str, ...], **fields: Any) -> dict[str, Architecture]:
    """Entries for torchvision builders that share a head layout and size rule."""
    return {name: Architecture(name, default_side(name), head_layers, torchvision_name=name, **fields)
            for name in names}


def _vit(name: str, patch: int) -> dict[str, Architecture]:
    """A Vision Transformer entry: built for one side, a multiple of its patch and at least MIN_SIDE."""
    return _family([name], ("heads.head",), side_bound="vit", size_step=patch,
                   size_step_reason=f"its {patch} px patch", min_size=math.ceil(MIN_SIDE / patch) * patch)


_MAXVIT_PARTITION = 7  # px, maxvit_t's attention window and grid on its 1/32 feature map
_MAXVIT_STEP = 32 * _MAXVIT_PARTITION

ARCHITECTURES: dict[str, Architecture] = {
    "vgg_compact": Architecture("vgg_compact", 64, ("classifier",), min_size=16),
    **_family(("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"),
              ("classifier.6",)),
    **_family(("alexnet",), ("classifier.6",), min_size=63),
    **_family(("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
               "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"), ("fc",)),
    **_family(("squeezenet1_0", "squeezenet1_1"), ("classifier.1",)),
    **_family(("densenet121", "densenet161", "densenet169", "densenet201"), ("classifier",)),
    # transform_input: the ImageNet-normalised input is mapped to the normalisation the weights were trained
    # with; always on, so that a network rebuilt from a checkpoint computes what it computed in training
    **_family(("inception_v3",), ("fc", "AuxLogits.fc"), min_size=75,
              options={"aux_logits": True, "init_weights": False, "transform_input": True}),
    # without its auxiliary classifiers GoogLeNet returns plain logits in training mode too
    **_family(("googlenet",), ("fc",), options={"aux_logits": False, "init_weights": False, "transform_input": True}),
    **_family(("mobilenet_v2", "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3"), ("classifier.1",)),
    **_family(("mobilenet_v3_large", "mobilenet_v3_small"), ("classifier.3",)),
    **_family([f"efficientnet_b{i}" for i in range(8)] + ["efficientnet_v2_s", "efficientnet_v2_m",
                                                         "efficientnet_v2_l"], ("classifier.1",)),
    **_family([f"regnet_{kind}_{flops}" for kind in "xy" for flops in ("400mf", "800mf", "1_6gf", "3_2gf", "8gf",
                                                                         "16gf", "32gf")] + ["regnet_y_128gf"],
              ("fc",)),
    **_family(("shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0"), ("fc",)),
    **_family(("convnext_tiny", "convnext_small", "convnext_base", "convnext_large"), ("classifier.2",)),
    **_family(("swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b"), ("head",)),
    **_family(("maxvit_t",), ("classifier.5",), side_bound="maxvit", min_size=_MAXVIT_STEP, size_step=_MAXVIT_STEP,
              size_step_reason=f"{_MAXVIT_STEP} px (32 x its {_MAXVIT_PARTITION} px partition)"),
    **_vit("vit_b_16", 16), **_vit("vit_b_32", 32), **_vit("vit_l_16", 16), **_vit("vit_l_32", 32),
    **_vit("vit_h_14", 14),
}

ARCHITECTURES.update(LIBRARY_ARCHITECTURES)

# torchvision classification builders left out of the registry: name -> why
REFUSED: dict[str, str] = {}


def get_architecture(name: str) -> Architecture:
    """Look up a registry entry, or a timm model by `timm/NAME` (with the timm extra); UsageError listing the
    known names otherwise."""
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    if name.startswith(TIMM_PREFIX):
        return timm_architecture(name)
    reason = f" ({REFUSED[name]})" if name in REFUSED else ""
    raise UsageError(f"unknown architecture {name!r}{reason}; choose one of: {', '.join(ARCHITECTURES)}, "
                     f"or {TIMM_PREFIX}NAME for a timm model")


def is_architecture(name: object) -> bool:
    """Whether `name` names a registry entry or a well-formed `timm/NAME` (without importing timm)."""
    return isinstance(name, str) and (name in ARCHITECTURES or (name.startswith(TIMM_PREFIX) and
                                                                len(name) > len(TIMM_PREFIX)))


RANDOM_INIT = "random initialisation"  # the weights source of a model built without pretrained weights
WEIGHT_CHOICES = ("auto", "pretrained", "imagenet", "none")  # `--weights` values that name no file


def build_model(arch_name: str, num_classes: int, weights: str = "auto", notify: Notify = lambda _msg: None,
                image_size: int | None = None) -> tuple[nn.Module, str]:
    """Build `arch_name` with a `num_classes` head and initial weights for `image_size` px inputs (None: the
    architecture's default side); return (model, weights source).

    `weights`: "pretrained" or its older name "imagenet" (the library's weights: torchvision's ImageNet weights,
    open_clip's or timm's pretrained tag; needs the file cached or a network), "none" (random initialisation),
    "auto" (pretrained when cached, else random with a notice), or a path to a local `.safetensors` / state-dict
    `.pth` file of the same architecture.
    """
    arch = get_architecture(arch_name)
    side = arch.input_size if image_size is None else image_size
    if weights == "none":
        return arch.build(num_classes, image_size=side), RANDOM_INIT
    if weights == "auto":
        if arch.pretrained_cached():
            return _build_pretrained(arch, num_classes, side), f"{arch.pretrained_name}, cached"
        notify(f"no cached pretrained weights for {arch.name}: starting from random initialisation "
               "(use --weights pretrained or --weights FILE to change this)")
        return arch.build(num_classes, image_size=side), RANDOM_INIT
    if weights in ("pretrained", "imagenet"):
        return _build_pretrained(arch, num_classes, side), arch.pretrained_name
    path = Path(weights)
    if isinstance(arch, LibraryArchitecture):  # the library reads its own files (key names, embedding sizes)
        return _build_from_library_file(arch, num_classes, path, side), f"file {path.name}"
    model = arch.build(num_classes, image_size=side)
    load_weights_file(model, arch, path, side)
    return model, f"file {path.name}"


def _build_from_library_file(arch: LibraryArchitecture, num_classes: int, path: Path, side: int) -> nn.Module:
    """A file in smadlrp's own layout and sizes (a checkpoint or state dict of this entry) loads as it is; any other
    goes through the library's loader (its key names, embeddings of another input side)."""
    state = read_state_dict(path)
    model = arch.build(num_classes, image_size=side)
    own = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(arch.head)}
    if all(k in state and state[k].shape == shape for k, shape in own.items()):
        load_compatible_state(model, arch, state, source=str(path), head_optional=True)
        return model
    try:
        return arch.build(num_classes, image_size=side, weights_file=path)
    except (SmadlrpError, UsageError):
        raise
    except Exception as exc:  # noqa: BLE001 - each library fails in its own way on a file of another model
        problem = " ".join(f"{exc.__class__.__name__}: {exc}".split())[:160]
        raise SmadlrpError(f"{path} does not hold {arch.name} weights that {arch.library} can read ({problem})") \
            from None


def _build_pretrained(arch: Architecture, num_classes: int, image_size: int) -> nn.Module:
    try:
        return arch.build(num_classes, pretrained=True, image_size=image_size)
    except (SmadlrpError, UsageError):
        raise
    except Exception as exc:  # noqa: BLE001 - a download fails in each library's own way (URLError, hub errors)
        raise SmadlrpError(
            f"cannot get the pretrained weights of {arch.name} ({exc.__class__.__name__}: offline?); "
            f"{arch.offline_hint()}, or use --weights none or --weights FILE"
        ) from exc


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from `.safetensors` or a torchvision `.pth` (with `weights_only=True`: no code runs)."""
    if not path.is_file():
        raise SmadlrpError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return read_tensors(path)
    from smadlrp.detector.importing import load_pth  # it builds checkpoints, which build models: import late

    return load_pth(path, advice="convert it with `smadlrp import-model --trust-pickle` first")[0]


def load_weights_file(model: nn.Module, arch: Architecture, path: Path, image_size: int | None = None) -> None:
    """Load a local weights file into `model` (a fresh `arch` network for `image_size` px, None: the default side);
    the head is kept fresh when its size differs, and a ViT's positional embedding is fitted to `image_size`.

    Names must match the architecture exactly; a shape mismatch outside the head means another architecture.
    """
    side = arch.input_size if image_size is None else image_size
    load_compatible_state(model, arch, read_state_dict(path), source=str(path), image_size=side, head_optional=True)


def load_compatible_state(model: nn.Module, arch: Architecture, state: dict[str, torch.Tensor], source: str,
                          image_size: int | None = None, head_optional: bool = False) -> None:
    """Copy `state` into `model`, refusing tensors that do not fit `arch` (SmadlrpError naming them); with
    `image_size`, the side `model` was built for, `state` is first fitted to it (`Architecture.fit_state`); with
    `head_optional`, a state without the head's tensors (a backbone file) leaves the fresh head as it is."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if image_size is not None:
        state = arch.fit_state(state, image_size)
    own = model.state_dict()
    missing = sorted(k for k in set(own) - set(state) if not (head_optional and k.startswith(arch.head)))
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

