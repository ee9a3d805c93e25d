"""LRP on transformers and ConvNeXt: with CP attention, LRP-0 equals gradient x input of the network linearised at
its input (input, positional embedding and class token alike); relevance is conserved without biases; AttnLRP's
softmax rule absorbs a measured share; a float64 model is explained in float64."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torchvision
from linearised import linearised
from torch import Tensor, nn

import smadlrp.lrp as lrp
import smadlrp.lrp.signals as signals
from smadlrp.core.errors import UsageError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TRANSFORMERS = [("vit_b_16", 32), ("swin_t", 32), ("maxvit_t", 224), ("convnext_tiny", 32)]
TERMS = ("class_token", "encoder.pos_embedding")


pytestmark = pytest.mark.usefixtures("spare_cores")


def build(name: str, size: int, biases: bool = True) -> nn.Module:
    """A random-weight network with 3 classes; no parameter left at a degenerate initialisation (torchvision
    zero-initialises ViT's head and class token): biases, norms and terms random, or biases all zero."""
    torch.manual_seed(0)
    options: dict[str, Any] = {"image_size": size} if name.startswith("vit") else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=3, **options).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
                module.weight.uniform_(0.5, 1.5)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)  # type: ignore[operator]
                module.running_var.uniform_(0.5, 2.0)  # type: ignore[operator]
        for param_name, param in model.named_parameters():
            if param_name.endswith(".bias"):
                param.uniform_(-0.1, 0.1) if biases else param.zero_()
            elif param_name in TERMS or param_name.startswith("heads."):
                param.normal_(0.0, 0.2)
            if not biases and isinstance(model, torchvision.models.MaxVit) and "bias_table" in param_name:
                param.zero_()
    return model


def images(size: int, batch: int = 2) -> Tensor:
    torch.manual_seed(2)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (torch.rand(batch, 3, size, size) - mean) / std


def linearised_gradient_x_input(
    model: nn.Module, x: Tensor, target: Tensor, monkeypatch: pytest.MonkeyPatch
) -> tuple[Tensor, dict[str, float], Tensor]:
    """(gradient x input, {term: sum over the batch of term x its gradient}, the target logits) of the network
    linearised at x (tests/linearised.py)."""
    terms = {n: p for n, p in model.named_parameters() if n in TERMS}
    for param in model.parameters():
        param.requires_grad_(False)
    for param in terms.values():
        param.requires_grad_(True)
    with linearised(monkeypatch):
        leaf = x.clone().requires_grad_(True)
        picked = model(leaf)[torch.arange(len(x)), target]
        grads = torch.autograd.grad(picked.sum(), [leaf, *terms.values()])
    for param in model.parameters():
        param.requires_grad_(True)
    term_sums = {n: float((p.detach() * g).sum()) for (n, p), g in zip(terms.items(), grads[1:], strict=True)}
    return grads[0] * x, term_sums, picked.detach()


