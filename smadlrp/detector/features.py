"""Backbone features for frozen heads: the input of a network's classifier layer, extracted once per split and
cached on disk.

`extract_features` runs the network as `predict_dataset` does (the same batches, sharded the same way under
torchrun) and keeps, through a forward pre-hook, the (B, D) input of the head layer instead of the logits.
`FeatureCache` keeps one safetensors file per (backbone weights, split, preprocessing) key, so that a second
`finetune --frozen` on the same split reads no image; `features_for` ties the two together.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from smadlrp.core.container import read_document, read_tensors, write_document
from smadlrp.core.device import autocast
from smadlrp.core.distributed import Ranks, current
from smadlrp.core.errors import SmadlrpError, shorten
from smadlrp.core.fileio import cache_home
from smadlrp.data.loading import ImageDataset, Sample, make_loader

Notify = Callable[[str], None]
FEATURES_SCHEMA = "smadlrp.detector.features/1"
CACHE_ENV = "SMADLRP_CACHE"  # the smadlrp cache folder; features go to its `features/` subfolder


def _silent(_message: str) -> None:
    """A notice callback that says nothing."""


def cache_root() -> Path:
    """smadlrp's cache folder: $SMADLRP_CACHE if set, else ~/.cache/smadlrp (where the synthetic set lives too)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else cache_home()


def default_feature_folder() -> Path:
    """Where cached features go by default: `cache_root() / "features"`."""
    return cache_root() / "features"


# ---- extraction --------------------------------------------------------------------------------------------


def head_module(model: nn.Module, head_layer: str) -> nn.Module:
    """The module at path `head_layer` (e.g. "fc", "heads.head", "classifier.6"); SmadlrpError when absent."""
    try:
        return model.get_submodule(head_layer)
    except AttributeError:
        raise SmadlrpError(f"the network has no layer {head_layer!r} to take features from") from None


