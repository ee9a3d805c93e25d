"""LoRA adaptation of transformer detectors (`smadlrp.detector.lora`): the split projections compute what the
packed ones computed, training moves only the adapters and the head, the merged state dict is the original layout
computing the adapted logits, resume restores the training model bit for bit, and nothing is silently bypassed.

Every family is built tiny with random weights: torchvision ViT (nn.MultiheadAttention, batch first), open_clip's
CLIP tower (nn.MultiheadAttention), open_clip's transformer run sequence first with a mask, timm's DINOv2 (packed
qkv), torchvision Swin and Swin V2 (functional window attention) and MaxViT (packed to_qkv).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import open_clip.transformer
import peft  # noqa: F401 - imported here, at collection: its import takes seconds, charged to no single test
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import maxvit, resnet18
from torchvision.models import swin_transformer as swin
from torchvision.models.vision_transformer import VisionTransformer

from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.detector.backbones import ClipClassifier
from smadlrp.detector.lora import LoraAdapter, LoraSettings, attach_lora, parse_targets
from smadlrp.detector.split_attention import SplitMultiheadAttention

TOLERANCE = 1e-5


class SequenceFirstClip(nn.Module):
    """open_clip's transformer with `batch_first=False` blocks and a causal float mask (as in its text tower) on
    patch tokens: (B, 3, 32, 32) -> (B, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, 32, kernel_size=8, stride=8)
        self.transformer = open_clip.transformer.Transformer(32, 2, 2, batch_first=False)
        self.register_buffer("mask", torch.full((16, 16), float("-inf")).triu(1))
        self.head = nn.Linear(32, 2)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2)  # (B, 16, 32)
        return self.head(self.transformer(tokens, attn_mask=self.mask).mean(1))  # type: ignore[no-any-return]


def tiny_swin(v2: bool) -> nn.Module:
    extra = {"block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2} if v2 else {}
    return swin.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                                num_classes=2, **extra)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    side: int  # px
    head: tuple[str, ...]


FAMILIES = {
    "torchvision_vit": Family(lambda: VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                                        hidden_dim=32, mlp_dim=64, num_classes=2),
                              32, ("heads.head.",)),
    "open_clip": Family(lambda: ClipClassifier(open_clip.transformer.VisionTransformer(
        image_size=32, patch_size=16, width=32, layers=2, heads=2, mlp_ratio=2, output_dim=16), 2), 32, ("head.",)),
    "open_clip_sequence_first": Family(SequenceFirstClip, 32, ("head.",)),
    "timm_dinov2": Family(lambda: timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=2,
                                                    img_size=28, depth=2, embed_dim=32, num_heads=2), 28, ("head.",)),
    "swin": Family(lambda: tiny_swin(False), 32, ("head.",)),
    "swin_v2": Family(lambda: tiny_swin(True), 32, ("head.",)),
    "maxvit": Family(lambda: maxvit.MaxVit(input_size=(64, 64), stem_channels=8, partition_size=2,
                                           block_channels=[16, 32], block_layers=[1, 1], head_dim=8,
                                           stochastic_depth_prob=0.0, num_classes=2), 64, ("classifier.5.",)),
}


def build(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = FAMILIES[family].build().eval()
    if family == "swin_v2":  # torchvision zeroes the ignored key bias; make it visible to the round trip
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, swin.ShiftedWindowAttentionV2) and module.qkv.bias is not None:
                    module.qkv.bias.normal_()
    return model


def attach(family: str, model: nn.Module, targets: str = "q,v", rank: int = 2) -> LoraAdapter:
    spec = FAMILIES[family]
    return attach_lora(model, LoraSettings.from_options(rank, targets=targets), spec.head, family, spec.side)


def images(family: str, count: int = 2, seed: int = 1) -> Tensor:
    side = FAMILIES[family].side
    return torch.randn(count, 3, side, side, generator=torch.Generator().manual_seed(seed))


def clone_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_steps(model: nn.Module, adapter: LoraAdapter, family: str, steps: int = 3) -> None:
    """A few AdamW steps of the LoRA and head parameters on random data (in the adapter's training mode)."""
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=0.05, weight_decay=0.01)
    x, labels = images(family, 4, seed=2), torch.tensor([0, 1, 0, 1])
    adapter.train()
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), labels).backward()
        optimizer.step()
    adapter.train(False)


@dataclass
class Trained:
    """One family after attaching (targets q,k,v,out) and training: its original state, the state right after
    attaching, the adapted model and its adapter."""

    original: dict[str, Tensor]
    start: dict[str, Tensor]
    model: nn.Module
    adapter: LoraAdapter


