"""`smadlrp synth` (the embedded synthetic data set) and `smadlrp info` (what a smadlrp file holds)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from smadlrp.cli import app
from smadlrp.cli.common import (
    JsonOption,
    command,
    console,
    file_plan,
    progress_bar,
    write_json,
)
from smadlrp.cli.defaults import (
    find_checkpoint,
)
from smadlrp.core.container import read_document, read_header
from smadlrp.core.errors import UsageError
from smadlrp.data.synthetic.generator import CORNERS, SHORTCUT_KINDS, SynthConfig, generate_dataset
from smadlrp.detector.checkpoint import CHECKPOINT_SCHEMA, CheckpointMeta
from smadlrp.evaluation.report import operating_points_table


@app.command()
@command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the data set into (must be empty or absent).",
                                        file_okay=False)],
    identities: Annotated[int, typer.Option(help="Number of synthetic identities (split 80/10/10 by identity).")]
    = SynthConfig.identities,
    image_size: Annotated[int, typer.Option("--image-size", help="Image side, pixels.")] = 128,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives byte-identical files.")] = 0,
    morph_types: Annotated[
        str, typer.Option("--morph-types", help="Comma-separated morph types: complete, splicing, partial.")
    ] = "complete,splicing,partial",
    shortcut: Annotated[str, typer.Option(
        help=f"Plant a known shortcut in some morphs: {', '.join(SHORTCUT_KINDS)} (a faint fixed pattern near "
             "one corner).")] = "",
    shortcut_fraction: Annotated[float, typer.Option("--shortcut-fraction",
                                                     help="Share of the morphs of each named split that carry it.")]
    = SynthConfig.shortcut_fraction,
    shortcut_splits: Annotated[str, typer.Option("--shortcut-splits",
                                                 help="Comma-separated splits whose morphs carry it.")] = "train",
    shortcut_corner: Annotated[str, typer.Option("--shortcut-corner", help=f"Where: {', '.join(CORNERS)}.")]
    = SynthConfig.shortcut_corner,
    overwrite: Annotated[bool, typer.Option(help="Replace a previous smadlrp synthetic set in OUT.")] = False,
    json_out: JsonOption = None,
) -> None:
    """Generate the synthetic S-MAD data set: faces, morphs, artifact masks, face-region maps and a manifest."""
    types = _names(morph_types)
    fields: dict[str, Any] = {"identities": identities, "image_size": image_size, "seed": seed, "morph_types": types}
    if shortcut:
        fields |= {"shortcut": shortcut, "shortcut_fraction": shortcut_fraction,
                   "shortcut_splits": _names(shortcut_splits), "shortcut_corner": shortcut_corner}
    config = SynthConfig(**fields)
    with progress_bar() as bar:
        task = bar.add_task("drawing faces and morphs", total=None)
        summary = generate_dataset(out, config, overwrite=overwrite,
                                   progress=lambda done, total: bar.update(task, completed=done, total=total))
    table = Table(title="synthetic S-MAD data set")
    table.add_column("split")
    table.add_column("bonafide", justify="right")
    table.add_column("morph", justify="right")
    if shortcut:
        table.add_column(f"{shortcut}", justify="right")
    for split, counts in summary.counts.items():
        marked = [str(summary.shortcut_counts[split])] if shortcut else []
        table.add_row(split, str(counts.get("bonafide", 0)), str(counts.get("morph", 0)), *marked)
    console.print(table)
    console.print(f"wrote {out} (synthetic faces: they exercise the pipeline and the explanations, not real-world "
                  "MAD accuracy)", highlight=False)
    write_json(json_out, {"out": str(out), "config": fields, "counts": summary.counts,
                          "shortcut_counts": summary.shortcut_counts})


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


@app.command()
@command()
def info(
    file: Annotated[Path | None, typer.Argument(help="A smadlrp checkpoint or pattern file (.safetensors); default: "
                                                     "the checkpoint the other commands would use.", dir_okay=False)]
    = None,
    json_out: JsonOption = None,
) -> None:
    """Print the metadata of a smadlrp checkpoint or pattern file."""
    file = find_checkpoint(file)
    file_plan({"--json": json_out}).reads("the file it describes", file)
    header, _ = read_header(file)
    doc = read_document(file)
    if doc["schema"] == CHECKPOINT_SCHEMA:
        CheckpointMeta.from_document(doc, file)
    elif not str(doc["schema"]).startswith("smadlrp."):
        raise UsageError(f"{file}: unknown smadlrp schema {doc['schema']!r}")
    n_values = sum(_numel(entry["shape"]) for entry in header.values())
    table = Table(title=str(file), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    points = doc.get("operating_points") if doc["schema"] == CHECKPOINT_SCHEMA else None
    for key, value in doc.items():
        if key == "operating_points" and points:
            value = "below"
        table.add_row(escape(key), escape(value if isinstance(value, str) else json.dumps(value, sort_keys=True)))
    table.add_row("tensors", f"{len(header)} ({n_values:,} values)")
    console.print(table)
    if points:
        console.print(operating_points_table(points))
    write_json(json_out, {"file": str(file), "metadata": doc, "tensors": len(header), "values": n_values})


def _numel(shape: list[int]) -> int:
    total = 1
    for n in shape:
        total *= n
    return total
