"""Backbones from other libraries as registry entries, behind optional extras: open_clip's CLIP image towers
(`pip install 'smadlrp[clip]'`) and timm's models, DINOv2 among them (`pip install 'smadlrp[timm]'`).

Each entry builds its network with a fresh head through the library's own constructor, and loads pretrained
weights through the library's own loading path (the Hugging Face hub cache). Nothing is imported from a library
until one of its networks is built, and a missing library is one line naming the extra.

A CLIP entry is `ClipClassifier`: the image tower, its output projection as a bias-free Linear layer (open_clip
multiplies by a bare matrix, which would give the projection no layer rule), and a fresh Linear head.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import fx, nn

from smadlrp.core.errors import UsageError
from smadlrp.detector.architecture import MIN_SIDE, Architecture
from smadlrp.lrp.op_kinds import NodeView, OpKind, register_op

TIMM_PREFIX = "timm/"
EXTRAS = {"open_clip": "clip", "timm": "timm"}  # library module -> the smadlrp extra that installs it
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's input normalisation, RGB in [0, 1]
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def library(module: str, arch: str) -> ModuleType:
    """Import a backbone library; UsageError naming the extra to install when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{arch} needs the {EXTRAS[module]} extra: pip install 'smadlrp[{EXTRAS[module]}]'") from None


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, where open_clip and timm look for pretrained weights."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


class ClipClassifier(nn.Module):
    """A CLIP image tower with a new head: (B, 3, S, S) normalised images -> (B, num_classes) logits.

    `visual` is open_clip's tower without its output projection; `projection` (width -> embedding, no bias)
    holds that projection, transposed; `head` is the fresh classifier on the embedding.
    """

    def __init__(self, visual: nn.Module, num_classes: int) -> None:
        super().__init__()
        proj = visual.proj  # (width, embedding)
        assert isinstance(proj, torch.Tensor)
        visual.proj = None  # type: ignore[assignment]
        self.visual = visual
        self.projection = nn.Linear(proj.shape[0], proj.shape[1], bias=False)
        with torch.no_grad():
            self.projection.weight.copy_(proj.T)
        self.head = nn.Linear(proj.shape[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.projection(self.visual(x)))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class LibraryArchitecture(Architecture):
    """A registry entry built by open_clip (`library="open_clip"`) or timm (`library="timm"`)."""

    library: str = "timm"
    model_name: str = ""  # the library's model name, e.g. "ViT-B-16" or "vit_small_patch14_dinov2"
    pretrained_tag: str = ""  # open_clip's pretrained tag ("openai"); timm: its default tag
    quick_gelu: bool = False  # open_clip: the QuickGELU activation the OpenAI weights were trained with
    patch: int = 0  # px, a ViT's patch (0: a CNN, any side from MIN_SIDE)

    @property
    def pretrained_name(self) -> str:
        tag = f" {self.pretrained_tag}" if self.pretrained_tag else ""
        return f"{self.library} {self.model_name}{tag}"

    def _module(self) -> ModuleType:
        return library(self.library, self.name)

    def _hub_file(self) -> tuple[str, str]:
        """(Hugging Face repository, file name) of the pretrained weights."""
        if self.library == "open_clip":
            config = self._module().get_pretrained_cfg(self.model_name, self.pretrained_tag)
            return str(config.get("hf_hub", "")).rstrip("/"), "open_clip_pytorch_model.bin"
        config = _timm_config(self._module(), self.model_name)
        return str(config.hf_hub_id or ""), str(config.hf_hub_filename or "model.safetensors")

    def pretrained_cached(self) -> bool:
        repo, file = self._hub_file()
        folder = hub_cache() / f"models--{repo.replace('/', '--')}" / "snapshots"
        return folder.is_dir() and any(folder.glob(f"*/{file}"))

    def offline_hint(self) -> str:
        repo, file = self._hub_file()
        return (f"put {file} of the Hugging Face repository {repo} into {hub_cache()} (huggingface-cli download "
                f"{repo} {file}, on a machine with network)")

    def build(self, num_classes: int, pretrained: bool = False, image_size: int | None = None,
              weights_file: Path | None = None) -> nn.Module:
        """As `Architecture.build`; `weights_file`: load the backbone from this local file through the library's
        own loader (open_clip's or timm's: key conversions, positional embeddings resampled to the side)."""
        side = self.input_size if image_size is None else image_size
        self.check_image_size(side)
        module = self._module()
        with _library_logs_silenced():  # their retries and notices; a failure is raised and said in one line
            if self.library == "open_clip":
                source = str(weights_file) if weights_file else self.pretrained_tag if pretrained else None
                clip = module.create_model(self.model_name, pretrained=source, force_image_size=side,
                                           force_quick_gelu=self.quick_gelu, device=torch.get_default_device())
                return ClipClassifier(clip.visual, num_classes).eval()
            register_timm_ops(module)
            options: dict[str, Any] = {"img_size": side} if self.patch else {}
            if weights_file is not None:
                options["pretrained_cfg_overlay"] = {"file": str(weights_file)}
            return module.create_model(self.model_name, pretrained=pretrained or weights_file is not None,  # type: ignore[no-any-return]
                                       num_classes=num_classes, **options).eval()


@contextmanager
def _library_logs_silenced() -> Iterator[None]:
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)


