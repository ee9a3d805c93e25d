"""`finetune --frozen --head KIND`: the backbone's features of the training and validation splits, extracted once
(or read from the feature cache, reading no image), and a head fitted on them (`frozen_heads`), recorded as one
epoch of the run: checkpoints, history and validation operating points, like every other run."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from smadlrp.data.loading import ImageDataset
from smadlrp.detector.architecture import Architecture
from smadlrp.detector.features import FeatureCache, FeatureSet, features_for
from smadlrp.detector.frozen_heads import fit_head, head_spec
from smadlrp.detector.inference import Predictions
from smadlrp.detector.models import get_architecture

if TYPE_CHECKING:
    from smadlrp.detector.train import Callbacks, Finetuner


def fit_frozen_head(trainer: Finetuner, callbacks: Callbacks) -> None:
    """Fit `trainer.config.frozen`'s head on the backbone features and record it as epoch 1 (rank 0 writes)."""
    config, start = trainer.config, time.perf_counter()
    arch = get_architecture(config.arch)
    plain_train = ImageDataset(trainer.train_samples, config.image_size, trainer.mean, trainer.std)  # not augmented
    callbacks.epoch_start(1, 0)
    assert isinstance(trainer.val_data, ImageDataset)  # --frozen refuses --selfmorph
    train, val = (_features(trainer, arch, data) for data in (plain_train, trainer.val_data))
    head = fit_head(config.frozen, train.features, train.labels, val.features, val.labels, trainer.attack_index,
                    len(trainer.class_names), config.seed, notify=trainer.notify)
    parent, _, name = arch.head_layers[0].rpartition(".")
    setattr(trainer.model.get_submodule(parent), name, head.to(trainer.device))
    trainer.head_spec = head_spec(head)
    train_loss, train_acc = _loss_and_accuracy(head, train)
    trainer.state.epoch = 0
    trainer.record_epoch(1, (train_loss, train_acc, len(train.labels)), _predictions(head, val, trainer.attack_index),
                         start, callbacks)


def _features(trainer: Finetuner, arch: Architecture, data: ImageDataset) -> FeatureSet:
    config = trainer.config
    return features_for(trainer.model, arch.head_layers, data, input_size=config.image_size, mean=trainer.mean,
                        std=trainer.std, batch_size=config.batch_size, device=trainer.device,
                        cache=FeatureCache(notify=trainer.notify), ranks=trainer.ranks, workers=trainer.workers,
                        amp=config.amp, notify=trainer.notify)


@torch.no_grad()
def _logits(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    parameter = next(iter(head.state_dict().values()))
    return head(features.to(parameter.device, parameter.dtype)).float().cpu()  # type: ignore[no-any-return]


def _loss_and_accuracy(head: nn.Module, split: FeatureSet) -> tuple[float, float]:
    logits = _logits(head, split.features)
    loss = float(nn.functional.cross_entropy(logits, split.labels)) if len(logits) else float("nan")
    accuracy = float((logits.argmax(1) == split.labels).float().mean()) if len(logits) else float("nan")
    return loss, accuracy


def _predictions(head: nn.Module, split: FeatureSet, attack_index: int) -> Predictions:
    """The head's validation predictions, as `predict_dataset` gives them for a trained network."""
    logits = _logits(head, split.features)
    labels = (split.labels == attack_index).numpy().astype(np.int64)
    scores = torch.softmax(logits.double(), 1)[:, attack_index].numpy()
    losses = nn.functional.cross_entropy(logits.double(), split.labels, reduction="none").numpy()
    return Predictions(labels=labels, scores=scores, indices=np.arange(len(labels), dtype=np.int64), losses=losses)