def relative_l2(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.slow
@pytest.mark.parametrize(("name", "size"), TRANSFORMERS)
def test_zero_rule_is_gradient_times_input_of_the_linearised_network(
    name: str, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build(name, size)
    x = images(size)
    with torch.no_grad():  # the explicit attention and window nodes compute the same function
        torch.testing.assert_close(lrp.canonize(model)(x), model(x), rtol=1e-5, atol=1e-6)
    result = lrp.Explainer(model, "zero", attention="cp").explain(x)
    expected, terms, _ = linearised_gradient_x_input(model, x, result.target, monkeypatch)
    assert relative_l2(result.relevance, expected) <= 1e-4
    assert set(result.terms) == set(terms)
    for term, value in terms.items():
        assert abs(float(result.terms[term].sum()) - value) <= 1e-4 * max(abs(value), float(expected.abs().sum()))
    if name == "vit_b_16":  # the positional embedding takes a real share
        assert abs(terms["encoder.pos_embedding"]) > 1e-3 * float(expected.abs().sum())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_b_16", "swin_t"])
def test_cp_attention_conserves_relevance_without_biases(name: str) -> None:
    model = build(name, 32, biases=False)
    result = lrp.Explainer(model, "zero", attention="cp").explain(images(32))
    logit = result.logits[torch.arange(2), result.target]
    torch.testing.assert_close(result.total(), logit, rtol=1e-4, atol=0.0)


CONSERVING: list[tuple[str, dict[str, Any]]] = [
    ("zero", {}),
    ("alpha1beta0", {}),
    ("alpha2beta1", {}),
    ("zbox", {"mean": MEAN, "std": STD}),
    ("epsilon-plus-flat", {"epsilon": 0.0}),
    ("epsilon-gamma-box", {"mean": MEAN, "std": STD, "epsilon": 0.0}),
]


@pytest.mark.slow
def test_convnext_conserves_relevance_with_every_conserving_rule() -> None:
    model = build("convnext_tiny", 32, biases=False)
    x = images(32, batch=1)
    for rule, params in CONSERVING:
        result = lrp.Explainer(model, rule, **params).explain(x)
        logit = result.logits[0, result.target]
        torch.testing.assert_close(result.total(), logit, rtol=1e-4, atol=0.0, msg=lambda m, r=rule: f"{r}: {m}")


@pytest.mark.slow
def test_attnlrp_shares_relevance_through_queries_and_keys() -> None:
    """AttnLRP gives q and k relevance (the map differs from CP's), and its softmax rule absorbs a share of it
    (softmax's bias term): the total is finite and no longer the logit."""
    model = build("vit_b_16", 32, biases=False)
    x = images(32)
    cp = lrp.Explainer(model, "zero", attention="cp").explain(x)
    attn = lrp.Explainer(model, "zero", attention="attnlrp").explain(x)
    assert torch.isfinite(attn.relevance).all()
    assert relative_l2(attn.relevance, cp.relevance) > 1e-3
    logit = attn.logits[torch.arange(2), attn.target]
    assert not torch.allclose(attn.total(), logit, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "rule"), [("vit_b_16", "epsilon"), ("convnext_tiny", "gamma-transformer")])
def test_recomputing_instead_of_keeping_changes_no_relevance(
    name: str, rule: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An MLP's second layer recomputes its input from the first layer's output (GELU between them), a layer
    after a norm from the norm's input, and AttnLRP's A @ v recomputes A from the logits its softmax keeps: the
    relevance equals that of keeping them (to float64 rounding), and the layers that recompute are the ones
    expected: per ViT block q, k, v and the MLP's two layers; per ConvNeXt block the MLP's two layers."""
    model = build(name, 32).double()
    x = images(32).double()
    kept_tensors = []
    original = torch.autograd.function.FunctionCtx.save_for_backward

    def counting(ctx: Any, *tensors: Tensor) -> None:
        kept_tensors.extend(t for t in tensors if t is not None)
        original(ctx, *tensors)

    monkeypatch.setattr(torch.autograd.function.FunctionCtx, "save_for_backward", counting)
    recomputed = lrp.Explainer(model, rule, attention="attnlrp").explain(x)
    kept_recomputing = sum(t.numel() for t in {t.untyped_storage().data_ptr(): t for t in kept_tensors}.values())
    recomputing = [m for m in lrp.Explainer(model, rule).lrp.modules()
                   if getattr(m, "_lrp_input_recompute", False)]
    assert len(recomputing) == {"vit_b_16": 12 * 5, "convnext_tiny": 18 * 2}[name]

    kept_tensors.clear()
    monkeypatch.setattr("smadlrp.lrp.layers.mark_recomputable", lambda y, source, f: y)
    monkeypatch.setattr("smadlrp.lrp.builtin_ops.mark_recomputable", lambda y, source, f: y)
    kept = lrp.Explainer(model, rule, attention="attnlrp").explain(x)
    kept_keeping = sum(t.numel() for t in {t.untyped_storage().data_ptr(): t for t in kept_tensors}.values())
    assert relative_l2(recomputed.relevance, kept.relevance) <= 1e-12
    assert kept_recomputing < kept_keeping  # less is kept


@pytest.mark.parametrize(("name", "rule"), [("vit_b_16", "epsilon"), ("swin_t", "epsilon"),
                                          ("swin_t", "gamma-transformer"), ("convnext_tiny", "epsilon"),
                                          ("resnet18", "zero")])
def test_signals_handed_on_change_no_relevance(name: str, rule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rule that divides by its output takes the signal the next rule left instead (`lrp.signals`): the
    relevance equals that of dividing (float64), with signals taken where an output has one reader (a norm before
    a layer, q k^T before its bias, the bias before the softmax) and refused where it has several (ViT's norm before
    q, k and v) or was changed in place (ResNet's ReLU after a sum)."""
    model = (build(name, 32) if name != "resnet18" else
             torchvision.models.get_model(name, weights=None, num_classes=3).eval()).double()
    x = images(32).double()
    outcomes: list[bool] = []
    take = signals.SignalSlot.take

    def counting(slot: signals.SignalSlot, relevance: Tensor) -> Tensor | None:
        signal = take(slot, relevance)
        outcomes.append(signal is not None)
        return signal

    monkeypatch.setattr(signals.SignalSlot, "take", counting)
    handed = lrp.Explainer(model, rule, attention="attnlrp").explain(x)
    assert (name == "resnet18" or any(outcomes)) and not all(outcomes)  # ResNet's sums all feed in-place ReLUs
    for module in ("layers", "node_rules"):
        monkeypatch.setattr(f"smadlrp.lrp.{module}.slot_of", lambda t: None)
    outcomes.clear()
    divided = lrp.Explainer(model, rule, attention="attnlrp").explain(x)
    assert not any(outcomes)
    assert relative_l2(handed.relevance, divided.relevance) <= 1e-12


@pytest.mark.parametrize(("name", "rule", "attention"), [("vit_b_16", "epsilon", "attnlrp"),
                                                       ("swin_t", "gamma-transformer", "attnlrp")])
def test_relevance_under_autocast_is_that_of_float32(name: str, rule: str, attention: str) -> None:
    """A caller's bfloat16 autocast reaches no rule, not even the products and outputs that the attention, norm
    and softmax rules compute again in the backward pass: the relevance is the float32 one."""
    model, x = build(name, 32), images(32)
    expected = lrp.Explainer(model, rule, attention=attention).explain(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lrp.Explainer(model, rule, attention=attention).explain(x)
    assert got.relevance.dtype == torch.float32
    assert relative_l2(got.relevance, expected.relevance) <= 1e-6


def test_float64_model_gives_float64_relevance_equal_to_gradient_times_input() -> None:
    """A small float64 transformer-free CNN: LRP-0 in float64 equals gradient x input to 1e-10."""
    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet18", weights=None, num_classes=3).eval().double()
    x = images(32).double()
    result = lrp.Explainer(model, "zero").explain(x)
    assert result.relevance.dtype == torch.float64
    canonical = lrp.canonize(model)
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(canonical(leaf)[torch.arange(2), result.target].sum(), leaf)
    assert relative_l2(result.relevance, grad * x) <= 1e-10


def test_pattern_methods_are_refused_on_transformers() -> None:
    """PatternNet's signal is not defined through LayerNorm and attention (it overflows): refused by name."""
    torch.manual_seed(0)
    model = torchvision.models.get_model("vit_b_32", weights=None, num_classes=2, image_size=32).eval()
    expected = (r"this model has \d+ normalisation, attention or mixture node\(s\) "
                r"\(e.g. encoder.layers.encoder_layer_0.ln_1")
    for method in ("patternnet", "patternattribution"):
        with pytest.raises(UsageError, match=expected):
            lrp.Explainer(model, method, patterns={})
