"""Batched scoring: run a classifier over a loader, or over image files, and collect P(attack) per image."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from smadlrp.core.device import autocast
from smadlrp.core.distributed import Ranks, current
from smadlrp.core.errors import SmadlrpError
from smadlrp.data.loading import ImageDataset, Perturb, Prepare, Sample, make_loader
from smadlrp.detector.checkpoint import CheckpointMeta


@dataclass(frozen=True)
class Predictions:
    """Per-image results of one pass: label (int, 1 = attack), attack score P(attack) in [0, 1], dataset index."""

    labels: np.ndarray  # (N,) int64, 1 for the attack class, 0 otherwise
    scores: np.ndarray  # (N,) float64, softmax probability of the attack class
    indices: np.ndarray  # (N,) int64, position of each image in the dataset
    losses: np.ndarray  # (N,) float64, cross-entropy of each image (nats)

    @property
    def loss(self) -> float:
        """Mean cross-entropy over the images (nats); 0 for none."""
        return float(self.losses.sum()) / max(len(self.losses), 1)


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
        losses.append(nn.functional.cross_entropy(logits, targets, reduction="none"))
        scores.append(torch.softmax(logits, dim=1)[:, attack_index])
        labels.append(targets == attack_index)
        indices.append(index)
        if on_batch is not None:
            on_batch(len(index))
    if not indices:
        return Predictions(*(np.zeros(0, dtype=dtype) for dtype in (np.int64, np.float64, np.int64, np.float64)))
    return Predictions(
        labels=torch.cat(labels).cpu().numpy().astype(np.int64),
        scores=torch.cat(scores).double().cpu().numpy(),
        indices=torch.cat(indices).cpu().numpy().astype(np.int64),
        losses=torch.cat(losses).double().cpu().numpy(),
    )


def predict_dataset(model: nn.Module, dataset: Dataset[tuple[torch.Tensor, int, int]], batch_size: int,
                    device: torch.device, attack_index: int, *, workers: int = 0, amp: bool = False,
                    ranks: Ranks | None = None, on_start: Callable[[int], None] = lambda share: None,
                    on_batch: Callable[[int], None] | None = None) -> Predictions:
    """Score every image of `dataset` (items (image, label, index)) in batches of `batch_size`, in dataset order.

    Under torchrun (`ranks`, default: the current ones) each rank scores its share of whole batches, the very
    batches one process would score, and every rank gets all predictions back in dataset order: the scores are
    those of one process, bit for bit, on the same kind of device. `on_start(share)` gets this rank's count.
    """
    ranks = ranks or current()
    share = ranks.shard(len(dataset), batch_size)  # type: ignore[arg-type]
    on_start(len(share))
    loader = make_loader(Subset(dataset, share), batch_size, workers=workers, device=device)
    with ranks.shared_failure():
        local = predict(model, loader, device, attack_index, amp=amp, on_batch=on_batch)
    if not ranks.distributed:
        return local
    parts = ranks.gather(local)
    order = np.argsort(np.concatenate([p.indices for p in parts]), kind="stable")
    return Predictions(*(np.concatenate([getattr(p, name) for p in parts])[order]
                         for name in ("labels", "scores", "indices", "losses")))


@dataclass(frozen=True)
class ImageScore:
    """One image of `score_files`: its morph score P(attack) in [0, 1], or why it could not be scored."""

    path: Path
    score: float | None  # None when the image could not be read
    error: str | None = None


class _Tolerant(Dataset[tuple[torch.Tensor, int, str]]):
    """Items of an ImageDataset as (image, index, error): an unreadable image becomes a zero tensor and the
    one-line reason, so that one bad file does not stop its batch."""

    def __init__(self, dataset: ImageDataset, size: int) -> None:
        self.dataset, self.size = dataset, size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            image, _, _ = self.dataset[index]
        except SmadlrpError as exc:
            return torch.zeros(3, self.size, self.size), index, exc.message
        return image, index, ""


def refuse_non_finite(scores: Sequence[float], paths: Sequence[Path], errors: Sequence[str]) -> None:
    """SmadlrpError naming the first image (not already failed) whose score is NaN or infinity: no decision may
    come from such a model output (NaN is below every threshold and would read "bona fide")."""
    for score, path, error in zip(scores, paths, errors, strict=True):
        if not error and not math.isfinite(score):
            raise SmadlrpError(f"{path}: its score is NaN or infinity: the model output cannot be evaluated")


@torch.inference_mode()
def score_files(model: nn.Module, meta: CheckpointMeta, paths: Sequence[Path], *, batch_size: int,
                device: torch.device, workers: int = 0, amp: bool = False, ranks: Ranks | None = None,
                prepare: Prepare | None = None, perturb: Perturb | None = None,
                on_start: Callable[[int], None] = lambda share: None,
                on_batch: Callable[[int], None] | None = None) -> list[ImageScore]:
    """P(attack) for every image file, in order, preprocessed exactly as `evaluate` does (the checkpoint's input
    size and normalisation); an unreadable file gets its error and the others are still scored, a NaN or infinite
    score is a SmadlrpError naming its image. Under torchrun
    (`ranks`, default: the current ones) each rank scores its share of whole batches and every rank gets all
    results back in order; `on_start(share)` gets this rank's count. `prepare` maps each decoded image first
    (--align: the face crop of the checkpoint's policy); `perturb` then changes it, seeded by its position in
    `paths` (predict --sheet: the decision under JPEG or print-scan)."""
    ranks = ranks or current()
    share = ranks.shard(len(paths), batch_size)
    on_start(len(share))
    model.eval()
    dataset = ImageDataset([Sample(p, 0) for p in paths], meta.input_size, meta.mean, meta.std, prepare=prepare,
                           perturb=perturb)
    loader = DataLoader(Subset(_Tolerant(dataset, meta.input_size), share), batch_size=batch_size,
                        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    results: list[ImageScore] = []
    with ranks.shared_failure():
        for images, indices, errors in loader:
            with autocast(device, amp):
                logits = logits_of(model(images.to(device, non_blocking=True))).float()
            scores = torch.softmax(logits, dim=1)[:, meta.attack_index].double().cpu().tolist()
            refuse_non_finite(scores, [paths[i] for i in indices.tolist()], errors)
            for index, score, error in zip(indices.tolist(), scores, errors, strict=True):
                results.append(ImageScore(paths[index], None, error) if error else ImageScore(paths[index], score))
            if on_batch is not None:
                on_batch(len(errors))
    return ranks.gather_by_position(share, results) if ranks.distributed else results
