"""The pattern file of a checkpoint: where it lives by default, whether it fits the weights, fitting it on a split.

`patterns.safetensors` beside a checkpoint is the default output of `fit-patterns` and the default input of the
pattern rules; it is used only when its weights fingerprint matches the checkpoint's.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from smadlrp.core.distributed import current
from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.core.outputs import FilePlan
from smadlrp.data.loading import DataSource, ImageDataset, make_loader
from smadlrp.detector.checkpoint import CheckpointMeta
from smadlrp.explain.run import load_pattern_tensors, pattern_rules, resolve_rules
from smadlrp.lrp.canonize import canonize
from smadlrp.lrp.patterns import (
    FINGERPRINT_KEY,
    PatternSet,
    fit_patterns,
    load_patterns,
    save_patterns,
    weights_fingerprint,
)

DEFAULT_PATTERN_FILE = "patterns.safetensors"
AUTO_FIT_MAX_IMAGES = 512  # images drawn (seeded) from the training split when a pattern rule fits its own file
Warn = Callable[[str], None]


def default_pattern_path(checkpoint: Path) -> Path:
    """`patterns.safetensors` in the checkpoint's folder."""
    return checkpoint.parent / DEFAULT_PATTERN_FILE


def fitted_kinds(path: Path, model: nn.Module) -> tuple[str, ...]:
    """The pattern kinds (positive, all) that `path` holds for exactly these weights; none when it is missing,
    unreadable or fitted on other weights."""
    if not path.is_file():
        return ()
    try:
        sets, meta = load_patterns(path)
    except SmadlrpError:
        return ()
    return tuple(sets) if meta.get(FINGERPRINT_KEY) == weights_fingerprint(model.state_dict()) else ()


class _ImageBatches:
    """The image tensors of a loader's batches, as often as they are iterated (the fit makes two passes)."""

    def __init__(self, loader: DataLoader[tuple[torch.Tensor, int, int]]) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (images for images, _, _ in self.loader)


@dataclass(frozen=True)
class PatternFit:
    """What a fit on a split produced and was written."""

    sets: dict[str, PatternSet]
    images: int
    out: Path


def fit_pattern_file(model: nn.Module, meta: CheckpointMeta, checkpoint: Path, data: DataSource | Path, split: str,
                     kinds: Sequence[str], out: Path, *, max_images: int | None, seed: int, batch_size: int,
                     workers: int, device: torch.device, warn: Warn,
                     on_start: Callable[[int, int], None] = lambda share, n: None,
                     progress: Callable[[int, int], None] | None = None) -> PatternFit:
    """Fit patterns of `kinds` for `model` on one split of `data` (a seeded subset of `max_images` when smaller) and
    write them to `out` with the weights fingerprint. `on_start(share, n)` gets this rank's and the total image
    count before the two passes;
    `progress(pass_number, images)` follows each batch. Under torchrun every rank fits on its share of whole
    batches, the sums are added across ranks, and rank 0 writes the file (which records the world size)."""
    ranks = current()
    fingerprint = weights_fingerprint(model.state_dict())
    canonical = canonize(model, share_weights=True)  # fitting only reads the weights: no second copy
    data = data if isinstance(data, DataSource) else DataSource(Path(data))
    samples = data.split(split, meta.class_names, meta.attack_class, warn=warn).samples
    if max_images is not None and max_images < len(samples):
        samples = sorted(random.Random(seed).sample(samples, max_images), key=lambda s: s.path)
    share = [samples[i] for i in ranks.shard(len(samples), batch_size)]
    on_start(len(share), len(samples))
    loader = make_loader(ImageDataset(share, meta.input_size, meta.mean, meta.std), batch_size,
                         workers=workers, device=device)
    sets = fit_patterns(canonical, _ImageBatches(loader), kinds, device=device, progress=progress, ranks=ranks)
    with ranks.shared_failure():  # once this returns, the file exists for every rank
        if ranks.is_main:
            save_patterns(out, sets, {
                FINGERPRINT_KEY: fingerprint, "checkpoint": checkpoint.name, "architecture": meta.architecture,
                "data": data.name, "split": split, "seed": seed, "world_size": ranks.world_size,
            })
    return PatternFit(sets, len(samples), out)


FitPatterns = Callable[[Path, tuple[str, ...]], object]  # fit the estimators into the file (CLI: with progress)


def rules_and_patterns(requested: Sequence[str], patterns: Path | None, checkpoint: Path, model: nn.Module,
                       meta: CheckpointMeta, kind: str, fit: FitPatterns,
                       notify: Warn = lambda message: None) -> tuple[list[str], dict[str, torch.Tensor] | None]:
    """The rules to run and the patterns they need (the pattern auto-fit policy). Without `patterns`,
    `patterns.safetensors` beside the checkpoint is used when it was fitted on these weights; when a pattern rule
    is asked for by name and that file does not fit, or lacks the estimator `kind` (positive or all), `fit(path,
    kinds)` fits it on the checkpoint's training split (keeping the estimators it held) and writes it there for
    next time. `all` takes the pattern rules only when patterns are available."""
    if patterns is None:
        default = default_pattern_path(checkpoint)
        held = fitted_kinds(default, model)
        needing = [r for r in requested if r in pattern_rules()]
        if needing and kind not in held:
            if meta.training_data is None:
                raise UsageError(f"rule {', '.join(needing)} needs fitted patterns, and {checkpoint} records no "
                                 "training data that still exists to fit them on: run `smadlrp fit-patterns "
                                 "--checkpoint CKPT --data DATA` (it writes patterns.safetensors beside the "
                                 "checkpoint) or pass --patterns FILE")
            plan = FilePlan()
            plan.reads("the checkpoint", checkpoint)
            plan.writes("the pattern file beside it", default)
            fit(default, (*held, kind))
            patterns = default
        elif held:
            patterns = default
            notify(f"patterns: {default}")
    tensors = load_pattern_tensors(patterns, model, kind) if patterns is not None else None
    return resolve_rules(requested, tensors is not None), tensors
