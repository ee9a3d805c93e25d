"""The LRP engine end to end: conservation, gradient x input, BatchNorm folding, the convert path, targets,
errors, and that the user's model is never modified."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
import torchvision
from torch import Tensor, nn

from smadlrp.core.device import num_threads
from smadlrp.core.errors import UsageError
from smadlrp.lrp import (
    AffineBatchNorm,
    Explainer,
    FoldedBatchNorm,
    canonize,
    convert,
    explain,
    method_names,
)
from smadlrp.lrp.ops import ConvOp, DenseOp, Prepared
from smadlrp.lrp.rules import Gamma

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors run fastest on one thread, and the CPU is shared."""
    with num_threads(1):
        yield


def vgg_like(bias: bool = True, seed: int = 0) -> nn.Sequential:
    """conv, relu, maxpool, conv, relu, avgpool, conv, relu, adaptive avgpool, flatten, linear, relu, dropout,
    linear: every supported layer type on 3 x 16 x 16 inputs, 4 classes."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=bias), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1, bias=bias), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(12, 12, 3, padding=1, bias=bias), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((2, 2)),
        nn.Flatten(), nn.Linear(48, 16, bias=bias), nn.ReLU(inplace=True), nn.Dropout(0.5),
        nn.Linear(16, 4, bias=bias),
    ).eval()  # fmt: skip


def images(batch: int = 3, size: int = 16, seed: int = 1) -> Tensor:
    """Normalised images: pixels in [0, 1] through (p - MEAN) / STD."""
    torch.manual_seed(seed)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (torch.rand(batch, 3, size, size) - mean) / std


def target_logits(model: nn.Module, x: Tensor) -> Tensor:
    logits = model(x).detach()
    return logits[torch.arange(len(x)), logits.argmax(1)]


CONSERVING: list[tuple[str, dict[str, Any]]] = [
    ("zero", {}),
    ("alpha1beta0", {}),
    ("alpha2beta1", {}),
    ("zbox", {"mean": MEAN, "std": STD}),
    ("epsilon-gamma-box", {"mean": MEAN, "std": STD, "epsilon": 0.0}),
    ("epsilon-plus-flat", {"epsilon": 0.0}),
    ("flat", {}),
    ("wsquare", {}),
]


@pytest.mark.parametrize(("rule", "params"), CONSERVING)
def test_relevance_is_conserved_on_bias_free_networks(rule: str, params: dict[str, Any]) -> None:
    model, x = vgg_like(bias=False), images()
    relevance = explain(model, x, rule, **params)
    torch.testing.assert_close(relevance.sum((1, 2, 3)), target_logits(model, x), rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("rule", ["zero", "epsilon"])
def test_epsilon_zero_is_gradient_times_input(rule: str) -> None:
    model, x = vgg_like(bias=True), images()
    leaf = x.clone().requires_grad_(True)
    logits = model(leaf)
    logits[torch.arange(len(x)), logits.argmax(1)].sum().backward()
    assert leaf.grad is not None
    params = {"epsilon": 0.0} if rule == "epsilon" else {}
    torch.testing.assert_close(explain(model, x, rule, **params), leaf.grad * x, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", method_names())
def test_in_place_relu_changes_nothing(method: str) -> None:
    """An in-place ReLU overwrites a layer's output with relu(z); the rules must give the same relevance."""
    in_place, x = vgg_like(), images()
    copy = vgg_like()
    for m in copy.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    params = _method_params(method, in_place)
    expected = explain(copy, x, method, **params)
    torch.testing.assert_close(explain(in_place, x, method, **params), expected, rtol=1e-5, atol=1e-7)


def test_epsilon_absorbs_relevance() -> None:
    model, x = vgg_like(bias=False), images()
    small, large = (explain(model, x, "epsilon", epsilon=e).sum((1, 2, 3)) for e in (1e-3, 10.0))
    assert torch.all(large.abs() < small.abs())


def test_batch_equals_samples_explained_one_by_one() -> None:
    model, x = vgg_like(), images()
    explainer = Explainer(model, "epsilon-gamma-box", mean=MEAN, std=STD)
    batch = explainer.explain(x, target=1).relevance
    singles = torch.cat([explainer.explain(x[i : i + 1], target=1).relevance for i in range(len(x))])
    torch.testing.assert_close(batch, singles)


def test_explain_inside_no_grad_and_inference_mode() -> None:
    model, x = vgg_like(), images()
    expected = explain(model, x, "epsilon")
    with torch.no_grad():
        torch.testing.assert_close(explain(model, x, "epsilon"), expected)
    with torch.inference_mode():
        inference_x = x.clone()
        torch.testing.assert_close(explain(model, inference_x, "epsilon"), expected)