@pytest.fixture(scope="module", params=list(FAMILIES))
def trained(request: pytest.FixtureRequest) -> Trained:
    family = request.param
    model = build(family)
    original = clone_state(model)
    adapter = attach(family, model, "q,k,v,out")
    start = clone_state(model)
    train_steps(model, adapter, family)
    return Trained(original, start, model, adapter)


def is_lora(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("targets", ["q,k,v,out", "q,v"])
def test_split_model_computes_the_original_logits(family: str, targets: str) -> None:
    model = build(family)
    x = images(family)
    with torch.no_grad():
        expected = model(x)
    attach(family, model, targets)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("trained", list(FAMILIES), indirect=True)
def test_training_moves_only_the_adapters_and_the_head(trained: Trained) -> None:
    after = trained.model.state_dict()
    assert after.keys() == trained.start.keys()
    head = trained.adapter.head_prefixes
    moved = {k for k in after if not torch.equal(after[k], trained.start[k])}
    frozen_moved = {k for k in moved if not is_lora(k) and not k.startswith(head)}
    assert not frozen_moved, f"frozen tensors changed: {sorted(frozen_moved)[:3]}"
    assert {k for k in after if ".lora_B." in k} <= moved, "every LoRA B matrix trains"
    assert {k for k in after if k.startswith(head)} <= moved, "the head trains"
    trainable = {id(p) for p in trained.adapter.trainable_parameters()}
    named = {n for n, p in trained.model.named_parameters() if id(p) in trainable}
    assert named == {n for n, _ in trained.model.named_parameters() if is_lora(n) or n.startswith(head)}
    assert trained.adapter.trainable_count == sum(p.numel() for p in trained.adapter.trainable_parameters())


@pytest.mark.parametrize("trained", list(FAMILIES), indirect=True)
def test_merged_state_dict_is_the_original_layout_computing_the_adapted_logits(trained: Trained,
                                                                              request: pytest.FixtureRequest) -> None:
    family = request.node.callspec.params["trained"]
    before = clone_state(trained.model)
    merged = trained.adapter.merged_state_dict()
    assert list(merged) == list(trained.original)
    assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in trained.original.items()}
    after = trained.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "merging changed the training model"
    # only the head and the weights of the adapted attentions' projections differ from the original network
    changed = {k for k in merged if not torch.equal(merged[k], trained.original[k])}
    head = trained.adapter.head_prefixes
    attentions = tuple(f"{path.rsplit('.', 1)[0]}." for path in trained.adapter.adapted)
    assert all(k.startswith(head) or k.startswith(attentions) and k.endswith("weight") for k in changed), changed
    assert any(not k.startswith(head) for k in changed), "the trained LoRA updates are merged"
    fresh = build(family, seed=123)
    fresh.load_state_dict(merged)
    x = images(family, 3, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), trained.model(x), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("trained", list(FAMILIES), indirect=True)
def test_training_state_dict_round_trips_bit_for_bit(trained: Trained, request: pytest.FixtureRequest) -> None:
    """Resume: the original network rebuilt (other random weights), LoRA attached with the same settings, the saved
    training state loaded: the same tensors and exactly the same logits."""
    family = request.node.callspec.params["trained"]
    saved = clone_state(trained.model)
    rebuilt = build(family, seed=99)
    attach(family, rebuilt, "q,k,v,out")
    rebuilt.load_state_dict(saved)
    assert all(torch.equal(rebuilt.state_dict()[k], saved[k]) for k in saved)
    x = images(family, 2, seed=5)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), trained.model(x))


def test_default_targets_are_query_and_value() -> None:
    settings = LoraSettings.from_options(4)
    assert settings.targets == ("q", "v") and settings.alpha == 4.0 and settings.scaling == 1.0
    for family in ("torchvision_vit", "timm_dinov2", "swin"):
        adapter = attach(family, build(family))
        assert adapter.adapted and {path.rsplit(".", 1)[1] for path in adapter.adapted} == {"q", "v"}


@pytest.mark.parametrize(("targets", "names"), [
    ("k", {"k"}), ("out", {"out", "proj", "merge"}), ("q,k,v,out", {"q", "k", "v", "out", "proj", "merge"})])
def test_targets_choose_the_adapted_projections(targets: str, names: set[str]) -> None:
    per_family = {}
    for family in ("torchvision_vit", "timm_dinov2", "maxvit"):
        adapter = attach(family, build(family), targets)
        per_family[family] = {path.rsplit(".", 1)[1] for path in adapter.adapted}
        assert per_family[family] <= names
        assert adapter.describe()["adapted_modules"] == len(adapter.adapted) == len(adapter.units) * len(
            parse_targets(targets))
    assert set().union(*per_family.values()) == names


