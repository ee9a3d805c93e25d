"""LRP on the traced graph of torchvision architectures: LRP-0 equals gradient x input on piecewise-linear
networks, relevance is conserved on bias-free ones, and anything without a rule is refused before any
relevance is computed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import Tensor, nn
from typer.testing import CliRunner

import smadlrp.lrp as lrp
from smadlrp.cli import app
from smadlrp.core.device import num_threads
from smadlrp.core.errors import UsageError
from smadlrp.detector import architecture, models
from smadlrp.detector.architecture import CompactVGG
from smadlrp.detector.checkpoint import CheckpointMeta, save_checkpoint

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with num_threads(1):
        yield


def build(name: str, **kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    if name == "inception_v3":
        kwargs = {"aux_logits": False, "init_weights": False, "transform_input": False, **kwargs}
    return torchvision.models.get_model(name, weights=None, num_classes=3, **kwargs).eval()


def randomise_batchnorm(model: nn.Module) -> None:
    """Random running statistics and affine parameters: folding and the affine rule then matter."""
    torch.manual_seed(1)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.2, 0.2)  # type: ignore[union-attr]
                bn.running_var.uniform_(0.5, 2.0)  # type: ignore[union-attr]
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)


def zero_biases(model: nn.Module) -> None:
    """Every bias zero (BatchNorm keeps its default statistics, so folding adds none)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) and m.bias is not None:
                m.bias.zero_()


def images(size: int, batch: int = 2) -> Tensor:
    """Normalised images: pixels in [0, 1] through (p - MEAN) / STD (inside the zbox bounds)."""
    torch.manual_seed(2)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (torch.rand(batch, 3, size, size) - mean) / std


