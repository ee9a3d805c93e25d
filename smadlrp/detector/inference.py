"""Batched scoring: run a classifier over a loader and collect P(attack) per image."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from smadlrp.core.device import autocast


@dataclass(frozen=True)
class Predictions:
    """Per-image results of one pass: label (int, 1 = attack), attack score P(attack) in [0, 1], dataset index."""

    labels: np.ndarray  # (N,) int64, 1 for the attack class, 0 otherwise
    scores: np.ndarray  # (N,) float64, softmax probability of the attack class
    indices: np.ndarray  # (N,) int64, position of each image in the dataset
    loss: float  # mean cross-entropy over the images (nats)


def logits_of(output: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The main logits of a model output (inception_v3 in training mode returns (logits, aux_logits))."""
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
            device: torch.device, attack_index: int, *, amp: bool = False,
            on_batch: Callable[[int], None] | None = None) -> Predictions:
    """Score every image of `batches` (images (B,3,H,W), class labels (B,), indices (B,)) in eval mode."""
    model.eval()
    labels, scores, indices, losses = [], [], [], []
    for images, targets, index in batches:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = logits_of(model(images)).float()
        losses.append(nn.functional.cross_entropy(logits, targets, reduction="sum"))
        scores.append(torch.softmax(logits, dim=1)[:, attack_index])
        labels.append(targets == attack_index)
        indices.append(index)
        if on_batch is not None:
            on_batch(len(index))
    n = sum(len(i) for i in indices)
    return Predictions(
        labels=torch.cat(labels).cpu().numpy().astype(np.int64),
        scores=torch.cat(scores).double().cpu().numpy(),
        indices=torch.cat(indices).cpu().numpy().astype(np.int64),
        loss=float(torch.stack(losses).sum().item()) / max(n, 1),
    )