def test_adapter_state_dict_layout_and_update() -> None:
    model = build("timm_dinov2")
    packed = model.state_dict()["blocks.0.attn.qkv.weight"].clone()
    adapter = attach("timm_dinov2", model, rank=3)
    settings = adapter.settings
    train_steps(model, adapter, "timm_dinov2")
    tensors = adapter.adapter_state_dict()
    assert set(tensors) == {f"{p}.lora_{ab}" for p in adapter.adapted for ab in "AB"}
    assert "blocks.0.attn.qkv.q.lora_A" in tensors and "blocks.1.attn.qkv.v.lora_B" in tensors
    a, b = tensors["blocks.0.attn.qkv.v.lora_A"], tensors["blocks.0.attn.qkv.v.lora_B"]
    assert a.shape == (3, 32) and b.shape == (32, 3)
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in tensors.values())
    merged = adapter.merged_state_dict()["blocks.0.attn.qkv.weight"]
    torch.testing.assert_close(merged[64:] - packed[64:], settings.scaling * b @ a, atol=1e-6, rtol=0)
    assert torch.equal(merged[32:64], packed[32:64]), "the key rows are not adapted by default"
    tensors["blocks.0.attn.qkv.v.lora_A"].add_(1.0)
    assert not torch.equal(adapter.adapter_state_dict()["blocks.0.attn.qkv.v.lora_A"], tensors[
        "blocks.0.attn.qkv.v.lora_A"]), "copies, not views of the model"


def test_describe_is_json() -> None:
    model = build("torchvision_vit")
    adapter = attach_lora(model, LoraSettings.from_options(2, alpha=8.0, targets="q,v,out"), ("heads.head.",),
                          "vit_b_16", 32)
    described = json.loads(json.dumps(adapter.describe()))
    assert described == {"rank": 2, "alpha": 8.0, "scaling": 4.0, "targets": ["q", "v", "out"], "adapted_modules": 6,
                         "trainable_parameters": adapter.trainable_count,
                         "total_parameters": sum(p.numel() for p in model.parameters())}
    assert adapter.trainable_count == 6 * 2 * (32 + 32) + 32 * 2 + 2


def test_cnn_is_refused_in_one_line() -> None:
    with pytest.raises(UsageError) as caught:
        attach_lora(resnet18(num_classes=2), LoraSettings.from_options(4), ("fc.",), "resnet18", 32)
    assert str(caught.value) == ("--lora: resnet18 has no attention projections to adapt; LoRA applies to "
                                 "transformers (vit_*, swin_*, maxvit_t, clip_*, timm ViTs)")


@pytest.mark.parametrize(("rank", "alpha", "targets", "fragment"), [
    (0, None, None, "--lora 0: the LoRA rank"), (-2, None, None, "--lora -2"), (True, None, None, "--lora True"),
    (4, 0.0, None, "--lora-alpha 0.0"), (4, -1.0, None, "positive finite"), (4, float("nan"), None, "--lora-alpha nan"),
    (4, float("inf"), None, "--lora-alpha inf"), (4, None, "", "name at least one of q, k, v, out"),
    (4, None, "q,q", "q named twice"), (4, None, "q,x", "unknown target 'x'; choose among q, k, v, out"),
    (4, None, "q,,v", "an empty name"), (4, None, ("v", "v"), "v named twice"), (4, None, (), "at least one")])
def test_bad_settings_are_refused(rank: int, alpha: float | None, targets: str | tuple[str, ...] | None,
                                  fragment: str) -> None:
    with pytest.raises(UsageError) as caught:
        LoraSettings.from_options(rank, alpha, targets)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.exit_code == 2


def test_parse_targets() -> None:
    assert parse_targets("q,v") == ("q", "v")
    assert parse_targets(" Q, k ,OUT") == ("q", "k", "out")


def test_rank_above_the_width_and_a_second_attach_are_refused() -> None:
    with pytest.raises(UsageError, match="--lora 64: the rank exceeds the width 32"):
        attach("torchvision_vit", build("torchvision_vit"), rank=64)
    model = build("torchvision_vit")
    attach("torchvision_vit", model)
    with pytest.raises(SmadlrpError, match="already carries LoRA adapters"):
        attach("torchvision_vit", model)


class FunctionalProjection(nn.Module):
    """Attention whose output projection is read functionally, as torchvision's Swin reads its weights: (B, N, C)
    -> (B, N, C)."""

    def __init__(self, width: int = 16, packed_read: bool = False) -> None:
        super().__init__()
        self.qkv, self.proj, self.packed_read = nn.Linear(width, 3 * width), nn.Linear(width, width), packed_read

    def forward(self, x: Tensor) -> Tensor:
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias) if self.packed_read else self.qkv(x)
        q, k, v = qkv.unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return F.linear(out, self.proj.weight, self.proj.bias)


class TinyFunctional(nn.Module):
    def __init__(self, packed_read: bool = False) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, kernel_size=8, stride=8)
        self.attn = FunctionalProjection(16, packed_read)
        self.head = nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.attn(self.embed(x).flatten(2).transpose(1, 2)).mean(1))  # type: ignore[no-any-return]