def test_explain_under_autocast_is_float32() -> None:
    model, x = vgg_like(), images()
    expected = explain(model, x, "gamma")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = explain(model, x, "gamma")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


# --- BatchNorm folding -------------------------------------------------------------------------------------


def _randomise_batchnorm(model: nn.Module, zero_folded_bias: bool = False) -> None:
    """Random running statistics and affine parameters; optionally beta chosen so that each folded bias
    (b - mean) * g / sigma + beta is zero."""
    modules = list(model.modules())
    with torch.no_grad():
        for before, bn in zip(modules, modules[1:], strict=False):
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
                continue
            bn.running_mean.uniform_(-1, 1)  # type: ignore[union-attr]
            bn.running_var.uniform_(0.5, 2.0)  # type: ignore[union-attr]
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            if zero_folded_bias:
                assert isinstance(before, nn.Conv2d)
                b = before.bias if before.bias is not None else torch.zeros_like(bn.bias)
                scale = bn.weight / (bn.running_var + bn.eps).sqrt()  # type: ignore[operator]
                bn.bias.copy_((bn.running_mean - b) * scale)  # type: ignore[operator]


def bn_model() -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
        nn.Linear(6 * 8 * 8, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3),
    ).eval()  # fmt: skip


def test_canonize_folds_batchnorm_and_keeps_outputs_and_names() -> None:
    model = bn_model()
    _randomise_batchnorm(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = canonize(model)
    x = images(4)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    layers = {name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert layers == {name for name, m in folded.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert isinstance(folded[1], FoldedBatchNorm) and isinstance(folded[1], nn.Identity)
    assert folded[1].folded_into == "0"
    assert folded[0].bias is not None  # a convolution without bias gains one
    assert not folded.training
    assert model[0].bias is None and isinstance(model[1], nn.BatchNorm2d)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_canonize_makes_unfoldable_batchnorm_affine_and_refuses_batch_statistics() -> None:
    after_relu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    _randomise_batchnorm(after_relu)
    canonical = canonize(after_relu)
    assert isinstance(canonical[2], AffineBatchNorm)
    x = images(2)
    torch.testing.assert_close(canonical(x), after_relu(x), rtol=1e-5, atol=1e-6)
    batch_stats = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(UsageError, match="no running statistics"):
        canonize(batch_stats)


@pytest.mark.slow
def test_vgg11_bn_folding_keeps_outputs_and_conserves_relevance() -> None:
    torch.manual_seed(3)
    model = torchvision.models.vgg11_bn(num_classes=3)
    model.classifier = nn.Sequential(  # the features are under test; a small head keeps the test fast
        nn.Linear(512 * 7 * 7, 32, bias=False), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 3, bias=False)
    )
    model.eval()
    _randomise_batchnorm(model, zero_folded_bias=True)
    x = images(2, size=32)
    torch.testing.assert_close(canonize(model)(x), model(x), rtol=1e-5, atol=1e-5)
    for rule in ("zero", "alpha1beta0"):
        relevance = explain(model, x, rule)
        torch.testing.assert_close(relevance.sum((1, 2, 3)), target_logits(model, x), rtol=1e-4, atol=0.0)


@pytest.mark.slow
def test_alexnet_geometry_conserves_relevance() -> None:
    torch.manual_seed(4)
    model = torchvision.models.alexnet(num_classes=2)
    model.classifier = nn.Sequential(nn.Dropout(), nn.Linear(256 * 6 * 6, 2, bias=False))
    with torch.no_grad():
        for m in model.features:
            if isinstance(m, nn.Conv2d):
                m.bias.zero_()
    model.eval()
    x = images(1, size=64)
    relevance = explain(model, x, "zero")
    torch.testing.assert_close(relevance.sum((1, 2, 3)), target_logits(model, x), rtol=1e-4, atol=0.0)


# --- the convert path and the user's model ----------------------------------------------------------------


def _method_params(method: str, model: nn.Module) -> dict[str, Any]:
    if method in ("zbox", "epsilon-gamma-box"):
        return {"mean": MEAN, "std": STD}
    if method in ("patternnet", "patternattribution"):
        torch.manual_seed(5)
        return {"patterns": {n: torch.randn_like(m.weight) for n, m in model.named_modules()
                             if isinstance(m, (nn.Conv2d, nn.Linear))}}  # fmt: skip
    return {}


@pytest.mark.parametrize("method", method_names())
def test_convert_path_matches_explain(method: str) -> None:
    model, x = vgg_like(), images()
    params = _method_params(method, model)
    target = torch.tensor([0, 3, 1])
    expected = explain(model, x, method, target, **params)
    lrp_model = convert(model)
    leaf = x.clone().requires_grad_(True)
    y = lrp_model(leaf, explain=True, rule=method, **params)
    y[torch.arange(len(x)), target].sum().backward()
    assert leaf.grad is not None
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


def test_convert_forward_is_the_model_and_grad_accumulates() -> None:
    model, x = vgg_like(), images()
    lrp_model = convert(model)
    torch.testing.assert_close(lrp_model(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(lrp_model(x, explain=True), model(x), rtol=0, atol=0)
    leaf = x.clone().requires_grad_(True)
    for _ in range(2):
        y = lrp_model(leaf, explain=True, rule="zero")
        y[torch.arange(len(x)), 0].sum().backward()
    assert leaf.grad is not None
    torch.testing.assert_close(leaf.grad, 2 * explain(model, x, "zero", 0))


def test_convert_accepts_torchlrp_pattern_sequence() -> None:
    model, x = vgg_like(), images()
    patterns = _method_params("patternnet", model)["patterns"]
    leaf = x.clone().requires_grad_(True)
    lrp_model = convert(model)
    y = lrp_model(leaf, explain=True, rule="patternnet", pattern=list(patterns.values()))
    y[:, 2].sum().backward()
    assert leaf.grad is not None
    torch.testing.assert_close(leaf.grad, explain(model, x, "patternnet", 2, patterns=patterns))


def test_users_model_is_unchanged() -> None:
    model = bn_model()
    _randomise_batchnorm(model)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    x = images(2)
    for method in ("epsilon", "gamma", "alpha2beta1"):
        explain(model, x, method)
    convert(model)(x.requires_grad_(True), explain=True).sum().backward()
    assert [type(m) for m in model.modules()] == types
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.training
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@dataclass(frozen=True)
class CountingGamma(Gamma):
    """Gamma that counts how often it prepares modified weights."""

    prepared: ClassVar[list[str]] = []

    def prepare(self, name: str, weight: Tensor, bias: Tensor | None) -> Prepared:
        self.prepared.append(name)
        return super().prepare(name, weight, bias)


def test_explainer_prepares_modified_weights_once() -> None:
    model, x = vgg_like(), images()
    CountingGamma.prepared.clear()
    explainer = Explainer(model, CountingGamma())
    first = explainer.explain(x).relevance
    second = explainer.explain(x).relevance
    assert sorted(CountingGamma.prepared) == ["0", "10", "13", "3", "6"]
    torch.testing.assert_close(first, second)


@pytest.mark.parametrize("method", ["gamma", "alpha1beta0", "epsilon"])
def test_relevance_products_use_the_prepared_weights_without_copies(method: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """After the first layer (inputs of both signs, stacked [a+, a-]) every vjp reads a kept weight itself: no
    per-call copy of the model's weights (a copy of VGG16's 528 MB per explanation, say)."""
    model, x = vgg_like(), images()
    explainer = Explainer(model, method)
    explainer.explain(x)
    kept = {t.data_ptr() for layer in explainer.lrp._explained.values() for cached in layer._lrp_cache.values()
            for t in cached.values()}
    used: list[int] = []
    for op in (ConvOp, DenseOp):
        monkeypatch.setattr(op, "vjp", lambda self, a, weight, s, _vjp=op.vjp: used.append(weight.data_ptr())
                            or _vjp(self, a, weight, s))
    explainer.explain(x)
    assert len(used) >= 5 and set(used[:-1]) <= kept  # used[-1]: the first layer, the last to run backward


def test_one_shot_explain_keeps_the_prepared_model_until_the_weights_change() -> None:
    model, x = vgg_like(seed=7), images()
    rule = CountingGamma()
    CountingGamma.prepared.clear()
    first = explain(model, x, rule)
    torch.testing.assert_close(explain(model, x, rule), first)
    assert sorted(CountingGamma.prepared) == ["0", "10", "13", "3", "6"]  # prepared once for both calls
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # in place: the kept copy shares this storage, its version changes
    changed = explain(model, x, rule)
    assert len(CountingGamma.prepared) == 10
    torch.testing.assert_close(changed, Explainer(model, CountingGamma()).explain(x).relevance)
    assert not torch.allclose(changed, first)


# --- overrides, targets, errors ---------------------------------------------------------------------------


def test_overrides_by_name_and_index() -> None:
    model, x = vgg_like(), images()
    flat_first = explain(model, x, "flat")  # flat on the first layer, LRP-0 on the others
    torch.testing.assert_close(explain(model, x, "zero", overrides={0: "flat"}), flat_first)
    torch.testing.assert_close(explain(model, x, "zero", overrides={"0": "flat"}), flat_first)
    last_zero = explain(model, x, "epsilon", overrides={-1: "zero"})
    assert not torch.allclose(last_zero, explain(model, x, "epsilon"))
    with pytest.raises(UsageError, match="override 'features.0' names no Conv2d/Linear layer"):
        explain(model, x, "zero", overrides={"features.0": "flat"})
    with pytest.raises(UsageError, match="override index 5 is out of range for 5"):
        explain(model, x, "zero", overrides={5: "flat"})


def test_targets() -> None:
    model, x = vgg_like(bias=False), images()
    explainer = Explainer(model, "zero", class_names=["a", "b", "c", "d"])
    predicted = explainer.explain(x)
    assert torch.equal(predicted.target, predicted.logits.argmax(1))
    per_sample = explainer.explain(x, torch.tensor([3, 0, 2]))
    assert per_sample.target.tolist() == [3, 0, 2]
    by_name = explainer.explain(x, ["d", "a", "c"])
    torch.testing.assert_close(by_name.relevance, per_sample.relevance)
    sums = explainer.explain(x, "b").relevance.sum((1, 2, 3))
    torch.testing.assert_close(sums, predicted.logits[:, 1], rtol=1e-4, atol=0.0)
    with pytest.raises(UsageError, match="target class 4 is out of range for a model with 4 classes"):
        explainer.explain(x, 4)
    with pytest.raises(UsageError, match="unknown class 'e'; classes: a, b, c, d"):
        explainer.explain(x, "e")
    with pytest.raises(UsageError, match="got 2 targets for a batch of 3"):
        explainer.explain(x, [0, 1])
    with pytest.raises(UsageError, match="no class names were given"):
        explain(model, x, "zero", "a")


def test_wrong_input_shapes() -> None:
    model = vgg_like()
    with pytest.raises(UsageError, match=r"expected a \(B, C, H, W\) image batch, got shape \(3, 16, 16\)"):
        explain(model, torch.zeros(3, 16, 16))
    with pytest.raises(UsageError, match=r"layer '0' \(Conv2d\) expects \(B, 3, H, W\) input"):
        explain(model, torch.zeros(1, 1, 16, 16))
    with pytest.raises(UsageError, match="zbox: bounds have 2 channels but layer '0' has 3 input channels"):
        explain(model, images(), "zbox", low=[0, 0], high=[1, 1])


def test_unsupported_layers_are_listed() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 14 * 14, 2), nn.Softmax(1))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 14 * 14, 2), nn.Softmax(1))
    expected = (r"unsupported layer\(s\): 1 \(Sigmoid: a sigmoid is explained only as the gate g of x \* g\), 4 "
                r"\(Softmax: a softmax is explained only as attention weights \(A @ v\), not as an output or a "
                r"feature\); supported: op kinds layer, affine, norm")
    with pytest.raises(UsageError, match=expected):
        explain(model, images())


class _ImplicitSoftmaxAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(12, 2)
        self.softmax = nn.Softmax()  # the legacy implicit dim

    def forward(self, x: Tensor) -> Tensor:
        weights = self.softmax(self.q(x) @ self.k(x).transpose(1, 2))
        return self.head((weights @ self.v(x)).flatten(1))


def test_attention_softmax_without_a_dim_is_refused() -> None:
    with pytest.raises(UsageError, match=r"softmax \(Softmax: a softmax without an explicit dim has no LRP rule\)"):
        explain(_ImplicitSoftmaxAttention(), torch.randn(2, 3, 4))


def test_model_without_logits_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 2, 3))
    with pytest.raises(UsageError, match=r"must return \(B, K\) logits"):
        explain(model, images())


def test_missing_patterns_name_the_command() -> None:
    model = vgg_like()
    with pytest.raises(UsageError, match="no pattern for layer.*smadlrp fit-patterns"):
        Explainer(model, "patternnet", patterns={"0": torch.zeros(8, 3, 3, 3)})


def test_patternnet_closed_form_through_relu() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    patterns = {"0": torch.randn(4, 5), "2": torch.randn(2, 4)}
    x = torch.randn(3, 5)
    logits = model(x).detach()
    start = torch.zeros_like(logits)
    start[:, 1] = logits[:, 1]
    mask = (model[0](x) > 0).float()
    expected = ((start @ patterns["2"]) * mask) @ patterns["0"]
    torch.testing.assert_close(explain(model, x, "patternnet", 1, patterns=patterns), expected)


@pytest.mark.cuda
def test_cuda_matches_cpu() -> None:
    model, x = vgg_like(), images()
    expected = explain(model, x, "epsilon-gamma-box", mean=MEAN, std=STD)
    got = explain(model.cuda(), x.cuda(), "epsilon-gamma-box", mean=MEAN, std=STD)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-3, atol=1e-5)
