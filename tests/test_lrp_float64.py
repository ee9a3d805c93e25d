"""Float64 certification: on every registry architecture without a transformer block, LRP-0 of the float64 model
equals gradient x input of the network linearised at its input (activation gains, gates and norms' sigma held at
their forward-pass values; tests/linearised.py) to 1e-10, at the smallest side the architecture accepts."""

from __future__ import annotations

import math

import pytest
import torch
from linearised import linearised
from torch import Tensor, nn

import smadlrp.lrp as lrp
from smadlrp.detector.models import ARCHITECTURES

TRANSFORMER_FAMILIES = ("vit_", "swin_", "maxvit_", "clip_vit_", "timm/vit_")
CNNS = [name for name in ARCHITECTURES if not name.startswith(TRANSFORMER_FAMILIES)]
# one network per family in `make test`; the sweep over all of them (about 2 minutes) in `make test-all`
FAMILIES = {"vgg11_bn", "alexnet", "resnet50", "densenet121", "inception_v3", "googlenet", "squeezenet1_1",
            "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "efficientnet_v2_s", "mnasnet0_5",
            "shufflenet_v2_x0_5", "regnet_y_400mf", "regnet_x_400mf", "convnext_tiny", "vgg_compact"}


pytestmark = pytest.mark.usefixtures("spare_cores")


def random_float64(name: str, side: int) -> nn.Module:
    """The registry network with 3 classes, built on the meta device and filled in float64 on the CPU: weights
    N(0, 1/fan_in), biases and norm parameters random, BatchNorm statistics random (faster than each builder's
    own initialisation, and nothing is left at a degenerate value)."""
    with torch.device("meta"):
        model = ARCHITECTURES[name].build(3, image_size=side)
    model = model.to_empty(device="cpu").double().eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param_name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not t.is_floating_point():
                t.zero_()
            elif param_name.endswith("running_var"):
                t.uniform_(0.5, 2.0, generator=generator)
            elif t.dim() <= 1:  # biases > 0 keep ReLU networks alive at the smallest side (squeezenet's head)
                t.uniform_(0.0, 0.2, generator=generator)
                if param_name.endswith("weight"):
                    t.add_(0.9)
            else:
                t.normal_(0.0, 1.0 / math.sqrt(t[0].numel()), generator=generator)
    return model


def relative_l2(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAMILIES else pytest.mark.sweep) for n in CNNS])
def test_float64_zero_rule_is_gradient_times_input(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    side = ARCHITECTURES[name].min_size
    model = random_float64(name, side)
    x = torch.randn(1, 3, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = lrp.Explainer(model, "zero").explain(x)
    assert result.relevance.dtype == torch.float64 and result.logits.abs().max() > 0
    canonical = lrp.canonize(model)  # the same function; the reference needs no folding, but the same rounding
    for param in canonical.parameters():
        param.requires_grad_(False)
    with linearised(monkeypatch):
        leaf = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(canonical(leaf)[0, result.target[0]], leaf)
    assert relative_l2(result.relevance, grad * x) <= 1e-10