def test_a_bypassed_adapter_is_detected() -> None:
    attach_lora(TinyFunctional(), LoraSettings.from_options(2), ("head.",), "tiny", 16)  # q and v: called
    with pytest.raises(SmadlrpError) as caught:
        attach_lora(TinyFunctional(), LoraSettings.from_options(2, targets="q,out"), ("head.",), "tiny", 16)
    assert str(caught.value).startswith("--lora: the adapter on attn.proj of tiny is never called")
    with pytest.raises(SmadlrpError, match="tiny does not run with split attention projections"):
        attach_lora(TinyFunctional(packed_read=True), LoraSettings.from_options(2), ("head.",), "tiny", 16)


def test_swin_with_torchvision_forward_would_be_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    """Were the Swin attention left with torchvision's functional forward, attaching fails instead of training a
    bypassed adapter."""
    from smadlrp.detector import split_attention

    monkeypatch.setattr(split_attention.SplitWindowAttention, "forward", swin.ShiftedWindowAttention.forward)
    with pytest.raises(SmadlrpError, match="swin does not run with split attention projections"):
        attach("swin", build("swin"))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", [None, "bool", "float", "per_head"])
def test_split_multihead_attention_matches_nn_multihead_attention(batch_first: bool, mask: str | None) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    split = SplitMultiheadAttention(mha, "attn").eval()
    query, key = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    if not batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    attn_mask = {None: None, "bool": torch.rand(5, 7) > 0.7, "float": torch.randn(5, 7),
                 "per_head": torch.randn(2 * 4, 5, 7)}[mask]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask[:, 0] = False  # every query attends somewhere
    with torch.no_grad():
        expected = mha(query, key, key, need_weights=False, attn_mask=attn_mask)[0]
        out, weights = split(query, key, key, need_weights=False, attn_mask=attn_mask)
    assert weights is None
    torch.testing.assert_close(out, expected, atol=TOLERANCE, rtol=0)


def test_split_multihead_attention_other_widths_and_unbatched() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=True, bias=False).eval()
    split = SplitMultiheadAttention(mha, "pool")
    query, key, value = torch.randn(3, 16), torch.randn(6, 8), torch.randn(6, 12)
    with torch.no_grad():
        torch.testing.assert_close(split(query, key, value, need_weights=False)[0],
                                   mha(query, key, value, need_weights=False)[0], atol=TOLERANCE, rtol=0)


def test_split_multihead_attention_refuses_other_calls() -> None:
    split = SplitMultiheadAttention(nn.MultiheadAttention(8, 2, batch_first=True), "blocks.0.attn")
    x = torch.randn(1, 3, 8)
    with pytest.raises(SmadlrpError, match="'blocks.0.attn' was called with need_weights=True"):
        split(x, x, x)
    with pytest.raises(SmadlrpError, match="key_padding_mask"):
        split(x, x, x, need_weights=False, key_padding_mask=torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(UsageError, match="add_bias_kv"):
        SplitMultiheadAttention(nn.MultiheadAttention(8, 2, add_bias_kv=True), "attn")


REGISTRY = {"vit_b_16": 32, "swin_t": 64, "swin_v2_t": 64, "maxvit_t": 224, "clip_vit_b_16": 32,
            "timm/vit_small_patch14_dinov2": 42}


FULL_SIZE_ONLY_IN_SWEEP = ("vit_b_16", "swin_v2_t", "maxvit_t")  # their families run above at tiny sizes


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.sweep) if n in FULL_SIZE_ONLY_IN_SWEEP else n
                                  for n in REGISTRY])
def test_registry_transformers_adapt_and_merge(name: str) -> None:
    """The registry's own networks (random weights): attaching keeps the logits; with nonzero B everywhere, the
    merged state dict loaded into a fresh network gives the adapted logits."""
    from smadlrp.detector.models import build_model, get_architecture

    side = REGISTRY[name]
    torch.manual_seed(0)
    model, _ = build_model(name, 2, weights="none", image_size=side)
    model.eval()
    x = torch.randn(1, 3, side, side)
    with torch.no_grad():
        expected = model(x)
    adapter = attach_lora(model, LoraSettings.from_options(4, targets="q,k,v,out"), get_architecture(name).head, name,
                          side)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=TOLERANCE, rtol=0)
        for path in adapter.adapted:
            model.get_submodule(path).lora_B["default"].weight.normal_(std=0.02)  # type: ignore[index,union-attr]
        adapted = model(x)
    fresh, _ = build_model(name, 2, weights="none", image_size=side)
    fresh.eval().load_state_dict(adapter.merged_state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), adapted, atol=TOLERANCE, rtol=0)