def _no_mask(value: object) -> bool:
    """A mask argument that is None, or timm's mask resolver called without a mask and not causal."""
    if value is None:
        return True
    if isinstance(value, fx.Node) and getattr(value.target, "__name__", "") == "resolve_self_attn_mask":
        args = list(value.args) + [None] * 4
        return args[2] is None and args[3] in (None, False) and not value.kwargs
    return False


def _accepts_no_mask(view: NodeView) -> bool | str:
    """timm's mask helpers are the identity (or give no mask) when there is no mask."""
    node = view.node
    resolver = getattr(node.target, "__name__", "") == "resolve_self_attn_mask"
    mask = node if resolver else (list(node.args) + [None])[1]
    return True if _no_mask(mask) else "an attention mask has no LRP rule"


@cache
def register_timm_ops(timm: ModuleType) -> None:
    """Let the engine explain timm's explicit attention path: its mask helpers are the identity without a mask."""
    attention = importlib.import_module("timm.layers.attention")
    register_op(OpKind("timm-attention-mask", "the gradient: without a mask, the scores unchanged",
                       functions=(attention.resolve_self_attn_mask, attention.maybe_add_mask), sign="keeps",
                       accepts=_accepts_no_mask))


def _vit_sides(patch: int) -> dict[str, Any]:
    return {"patch": patch, "size_step": patch, "size_step_reason": f"its {patch} px patch",
            "min_size": math.ceil(MIN_SIDE / patch) * patch}


def _clip(name: str, model: str, patch: int) -> LibraryArchitecture:
    return LibraryArchitecture(name, 224, ("head",), library="open_clip", model_name=model, pretrained_tag="openai",
                               quick_gelu=True, mean=CLIP_MEAN, std=CLIP_STD, **_vit_sides(patch))


def _timm(model: str, head: str, patch: int = 0, side: int = 224, tag: str = "") -> LibraryArchitecture:
    return LibraryArchitecture(f"{TIMM_PREFIX}{model}", side, (head,), library="timm", model_name=model,
                               pretrained_tag=tag, **(_vit_sides(patch) if patch else {}))


LIBRARY_ARCHITECTURES: dict[str, Architecture] = {
    entry.name: entry for entry in (
        _clip("clip_vit_b_16", "ViT-B-16", 16),
        _clip("clip_vit_l_14", "ViT-L-14", 14),
        _timm("vit_small_patch14_dinov2", "head", patch=14, tag="lvd142m"),
        _timm("vit_base_patch14_dinov2", "head", patch=14, tag="lvd142m"),
        _timm("efficientnet_b4", "classifier", side=320),
        _timm("hrnet_w18", "classifier"),
    )
}  # fmt: skip


@cache
def timm_architecture(name: str) -> Architecture:
    """The entry of `timm/NAME`, for any timm model with a Linear classifier (sides and mean/std from its
    pretrained configuration); UsageError for an unknown name or a missing extra."""
    model_name = name.removeprefix(TIMM_PREFIX)
    if name in LIBRARY_ARCHITECTURES:
        return LIBRARY_ARCHITECTURES[name]
    timm = library("timm", name)
    if not model_name or not timm.is_model(model_name):
        raise UsageError(f"unknown architecture {name!r}: timm has no model {model_name!r} (timm.list_models() "
                         "lists them)")
    config = _timm_config(timm, model_name)
    patch = re.search(r"patch(\d+)", model_name)  # timm names its ViTs by patch, e.g. vit_base_patch16_224
    return LibraryArchitecture(name, int(config.input_size[-1]), (str(config.classifier),), library="timm",
                               model_name=model_name, pretrained_tag=str(config.tag or ""), mean=tuple(config.mean),
                               std=tuple(config.std), **(_vit_sides(int(patch.group(1))) if patch else {}))


def _timm_config(timm: ModuleType, model_name: str) -> Any:
    """timm's default pretrained configuration of `model_name` (hub repository, input size, mean/std, head)."""
    return timm.models.get_pretrained_cfg(model_name)
