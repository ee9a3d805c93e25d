"""The explanation methods that compare-rules scores, as one kind of function: LRP rules and composites and the
baselines `gradient` (sensitivity, the per-pixel Euclidean norm over channels of the target logit's gradient, as
Samek et al. 2017 use it), `gradient*input` (the gradient times the normalised input, summed over channels) and
`random` (i.i.d. uniform values, seeded per image).

Every method maps (x (B, C, H, W), target (B,), positions of the images in the subset) to maps (B, H, W) at
model-input resolution, so the trained model and every randomised copy of it run through the same batched code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from smadlrp.lrp import Contrast, Explainer

RANDOM = "random"
BASELINES: tuple[str, ...] = ("gradient", "gradient*input", RANDOM)
MapFunction = Callable[[Tensor, Tensor, Sequence[int]], Tensor]  # (x, target, subset positions) -> (B, H, W)


def _input_gradient(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """(B, C, H, W) gradient of each image's target logit with respect to the input."""
    with torch.inference_mode(False), torch.enable_grad():
        leaf = x.detach().clone().requires_grad_(True)
        logits = model(leaf)
        (grad,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), leaf)
    return grad


def baseline_maps(model: nn.Module, seed: int) -> dict[str, MapFunction]:
    """The three baselines as map functions."""

    def gradient(x: Tensor, target: Tensor, positions: Sequence[int]) -> Tensor:
        return _input_gradient(model, x, target).norm(dim=1)

    def gradient_input(x: Tensor, target: Tensor, positions: Sequence[int]) -> Tensor:
        return (_input_gradient(model, x, target) * x).sum(dim=1)

    def random(x: Tensor, target: Tensor, positions: Sequence[int]) -> Tensor:
        shape = x.shape[2:]
        maps = np.stack([np.random.default_rng([seed, p]).random(shape, dtype=np.float32) for p in positions])
        return torch.from_numpy(maps).to(x.device)

    return {"gradient": gradient, "gradient*input": gradient_input, RANDOM: random}


def rule_maps(explainers: Mapping[str, Explainer], contrast: bool = False) -> dict[str, MapFunction]:
    """Each explainer as a map function: its relevance summed over channels (with `contrast`, of the target's
    logit minus the other's)."""

    def bind(explainer: Explainer) -> MapFunction:
        return lambda x, target, positions: explainer.explain(
            x, Contrast(target) if contrast else target).relevance.sum(dim=1)

    return {name: bind(explainer) for name, explainer in explainers.items()}


class LogitDifference(nn.Module):
    """A two-class model's logits minus their swap, (B, 2): column t holds z_t - z_other, the log-odds of class t;
    what a contrastive comparison scores, and differentiates for its gradient baselines."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        return logits - logits.flip(1)  # type: ignore[no-any-return]


def scored_model(model: nn.Module, contrast: bool) -> nn.Module:
    """What is scored and differentiated: the model, or with `contrast` its logit differences."""
    return LogitDifference(model) if contrast else model


def method_maps(model: nn.Module, explainers: Mapping[str, Explainer], contrast: bool,
                seed: int) -> dict[str, MapFunction]:
    """Every rule of `explainers` (built for `model`) and the three baselines of `model`, rules first."""
    return {**rule_maps(explainers, contrast), **baseline_maps(scored_model(model, contrast), seed)}


def runner_up(logits: Tensor, target: Tensor) -> Tensor:
    """(B,) the most likely class other than `target` (for two classes: the other one)."""
    masked = logits.detach().clone()
    masked.scatter_(1, target.view(-1, 1), float("-inf"))
    return masked.argmax(dim=1)
