"""The architecture registry: every torchvision classification builder is offered (or refused with a reason),
builds with its head replaced, takes the input sides it claims, and is explainable by the LRP engine."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models import regnet

from smadlrp.core.errors import UsageError
from smadlrp.detector.architecture import POSITION_EMBEDDING
from smadlrp.detector.checkpoint import CheckpointMeta
from smadlrp.detector.models import (
    ARCHITECTURES,
    REFUSED,
    get_architecture,
    load_compatible_state,
    set_trainable,
)
from smadlrp.detector.train import TrainConfig
from smadlrp.lrp import check_supported

IMAGENET_CLASSES = 1000
# one entry per head layout and size rule: these build in the fast loop, every other entry only in the slow one
QUICK = {"vgg_compact", "alexnet", "resnet18", "squeezenet1_1", "densenet121", "inception_v3", "googlenet",
         "mobilenet_v3_small", "mnasnet0_5", "efficientnet_b0", "regnet_x_400mf", "shufflenet_v2_x0_5",
         "convnext_tiny", "swin_t", "swin_v2_t", "maxvit_t", "vit_b_32"}


def output_layers(model: nn.Module) -> dict[str, int]:
    """Module path -> number of outputs, for every Linear and Conv2d layer of `model`."""
    return {path: module.out_features if isinstance(module, nn.Linear) else module.out_channels
            for path, module in model.named_modules() if isinstance(module, nn.Linear | nn.Conv2d)}


def test_registry_covers_every_torchvision_builder() -> None:
    """A builder torchvision gains must be offered or refused with a reason before this passes again."""
    builders = set(tvm.list_models(module=tvm))
    unlisted = sorted(builders - set(ARCHITECTURES) - set(REFUSED))
    assert not unlisted, f"torchvision builders neither offered nor refused: {unlisted}"
    assert not set(ARCHITECTURES) & set(REFUSED)
    assert all(isinstance(reason, str) and reason for reason in REFUSED.values())
    assert {a.torchvision_name for a in ARCHITECTURES.values()} - {None} <= builders


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in QUICK else pytest.mark.slow) for n in ARCHITECTURES])
def test_every_entry_builds_with_its_head_replaced(name: str) -> None:
    """Built on the meta device: every head layer has 3 outputs, no ImageNet output layer is left, and feature
    extraction trains exactly the head's parameters."""
    arch = get_architecture(name)
    with torch.device("meta"):
        model = arch.build(3)
    layers = output_layers(model)
    assert {layer: layers.get(layer) for layer in arch.head_layers} == dict.fromkeys(arch.head_layers, 3)
    assert IMAGENET_CLASSES not in layers.values(), f"{name}: an output layer of ImageNet's classes is left"
    trained = {id(p) for p in set_trainable(model, arch, full=False)}
    head = {id(p) for n, p in model.named_parameters() if n.startswith(arch.head)}
    assert head and trained == head
    assert isinstance(vars(regnet.BlockParams)["from_init_params"], classmethod)  # restored after a meta build


@pytest.mark.slow
def test_vit_at_32_px_has_a_live_head_and_returns_logits() -> None:
    """torchvision zero-initialises ViT's head; the replaced one is PyTorch's default Linear, so logits are not 0."""
    model = get_architecture("vit_b_32").build(3, image_size=32).eval()
    assert model.heads.head.weight.abs().sum() > 0
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 32, 32))
    assert logits.shape == (1, 3) and logits.abs().sum() > 0


@pytest.mark.parametrize(("name", "accepted", "refused", "message"), [
    ("vit_b_16", 32, 100, "--image-size 100: vit_b_16 needs a multiple of its 16 px patch"),
    ("vit_h_14", 42, 28, "--image-size 28: vit_h_14 needs at least 42 px"),
    ("swin_t", 33, 31, "--image-size 31: swin_t needs at least 32 px"),
    ("maxvit_t", 448, 256, "--image-size 256: maxvit_t needs a multiple of 224 px (32 x its 7 px partition)"),
    ("maxvit_t", 224, 200, "--image-size 200: maxvit_t needs at least 224 px"),
    ("inception_v3", 75, 74, "--image-size 74: inception_v3 needs at least 75 px"),
    ("vgg_compact", 16, 15, "--image-size 15: vgg_compact needs at least 16 px"),
])
def test_image_size_rules(name: str, accepted: int, refused: int, message: str) -> None:
    arch = get_architecture(name)
    arch.check_image_size(accepted)
    with pytest.raises(UsageError) as caught:
        arch.check_image_size(refused)
    assert str(caught.value) == message
    with pytest.raises(UsageError, match="^--image-size"):
        TrainConfig(arch=name, image_size=refused).validate()
    assert TrainConfig(arch=name, image_size=accepted).validate().image_size == accepted