def gradient_x_input(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(gradient x input of the predicted logit, that logit) per sample."""
    leaf = x.clone().requires_grad_(True)
    logits = model(leaf)
    picked = logits[torch.arange(len(x)), logits.argmax(1)]
    (grad,) = torch.autograd.grad(picked.sum(), leaf)
    return grad * x, picked.detach()


def relative_l2(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


IDENTITY = [("resnet18", 32), ("resnet50", 32), ("densenet121", 32), ("inception_v3", 75),
            ("squeezenet1_1", 48), ("mobilenet_v2", 32)]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("name", "size"), IDENTITY)
def test_zero_rule_is_gradient_times_input(name: str, size: int) -> None:
    model = build(name)
    randomise_batchnorm(model)
    x = images(size)
    saturated: list[bool] = []
    hooks = [m.register_forward_hook(lambda _m, _a, out: saturated.append(bool((out >= 6).any())))
             for m in model.modules() if isinstance(m, nn.ReLU6)]  # fmt: skip
    canonical = lrp.canonize(model)
    torch.testing.assert_close(canonical(x), model(x), rtol=1e-4, atol=1e-6)
    for hook in hooks:
        hook.remove()
    assert not any(saturated)  # ReLU6 is piecewise linear only below 6: the identity needs no saturation
    # The reference is taken on the canonized copy: the same function, and the same rounding, so that no ReLU
    # or max-pool tie flips between the two forward passes.
    expected, _ = gradient_x_input(canonical, x)
    relevance = lrp.explain(model, x, "zero")
    assert relative_l2(relevance, expected) <= 1e-4


@pytest.mark.slow
def test_inception_transform_input_is_an_affine_node() -> None:
    model = build("inception_v3", transform_input=True)
    x = images(75, batch=1)
    expected, _ = gradient_x_input(lrp.canonize(model), x)
    assert relative_l2(lrp.explain(model, x, "zero"), expected) <= 1e-4


CONSERVING: list[tuple[str, dict[str, Any]]] = [
    ("zero", {}),
    ("alpha1beta0", {}),
    ("alpha2beta1", {}),
    ("zbox", {"mean": MEAN, "std": STD}),  # z^B on the first layer, LRP-0 on the others
    ("epsilon-plus-flat", {"epsilon": 0.0}),
    ("epsilon-gamma-box", {"mean": MEAN, "std": STD, "epsilon": 0.0}),
]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "densenet121", "efficientnet_b0", "mobilenet_v3_small"])
def test_relevance_is_conserved_without_biases(name: str) -> None:
    model = build(name)
    zero_biases(model)
    x = images(32, batch=1)
    _, logit = gradient_x_input(model, x)
    for rule, params in CONSERVING:
        sums = lrp.Explainer(model, rule, **params).explain(x).relevance.sum((1, 2, 3))
        torch.testing.assert_close(sums, logit, rtol=1e-4, atol=0.0, msg=lambda m, r=rule: f"{r}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "squeezenet1_1"])
def test_relu_identity_equals_the_relu_gradient(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """ReLUs pass relevance unchanged; for rules that give no relevance to zero inputs this is exactly what
    their gradient gives (relevance reaches a ReLU's output only where the output is not 0)."""
    model, x = build(name), images(32)
    randomise_batchnorm(model)
    methods = [("zero", {}), ("epsilon-gamma-box", {"mean": MEAN, "std": STD}), ("epsilon-plus", {}),
               ("alpha2beta1", {})]  # fmt: skip
    identity = {m: lrp.Explainer(model, m, **p).explain(x).relevance for m, p in methods}
    assert all(lrp.Explainer(model, m, **p).composite.relu_identity for m, p in methods)
    monkeypatch.setattr(lrp.Composite, "relu_identity", property(lambda self: False))
    for method, params in methods:
        gradient = lrp.Explainer(model, method, **params).explain(x).relevance
        torch.testing.assert_close(identity[method], gradient, rtol=1e-5, atol=1e-7 * float(gradient.abs().max()))


def test_relu_keeps_its_gradient_after_a_rule_that_gives_zero_inputs_relevance() -> None:
    """flat on a later layer gives relevance to the zeros a ReLU put out; the ReLU then keeps its gradient, so
    the layer before it (whose rule counts on no relevance at negative outputs) never sees any there."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()  # fmt: skip
    x = images(8)
    explainer = lrp.Explainer(model, "gamma", overrides={1: "flat"})
    assert not explainer.composite.relu_identity
    with lrp.trace() as t:
        explainer.explain(x)
    records = {r.name: r.relevance for r in t.records}
    z = model[0](x).detach()
    assert bool((records["2"][z <= 0] != 0).any())  # flat's relevance at the ReLU's zero outputs
    assert bool((records["1"][z <= 0] == 0).all())  # masked by the ReLU's gradient


class TwoBranches(nn.Module):
    """head(fa(x) + fb(x)), bias-free: a sum whose terms have either sign."""

    def __init__(self) -> None:
        super().__init__()
        self.fa, self.fb = nn.Linear(3, 4, bias=False), nn.Linear(3, 4, bias=False)
        self.head = nn.Linear(4, 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.fa(x) + self.fb(x))


def test_absolute_sum_split_matches_a_hand_computation() -> None:
    torch.manual_seed(5)
    model, x = TwoBranches().eval(), torch.randn(3, 3)
    relevance = lrp.explain(model, x, "zero", sum_split="absolute")
    with torch.no_grad():  # by hand in float64: R_y = y w_t (LRP-0 at the head), then |a| / (|a| + |b|) R_y
        xd, wa, wb = x.double(), model.fa.weight.double(), model.fb.weight.double()
        a, b = xd @ wa.T, xd @ wb.T
        logits = (a + b) @ model.head.weight.double().T
        k = logits.argmax(1)
        r_y = (a + b) * model.head.weight.double()[k]
        r_a, r_b = a.abs() / (a.abs() + b.abs()) * r_y, b.abs() / (a.abs() + b.abs()) * r_y
        expected = xd * ((r_a / a) @ wa) + xd * ((r_b / b) @ wb)
    torch.testing.assert_close(relevance.double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(relevance.sum(1).double(), logits[torch.arange(3), k], rtol=1e-4, atol=0.0)
    # the z-rule split gives gradient x input instead, which differs where a and b have opposite signs
    z_split = lrp.explain(model, x, "zero")
    assert not torch.allclose(z_split, relevance, rtol=1e-3)


@pytest.mark.slow
def test_absolute_sum_split_conserves_on_a_bias_free_resnet() -> None:
    model = build("resnet18")
    zero_biases(model)
    x = images(32, batch=1)
    _, logit = gradient_x_input(model, x)
    for rule in ("zero", "alpha1beta0"):
        sums = lrp.Explainer(model, rule, sum_split="absolute").explain(x).relevance.sum((1, 2, 3))
        torch.testing.assert_close(sums, logit, rtol=1e-4, atol=0.0)


def test_bad_sum_split_is_one_line() -> None:
    with pytest.raises(UsageError, match="sum_split must be z or absolute, got 'half'"):
        lrp.Explainer(TwoBranches(), "zero", sum_split="half")
    with pytest.raises(UsageError, match="sum_split applies to relevance rules"):
        lrp.Explainer(TwoBranches(), "patternnet", sum_split="absolute", patterns={})


class Square(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        h = torch.sin(h) + h.exp()
        return self.fc(h.mean((2, 3)))


class ScaledSigmoid(Square):
    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.sigmoid(self.conv(x)).mean((2, 3)) * 3)


class Branching(Square):
    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            x = -x
        return self.fc(self.conv(x).mean((2, 3)))


def test_ops_without_a_rule_are_refused_by_name() -> None:
    with pytest.raises(UsageError, match=r"unsupported layer\(s\): sin \(torch\.sin: no LRP rule for this operation\), "
                       r"exp \(Tensor\.exp: no LRP rule") as info:
        lrp.explain(Square(), images(8))
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match=r"unsupported layer\(s\): sigmoid \(torch\.sigmoid: a sigmoid is "):
        lrp.Explainer(ScaledSigmoid())
    with pytest.raises(UsageError, match="cannot explain Branching: torch.fx cannot trace its forward pass"):
        lrp.Explainer(Branching())


def test_gate_branch_gets_no_relevance_and_module_reuse_works() -> None:
    """A squeeze-excitation gate is a constant: the relevance of x * g(x) all goes to x."""

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.squeeze = nn.Conv2d(4, 4, 1)
            self.relu = nn.ReLU()
            self.fc = nn.Linear(4, 2, bias=False)

        def forward(self, x: Tensor) -> Tensor:
            h = self.relu(self.conv(x))
            g = torch.sigmoid(self.squeeze(h.mean((2, 3), keepdim=True)))
            return self.fc(self.relu(h * g + h).mean((2, 3)))

    torch.manual_seed(3)
    model, x = Gated().eval(), images(8)
    with lrp.trace() as t:
        relevance = lrp.explain(model, x, "zero")
    # By hand: R at h * g + h splits by the z-rule; the gated half passes to h unchanged.
    h = model.relu(model.conv(x))
    g = torch.sigmoid(model.squeeze(h.mean((2, 3), keepdim=True)))
    y = model.relu(h * g + h)
    logits = model.fc(y.mean((2, 3)))
    k = logits.argmax(1)
    c = model.fc.weight[k][:, :, None, None] / (y.shape[2] * y.shape[3])  # R_y = y * c through mean and fc
    r_h = (y * c) / (h * g + h) * (h * g) + (y * c) / (h * g + h) * h
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((model.conv(leaf) * (r_h / model.conv(x)).nan_to_num(0.0).detach()).sum(), leaf)
    expected = grad * x
    torch.testing.assert_close(relevance, expected.detach(), rtol=1e-4, atol=1e-6)
    names = [r.name for r in t.records]
    assert "squeeze" not in names and "sigmoid" not in names  # the gate's branch carries no relevance
    assert names.count("relu") == 1 and "relu#2" in names  # one module called twice: two nodes


def test_cli_refuses_a_model_without_a_rule_in_one_red_line(
    tiny_checkpoint: Path, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class SquaringVGG(CompactVGG):
        def forward(self, x: Tensor) -> Tensor:
            h = self.features(x)
            return self.classifier(self.flatten(self.pool(torch.sin(h))))

    monkeypatch.setattr(architecture, "CompactVGG", SquaringVGG)
    image = tiny_data / "test" / "morph" / "test_morph_00.png"
    result = CliRunner().invoke(app, ["explain", str(image), "--checkpoint", str(tiny_checkpoint),
                                      "--out", str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()  # the device line, then the error
    assert "Traceback" not in result.output and lines[-1].startswith("error: ")
    assert "cannot explain unsupported layer(s): sin (torch.sin: no LRP rule for this operation)" in lines[-1]


@pytest.mark.slow
def test_resnet_checkpoint_end_to_end(tiny_data: Path, tmp_path: Path) -> None:
    """explain --rule all, trace --rule zero (conserving: every main-path row has ratio 1), fit-patterns and
    PatternAttribution on a random resnet18 checkpoint at 32 px whose only bias, the classifier's, is zero."""
    torch.manual_seed(4)
    model, source = models.build_model("resnet18", 2, "none")
    zero_biases(model)
    checkpoint = tmp_path / "resnet18.safetensors"
    save_checkpoint(checkpoint, model, CheckpointMeta("resnet18", ["bonafide", "morph"], "morph", 32, MEAN, STD,
                                                      source))  # fmt: skip
    image = str(tiny_data / "test" / "morph" / "test_morph_03.png")
    common = ["--checkpoint", str(checkpoint), "--device", "cpu"]

    def run(*args: str) -> None:
        result = CliRunner().invoke(app, [*args, *common])
        assert result.exit_code == 0, result.output

    run("explain", image, "--rule", "all", "--out", str(tmp_path / "all"))
    run("trace", image, "--rule", "zero", "--out", str(tmp_path / "trace"), "--json", str(tmp_path / "trace.json"))
    rows = json.loads((tmp_path / "trace.json").read_text())["layers"]
    main_path = [row for row in rows if row["name"] in ("conv1", "output") or row["name"].endswith(".add")]
    assert len(main_path) == 10
    assert all(row["ratio"] == pytest.approx(1.0, abs=1e-4) for row in main_path)
    run("trace", image, "--rule", "zero", "--sum-split", "absolute", "--out", str(tmp_path / "abs"), "--json",
        str(tmp_path / "abs.json"))
    stored = json.loads((tmp_path / "abs.json").read_text())
    assert stored["sum_split"] == "absolute"
    assert all(row["ratio"] == pytest.approx(1.0, abs=1e-4) for row in stored["layers"]
               if row["name"] in ("conv1", "output") or row["name"].endswith(".add"))  # fmt: skip
    assert [r["sum"] for r in stored["layers"]] != [r["sum"] for r in rows]
    bad = CliRunner().invoke(app, ["trace", image, "--sum-split", "half", *common, "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--sum-split 'half': choose z or absolute" in bad.output
    assert "Traceback" not in bad.output
    patterns = str(tmp_path / "patterns.safetensors")
    run("fit-patterns", "--data", str(tiny_data), "--max-images", "8", "--out", patterns)
    run("explain", image, "--rule", "patternattribution", "--patterns", patterns, "--out", str(tmp_path / "pa"))
