"""Backbones from open_clip and timm: built with random weights (nothing is downloaded), explained with relevance
conserved and LRP-0 equal to gradient x input of the linearised network, their pretrained weights found through
each library's own cache, and a missing extra said in one line."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from linearised import linearised
from torch import Tensor, nn

import smadlrp.lrp as lrp
from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.detector.backbones import CLIP_MEAN, ClipClassifier
from smadlrp.detector.models import build_model, get_architecture

pytest.importorskip("open_clip")
pytest.importorskip("timm")

# (registry name, input side in px): every library backbone smadlrp offers by name, at a small side
BACKBONES = [("clip_vit_b_16", 32), ("timm/vit_small_patch14_dinov2", 42),
             pytest.param("timm/efficientnet_b4", 64, marks=pytest.mark.sweep),
             pytest.param("timm/hrnet_w18", 64, marks=pytest.mark.sweep)]  # CNNs: conservation in make test


pytestmark = pytest.mark.usefixtures("spare_cores")


def random_model(name: str, side: int, biases: bool = True) -> nn.Module:
    """The registry network with 3 classes and random weights; no norm, term or bias left at a degenerate
    initialisation (timm zero-initialises DINOv2's class token and its heads), or every bias zero."""
    torch.manual_seed(0)
    model, source = build_model(name, 3, "none", image_size=side)
    assert source == "random initialisation"
    torch.manual_seed(1)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias"):
                param.uniform_(-0.1, 0.1) if biases else param.zero_()
            elif param.dim() <= 1 and "norm" in param_name or "ln_" in param_name or param_name.endswith(".gamma"):
                param.uniform_(0.5, 1.5)
            elif "token" in param_name or "embed" in param_name:
                param.normal_(0.0, 0.2)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):  # its running mean is a bias too
                module.running_mean.uniform_(-0.2, 0.2) if biases else module.running_mean.zero_()  # type: ignore[operator, union-attr]
                module.running_var.uniform_(0.5, 2.0)  # type: ignore[operator]
    return model.eval()


def images(side: int, batch: int = 2) -> Tensor:
    torch.manual_seed(2)
    return torch.randn(batch, 3, side, side)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "side"), BACKBONES)
def test_zero_rule_is_gradient_times_input_of_the_linearised_backbone(
    name: str, side: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = random_model(name, side).double()  # float64: HRNet's random activations reach 1e6
    x = images(side).double()
    with torch.no_grad():  # canonization (explicit attention, split BatchNormAct) keeps the function
        torch.testing.assert_close(lrp.canonize(model)(x), model(x), rtol=1e-5, atol=1e-5)
    result = lrp.Explainer(model, "zero", attention="cp").explain(x)
    params = dict(model.named_parameters())
    terms = {term: params[term] for term in result.terms}
    for param_name, param in params.items():
        param.requires_grad_(param_name in terms)
    with linearised(monkeypatch):
        leaf = x.clone().requires_grad_(True)
        picked = model(leaf)[torch.arange(len(x)), result.target]
        grads = torch.autograd.grad(picked.sum(), [leaf, *terms.values()])
    expected = grads[0] * x
    assert float((result.relevance - expected).norm() / expected.norm()) <= 1e-8
    scale = float(expected.abs().sum())
    for (term, param), grad in zip(terms.items(), grads[1:], strict=True):
        assert abs(float(result.terms[term].sum()) - float((param.detach() * grad).sum())) <= 1e-8 * scale, term
    if "vit" in name:  # the positional embedding and class token are reported, not lost
        assert len(result.terms) == 2


@pytest.mark.slow
@pytest.mark.parametrize(("name", "side"), [(name, side) for name, side in (
    ("clip_vit_b_16", 32), ("timm/vit_small_patch14_dinov2", 42), ("timm/efficientnet_b4", 64),
    ("timm/hrnet_w18", 64))])
def test_relevance_is_conserved_without_biases(name: str, side: int) -> None:
    model = random_model(name, side, biases=False).double()
    result = lrp.Explainer(model, "epsilon", epsilon=1e-12, attention="cp").explain(images(side).double())
    logit = result.logits[torch.arange(2), result.target]
    scale = result.relevance.flatten(1).abs().sum(1)  # the logit itself can be tiny without biases
    assert bool(((result.total() - logit).abs() <= 1e-6 * scale).all())


def test_entries_carry_their_library_normalisation_and_head() -> None:
    clip = get_architecture("clip_vit_b_16")
    assert clip.mean == CLIP_MEAN and clip.head_layers == ("head",)
    assert clip.size_problem(40) == "clip_vit_b_16 needs a multiple of its 16 px patch"
    assert get_architecture("timm/vit_small_patch14_dinov2").size_step == 14
    assert get_architecture("timm/resnet18").head_layers == ("fc",)  # any timm name, from its configuration
    with pytest.raises(UsageError, match="timm has no model 'no_such_model'"):
        get_architecture("timm/no_such_model")


def test_a_missing_extra_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)  # what an import finds when the package is not installed
    with pytest.raises(UsageError, match=r"^clip_vit_b_16 needs the clip extra: pip install 'smadlrp\[clip\]'$"):
        build_model("clip_vit_b_16", 2, "none", image_size=32)


@pytest.mark.parametrize(("name", "side", "repository", "file"), [
    ("clip_vit_b_16", 32, "timm/vit_base_patch16_clip_224.openai", "open_clip_pytorch_model.bin"),
    ("timm/vit_small_patch14_dinov2", 42, "timm/vit_small_patch14_dinov2.lvd142m", "model.safetensors"),
])
def test_offline_pretrained_weights_name_the_cache_and_the_file(
    name: str, side: int, repository: str, file: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(SmadlrpError) as caught:
        build_model(name, 2, "pretrained", image_size=side)
    message = str(caught.value)
    assert f"put {file} of the Hugging Face repository {repository} into {tmp_path / 'hub'}" in message
    assert "\n" not in message


def test_an_open_clip_file_loads_into_the_image_tower(tmp_path: Any) -> None:
    """--weights FILE with open_clip's own state dict (image and text towers, the projection as a bare matrix)
    goes through open_clip's loader."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(3)
    clip = open_clip.create_model("ViT-B-16", pretrained=None, force_image_size=32, force_quick_gelu=True)
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    model, source = build_model("clip_vit_b_16", 2, str(path), image_size=32)
    assert isinstance(model, ClipClassifier) and source == "file clip.safetensors"
    x = images(32)
    with torch.no_grad():
        torch.testing.assert_close(model.projection(model.visual(x)), clip.encode_image(x), rtol=1e-5, atol=1e-5)


def test_a_timm_file_of_another_side_is_resampled_by_timm(tmp_path: Any) -> None:
    """A DINOv2 file saved at another input side (the official weights are 518 px): timm's loader resamples the
    positional embedding to the side asked for and keeps every other tensor."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(4)
    saved = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=56)
    path = tmp_path / "dinov2.safetensors"
    save_file({k: v.contiguous() for k, v in saved.state_dict().items()}, str(path))
    model, _ = build_model("timm/vit_small_patch14_dinov2", 2, str(path), image_size=42)
    state = model.state_dict()
    assert state["pos_embed"].shape == (1, 1 + 3 * 3, 384)
    assert torch.equal(state["blocks.0.attn.qkv.weight"], saved.state_dict()["blocks.0.attn.qkv.weight"])
    with pytest.raises(SmadlrpError, match="does not hold clip_vit_b_16 weights that open_clip can read"):
        build_model("clip_vit_b_16", 2, str(path), image_size=32)
