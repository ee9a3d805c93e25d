"""`smadlrp fit-patterns`: fit PatternNet / PatternAttribution patterns of a checkpoint on a data split."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.table import Table
from torch.utils.data import DataLoader

from smadlrp.cli import app
from smadlrp.cli.common import (
    BatchSizeOption,
    CheckpointOption,
    DataOption,
    DeviceOption,
    ImagesPerSecond,
    JsonOption,
    SeedOption,
    WorkersOption,
    console,
    data_root,
    handle_errors,
    notice,
    pick_device,
    progress_bar,
    write_json,
)
from smadlrp.core.errors import UsageError
from smadlrp.data.loading import ImageDataset, make_loader, scan_split
from smadlrp.detector.checkpoint import load_checkpoint
from smadlrp.lrp.canonize import canonize
from smadlrp.lrp.patterns import FINGERPRINT_KEY, KINDS, fit_patterns, save_patterns, weights_fingerprint


class _ImageBatches:
    """The image tensors of a loader's batches, as often as they are iterated (the fit makes two passes)."""

    def __init__(self, loader: DataLoader[tuple[torch.Tensor, int, int]]) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (images for images, _, _ in self.loader)


@app.command("fit-patterns")
@handle_errors
def fit_patterns_command(
    checkpoint: CheckpointOption,
    out: Annotated[Path, typer.Option(help="Pattern file to write (.safetensors).", dir_okay=False)],
    data: DataOption = None,
    split: Annotated[str, typer.Option(help="Split whose images the patterns are fitted on.")] = "train",
    kind: Annotated[str, typer.Option(help="Estimator: all (linear), positive (two-component), or both.")]
    = "positive",
    max_images: Annotated[int | None, typer.Option("--max-images", min=1,
                                                   help="Fit on a random subset of this many images.")] = None,
    batch_size: BatchSizeOption = 32,
    workers: WorkersOption = 0,
    seed: SeedOption = 0,
    device: DeviceOption = "auto",
    json_out: JsonOption = None,
) -> None:
    """Fit PatternNet/PatternAttribution patterns for every Conv2d and Linear layer of a checkpoint."""
    kinds = KINDS if kind == "both" else (kind,)
    if kind != "both" and kind not in KINDS:
        raise UsageError(f"--kind {kind!r}: choose all, positive or both")
    torch_device = pick_device(device)
    model, meta = load_checkpoint(checkpoint, torch_device)
    fingerprint = weights_fingerprint(model.state_dict())
    canonical = canonize(model, share_weights=True)  # fitting only reads the weights: no second copy
    root = data_root(data)
    samples = scan_split(root, split, meta.class_names, warn=notice).samples
    if max_images is not None and max_images < len(samples):
        samples = sorted(random.Random(seed).sample(samples, max_images), key=lambda s: s.path)
    loader = make_loader(ImageDataset(samples, meta.input_size, meta.mean, meta.std), batch_size,
                         workers=workers, device=torch_device)
    images = _ImageBatches(loader)
    with progress_bar(ImagesPerSecond()) as bar:
        tasks = [bar.add_task(f"{'+'.join(kinds)} patterns, {step}", total=len(samples))
                 for step in ("pass 1/2: unit means", "pass 2/2: statistics")]
        sets = fit_patterns(canonical, images, kinds, device=torch_device,
                            progress=lambda pass_number, n: bar.advance(tasks[pass_number - 1], n))
    save_patterns(out, sets, {
        FINGERPRINT_KEY: fingerprint, "checkpoint": checkpoint.name, "architecture": meta.architecture,
        "data": str(root), "split": split, "seed": seed,
    })
    for pattern_set in sets.values():
        table = Table(title=f"{pattern_set.kind} patterns: {pattern_set.images} images")
        for column in ("layer", "samples", "active share", "degenerate units"):
            table.add_column(column, justify="left" if column == "layer" else "right")
        for stats in pattern_set.stats:
            share = "n/a" if stats.active_share is None else f"{stats.active_share:.1%}"
            table.add_row(stats.name, f"{stats.samples:,}", share, f"{stats.degenerate_units} / {stats.units}")
        console.print(table)
    console.print(f"wrote {out}", highlight=False)
    write_json(json_out, {"out": str(out), "images": len(samples), "kinds": list(kinds),
                          "layers": {k: [vars(s) for s in v.stats] for k, v in sets.items()}})