def extract_features(model: nn.Module, head_layer: str, dataset: Dataset[tuple[torch.Tensor, int, int]],
                     batch_size: int, device: torch.device, ranks: Ranks | None = None, workers: int = 0, *,
                     amp: bool = False, on_start: Callable[[int], None] = lambda share: None,
                     on_batch: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The input of `model`'s layer `head_layer` for every image of `dataset` (items (image, label, index)):
    features (N, D) float32 and labels (N,) int64, on the CPU, in dataset order.

    The network runs in eval mode under `torch.inference_mode()` (its training mode is restored afterwards) on
    `device`, in batches of `batch_size` (float16 autocast on CUDA with `amp`); a forward pre-hook copies the head's
    input into one preallocated (share, D) float32 buffer on `device`, moved to the CPU once at the end, so that
    extraction costs what inference costs. The head layer must see one feature vector per image, (B, D): a
    convolutional head (SqueezeNet's 1x1 Conv2d) is refused. Under torchrun (`ranks`, default: the current ones)
    each rank extracts its share of whole batches (`Ranks.shard`), the very batches one process would, and every
    rank gets all features back in dataset order, equal to one process's on the same kind of device.
    `on_start(share)` gets this rank's count, `on_batch(n)` each batch's.
    """
    ranks = ranks or current()
    layer = head_module(model, head_layer)
    share = ranks.shard(len(dataset), batch_size)  # type: ignore[arg-type]
    on_start(len(share))
    loader = make_loader(Subset(dataset, share), batch_size, workers=workers, device=device)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _module, args: captured.append(args[0]) if args else None)
    was_training = model.training
    model.eval()
    features = torch.empty(0, 0)
    labels = torch.empty(len(share), dtype=torch.int64)
    try:
        with ranks.shared_failure():
            features = _extract_share(model, head_layer, loader, len(share), device, amp, captured, labels, on_batch)
    finally:
        handle.remove()
        model.train(was_training)
    if not ranks.distributed:
        return features, labels
    return _assemble(ranks.gather((share, features, labels)), len(dataset))  # type: ignore[arg-type]


def _extract_share(model: nn.Module, head_layer: str, loader: Any, count: int, device: torch.device, amp: bool,
                   captured: list[torch.Tensor], labels: torch.Tensor,
                   on_batch: Callable[[int], None] | None) -> torch.Tensor:
    """Run `loader`'s `count` images through `model`; the (count, D) float32 CPU features the hook took, and the
    labels written into `labels` (count,)."""
    buffer: torch.Tensor | None = None  # (count, D) float32 on `device`, a normal tensor (not an inference one)
    position = 0
    with torch.inference_mode():
        for images, targets, _index in loader:
            captured.clear()
            with autocast(device, amp):
                model(images.to(device, non_blocking=True))
            if len(captured) != 1:
                raise SmadlrpError(f"layer {head_layer!r} ran {len(captured)} times for one batch: features are "
                                   "taken from a layer that runs once per forward pass")
            batch = captured.pop()
            size = len(targets)
            if batch.dim() != 2 or batch.shape[0] != size:
                raise SmadlrpError(f"the input of layer {head_layer!r} has shape {tuple(batch.shape)} for a batch of "
                                   f"{size}: a frozen head needs one feature vector per image, (B, D)")
            if buffer is None:
                with torch.inference_mode(False):
                    buffer = torch.empty(count, batch.shape[1], dtype=torch.float32, device=device)
            buffer[position:position + size].copy_(batch)  # one copy: casts, and releases views of larger tensors
            labels[position:position + size].copy_(targets)
            position += size
            if on_batch is not None:
                on_batch(size)
    if buffer is None:
        return torch.empty(0, 0)
    return buffer.cpu()


def _assemble(parts: Sequence[tuple[list[int], torch.Tensor, torch.Tensor]],
              total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (positions, features, labels) merged into (total, D) features and (total,) labels."""
    dims = max((feats.shape[1] for positions, feats, _ in parts if positions), default=0)
    features = torch.empty(total, dims, dtype=torch.float32)
    labels = torch.empty(total, dtype=torch.int64)
    for positions, feats, labs in parts:
        if positions:
            index = torch.tensor(positions, dtype=torch.int64)
            features[index] = feats
            labels[index] = labs
    return features, labels


# ---- cache keys --------------------------------------------------------------------------------------------


def _layers(head_layers: str | Sequence[str]) -> tuple[str, ...]:
    return (head_layers,) if isinstance(head_layers, str) else tuple(head_layers)


def weights_fingerprint(model: nn.Module, head_layers: str | Sequence[str]) -> str:
    """SHA-256 hex digest of every tensor of `model`'s state dict (name, dtype, shape, bytes; sorted by name) but
    those of the head layers `head_layers` (module paths, e.g. ("fc", "AuxLogits.fc")), which do not change the
    features."""
    prefixes = tuple(f"{layer}." for layer in _layers(head_layers))
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        if name.startswith(prefixes):
            continue
        tensor = state[name].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(state[name].shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def samples_fingerprint(samples: Sequence[Sample]) -> str:
    """SHA-256 hex digest of a split: each sample's absolute path, file size (bytes), mtime (ns) and label, in
    order. SmadlrpError "image not found" for a missing file."""
    digest = hashlib.sha256()
    for sample in samples:
        try:
            stat = os.stat(sample.path)
        except OSError:
            raise SmadlrpError(f"image not found: {sample.path}") from None
        digest.update(f"{sample.path.absolute()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{sample.label}\n".encode())
    return digest.hexdigest()


def feature_key(weights: str, samples: Sequence[Sample], head_layer: str, input_size: int, mean: Sequence[float],
                std: Sequence[float], pixels: Mapping[str, Any] | None = None, amp: bool = False) -> str:
    """The cache key (SHA-256 hex) of a split's features: the backbone's `weights_fingerprint`, the split
    (`samples_fingerprint`), the tapped layer, the input side (px), the normalisation, mixed precision and
    `pixels`, a JSON-serialisable description of anything else that changes what the network sees (a face
    alignment policy, a perturbation)."""
    document = {"schema": FEATURES_SCHEMA, "weights": weights, "samples": samples_fingerprint(samples),
                "head_layer": head_layer, "input_size": int(input_size), "mean": [float(m) for m in mean],
                "std": [float(s) for s in std], "pixels": dict(pixels or {}), "amp": bool(amp)}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


# ---- the cache ---------------------------------------------------------------------------------------------


class FeatureCache:
    """One safetensors file per key in `folder` (default `default_feature_folder()`): tensors "features" (N, D)
    float32 and "labels" (N,) int64, and a JSON document (schema, key, count, dims and the caller's fields).

    A file that cannot be read, or does not match its key, is never trusted: `load` reports it through `notify`
    and returns None, and the next `save` rewrites it (atomically).
    """

    def __init__(self, folder: Path | None = None, notify: Notify = _silent) -> None:
        self.folder = Path(folder) if folder is not None else default_feature_folder()
        self.notify = notify

    def path(self, key: str) -> Path:
        """The file of `key`."""
        return self.folder / f"{key}.safetensors"

    def load(self, key: str, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(features (N, D) float32, labels (N,) int64) stored under `key`; None when there is no such file, or
        when it is unreadable or does not match (key, shapes, dtypes, `count` images, finite values): then with a
        notice."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            doc = read_document(path)
            tensors = read_tensors(path)
            problem = _cache_problem(doc, tensors, key, count)
        except SmadlrpError as exc:
            problem = exc.message
        if problem is not None:
            self.notify(f"ignoring the cached features {path}: {shorten(problem.replace(str(path), 'the file'), 160)}; "
                        "extracting them again")
            return None
        return tensors["features"], tensors["labels"]

    def save(self, key: str, features: torch.Tensor, labels: torch.Tensor, doc: Mapping[str, Any]) -> Path:
        """Write `features` (N, D) and `labels` (N,) under `key` atomically, with `doc` (JSON) in the header;
        SmadlrpError when the file cannot be written."""
        if features.dim() != 2 or labels.shape != (features.shape[0],):
            raise ValueError(f"features (N, D) and labels (N,) expected, got {tuple(features.shape)} and "
                             f"{tuple(labels.shape)}")
        document = {**doc, "schema": FEATURES_SCHEMA, "key": key, "count": int(features.shape[0]),
                    "dims": int(features.shape[1])}
        return write_document(self.path(key), {"features": features.float(), "labels": labels.long()}, document)


def _cache_problem(doc: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], key: str,
                   count: int | None) -> str | None:
    """Why a cache file's document and tensors cannot be the features of `key` (`count` images); None if they can."""
    if doc.get("schema") != FEATURES_SCHEMA:
        return f"schema {doc.get('schema')!r}, expected {FEATURES_SCHEMA}"
    if doc.get("key") != key:
        return "written for another key"
    features, labels = tensors.get("features"), tensors.get("labels")
    if features is None or labels is None:
        return "tensors 'features' and 'labels' missing"
    if features.dtype != torch.float32 or features.dim() != 2 or labels.dtype != torch.int64 or labels.dim() != 1:
        return "features must be (N, D) float32 and labels (N,) int64"
    if labels.shape[0] != features.shape[0] or doc.get("count") != features.shape[0] \
            or doc.get("dims") != features.shape[1]:
        return "feature, label and document counts disagree"
    if count is not None and features.shape[0] != count:
        return f"{features.shape[0]} images cached, the split has {count}"
    if not bool(torch.isfinite(features).all()):
        return "non-finite features"
    return None


# ---- cached extraction -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSet:
    """A split's features (N, D) float32 and labels (N,) int64, on the CPU in dataset order; `key` its cache key,
    `cached` whether they were read from the cache (no image was read)."""

    features: torch.Tensor
    labels: torch.Tensor
    key: str
    cached: bool


def features_for(model: nn.Module, head_layers: str | Sequence[str], dataset: ImageDataset, *, input_size: int,
                 mean: Sequence[float], std: Sequence[float], batch_size: int, device: torch.device,
                 cache: FeatureCache | None = None, pixels: Mapping[str, Any] | None = None,
                 ranks: Ranks | None = None, workers: int = 0, amp: bool = False, notify: Notify | None = None,
                 doc: Mapping[str, Any] | None = None, on_start: Callable[[int], None] = lambda share: None,
                 on_batch: Callable[[int], None] | None = None) -> FeatureSet:
    """The features of `dataset` at the input of `head_layers[0]` (the other head layers, e.g. inception_v3's
    AuxLogits.fc, only leave the key), from `cache` when it holds them (reading no image), else extracted
    (`extract_features`) and saved.

    `dataset` must not augment; `input_size` (px), `mean` and `std` must be those it was built with, and `pixels`
    must describe its `prepare` and `perturb` when it has them (they enter the cache key). Under torchrun (`ranks`)
    rank 0 reads the cache and shares what it found, every rank extracts its share on a miss, and only rank 0
    writes; every rank returns the same tensors. A cache file that cannot be written is reported through `notify`
    (default: the cache's) and the features are returned all the same. `doc`: further JSON fields for the cache file.
    """
    if dataset.augment or (dataset.perturb is not None and dataset.perturb_seed is None):
        raise ValueError("features are extracted from a dataset without random augmentation")
    if (dataset.prepare is not None or dataset.perturb is not None) and not pixels:
        raise ValueError("describe the dataset's prepare/perturb in `pixels`: they change the cached features")
    ranks = ranks or current()
    notify = notify or (cache.notify if cache is not None else _silent)
    layers = _layers(head_layers)
    key = feature_key(weights_fingerprint(model, layers), dataset.samples, layers[0], input_size, mean, std,
                      pixels, amp)
    if cache is not None:
        found: tuple[torch.Tensor, torch.Tensor] | None = None
        with ranks.shared_failure():
            if ranks.is_main:
                found = _matching(cache.load(key, len(dataset)), dataset, cache.path(key), notify)
        found = ranks.broadcast(found)
        if found is not None:
            notify(f"reusing cached features {cache.path(key)}")
            return FeatureSet(found[0], found[1], key, cached=True)
    features, labels = extract_features(model, layers[0], dataset, batch_size, device, ranks, workers, amp=amp,
                                        on_start=on_start, on_batch=on_batch)
    if cache is not None:
        with ranks.shared_failure():
            if ranks.is_main:
                record = {**(doc or {}), "head_layer": layers[0], "input_size": int(input_size),
                          "pixels": dict(pixels or {})}
                try:
                    cache.save(key, features, labels, record)
                except SmadlrpError as exc:
                    notify(f"features not cached ({shorten(exc.message, 160)})")
    return FeatureSet(features, labels, key, cached=False)


def _matching(found: tuple[torch.Tensor, torch.Tensor] | None, dataset: ImageDataset, path: Path,
              notify: Notify) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`found` when its labels are the dataset's, else None with a notice."""
    if found is None:
        return None
    expected = torch.tensor([sample.label for sample in dataset.samples], dtype=torch.int64)
    if not torch.equal(found[1], expected):
        notify(f"ignoring the cached features {path}: their labels differ from the split's; extracting them again")
        return None
    return found