@pytest.mark.parametrize(("name", "accepted", "refused"), [
    ("vit_b_16", 48, 100), ("vit_h_14", 42, 50), ("maxvit_t", 448, 256), ("alexnet", 63, 62),
    ("inception_v3", 75, 74), ("swin_t", 33, None), ("swin_v2_t", 100, None), ("convnext_tiny", 32, 31),
])
def test_size_rules_hold_in_torchvision(name: str, accepted: int, refused: int | None) -> None:
    """On the meta device, torchvision's own network (no check of ours) runs at the accepted side and fails at the
    refused one (None: it runs at any side; the registry's minimum is a floor of its own)."""
    arch = get_architecture(name)
    assert arch.torchvision_name is not None

    def forward(side: int) -> torch.Size:
        with torch.device("meta"):
            model = tvm.get_model(arch.torchvision_name, **arch.builder_options(side)).eval()
            return model(torch.empty(1, 3, side, side)).shape

    assert forward(accepted) == (1, IMAGENET_CLASSES)
    if refused is not None:
        with pytest.raises((ValueError, RuntimeError, AssertionError)):
            forward(refused)


def test_checkpoint_metadata_refuses_a_side_the_architecture_cannot_take() -> None:
    meta = CheckpointMeta("vit_b_16", ["bonafide", "morph"], "morph", 100, [0.5] * 3, [0.5] * 3, "test")
    assert meta.first_problem() == ("input_size", "100 px does not fit: vit_b_16 needs a multiple of its 16 px patch")


@pytest.mark.slow
def test_vit_positional_embedding_is_interpolated_to_the_side() -> None:
    """A vit_b_32 state made for 224 px (7 x 7 patches) loads into a 64 px network (2 x 2 patches)."""
    arch = get_architecture("vit_b_32")
    state = tvm.get_model("vit_b_32", weights=None).state_dict()
    model = arch.build(3, image_size=64)
    load_compatible_state(model, arch, state, source="a 224 px state", image_size=64)
    embedding = model.state_dict()[POSITION_EMBEDDING]
    assert embedding.shape == (1, 1 + 2 * 2, 768)
    assert torch.equal(embedding[:, 0], state[POSITION_EMBEDDING][:, 0])  # the class token is not interpolated
    assert torch.equal(model.state_dict()["conv_proj.weight"], state["conv_proj.weight"])


@pytest.mark.slow
def test_imagenet_vit_at_another_side_is_interpolated(monkeypatch: pytest.MonkeyPatch) -> None:
    """ImageNet weights (here a local 224 px state standing in for the download) at 64 px: built for 64 px, the
    positional embedding fitted, the head fresh."""
    weights = tvm.get_model_weights("vit_b_32").DEFAULT
    state = tvm.get_model("vit_b_32", weights=None).state_dict()
    monkeypatch.setattr(type(weights), "get_state_dict", lambda self, *args, **kwargs: state)
    model = get_architecture("vit_b_32").build(3, pretrained=True, image_size=64)
    assert model.encoder.pos_embedding.shape == (1, 5, 768)
    assert torch.equal(model.state_dict()["conv_proj.weight"], state["conv_proj.weight"])
    assert model.heads.head.out_features == 3


def test_imagenet_maxvit_at_another_side_loads_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """MaxViT's relative position biases do not depend on the side: 224 px weights load into a 448 px network."""
    weights = tvm.get_model_weights("maxvit_t").DEFAULT
    with torch.device("meta"):
        state = tvm.get_model("maxvit_t").state_dict()
        monkeypatch.setattr(type(weights), "get_state_dict", lambda self, *args, **kwargs: state)
        model = get_architecture("maxvit_t").build(3, pretrained=True, image_size=448).eval()
        assert model(torch.empty(1, 3, 448, 448)).shape == (1, 3)


def test_googlenet_returns_plain_logits_in_training_mode() -> None:
    """Without auxiliary classifiers (inception_v3 keeps its own, weighted in the training loss)."""
    with torch.device("meta"):
        model = get_architecture("googlenet").build(3).train()
        assert isinstance(model(torch.empty(2, 3, 64, 64)), torch.Tensor)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_architecture_is_explainable(name: str) -> None:
    """Built on the meta device (no memory, no initialisation cost): traced, canonized, a rule at every node."""
    arch = get_architecture(name)
    with torch.device("meta"):
        model = arch.build(3).eval()
    head = [n for n, _ in model.named_parameters() if n.startswith(arch.head)]
    assert head, f"{name}: no parameter under the head prefixes {arch.head}"
    assert all(p.shape[0] == 3 for n, p in model.named_parameters() if n.startswith(arch.head) and n.endswith(".bias"))
    check_supported(model)
