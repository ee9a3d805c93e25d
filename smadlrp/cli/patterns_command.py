"""`smadlrp fit-patterns`: fit PatternNet / PatternAttribution patterns of a checkpoint on a data split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from smadlrp.cli import app
from smadlrp.cli.common import (
    AttackLabelOption,
    BatchSizeOption,
    BonafideLabelOption,
    CheckpointOption,
    DataOption,
    DeviceOption,
    JsonOption,
    ProtocolOption,
    SeedOption,
    WorkersOption,
    command,
    console,
    file_plan,
    fit_with_progress,
    write_json,
)
from smadlrp.cli.defaults import (
    data_source,
    find_checkpoint,
    open_model,
)
from smadlrp.core.errors import UsageError
from smadlrp.data.loading import IMAGE_EXTENSIONS
from smadlrp.explain.pattern_file import default_pattern_path
from smadlrp.lrp.patterns import KINDS


@app.command("fit-patterns")
@command(ranks=True)
def fit_patterns_command(
    checkpoint: CheckpointOption = None,
    out: Annotated[Path | None, typer.Option(help="Pattern file to write (.safetensors); default: "
                                                  "patterns.safetensors beside the checkpoint.", dir_okay=False)]
    = None,
    data: DataOption = None,
    protocol: ProtocolOption = None,
    bonafide_label: BonafideLabelOption = "bonafide",
    attack_label: AttackLabelOption = "morph",
    split: Annotated[str, typer.Option(help="Split whose images the patterns are fitted on.")] = "train",
    kind: Annotated[str, typer.Option(help="Estimator: all (linear), positive (two-component), or both.")]
    = "positive",
    max_images: Annotated[int | None, typer.Option("--max-images", min=1,
                                                   help="Fit on a random subset of this many images.")] = None,
    batch_size: BatchSizeOption = 32,
    workers: WorkersOption = 0,
    seed: SeedOption = 0,
    device: DeviceOption = None,
    json_out: JsonOption = None,
) -> None:
    """Fit PatternNet/PatternAttribution patterns for every Conv2d and Linear layer of a checkpoint (under
    torchrun: each process takes a share of the images; the sums are added across processes)."""
    kinds = KINDS if kind == "both" else (kind,)
    if kind != "both" and kind not in KINDS:
        raise UsageError(f"--kind {kind!r}: choose all, positive or both")
    checkpoint = find_checkpoint(checkpoint)
    plan = file_plan({"--json": json_out})
    plan.reads("the checkpoint", checkpoint)
    plan.reads("the protocol file", protocol)
    option = "--out" if out is not None else "the default --out"
    out = out or default_pattern_path(checkpoint)
    plan.writes(option, out)
    model, meta, torch_device = open_model(checkpoint, device)
    source = data_source(data, protocol, bonafide_label, attack_label, meta)
    plan.reads_images_under(f"an image of {source.name}", source.root, IMAGE_EXTENSIONS)
    fit = fit_with_progress(model, meta, checkpoint, source, split, kinds, out, max_images=max_images, seed=seed,
                            batch_size=batch_size, workers=workers, device=torch_device)
    for pattern_set in fit.sets.values():
        table = Table(title=f"{pattern_set.kind} patterns: {pattern_set.images} images")
        for column in ("layer", "samples", "active share", "degenerate units"):
            table.add_column(column, justify="left" if column == "layer" else "right")
        for stats in pattern_set.stats:
            share = "n/a" if stats.active_share is None else f"{stats.active_share:.1%}"
            table.add_row(stats.name, f"{stats.samples:,}", share, f"{stats.degenerate_units} / {stats.units}")
        console.print(table)
    console.print(f"wrote {out}", highlight=False)
    write_json(json_out, {"out": str(out), "images": fit.images, "kinds": list(kinds),
                          "layers": {k: [vars(s) for s in v.stats] for k, v in fit.sets.items()}})
