"""`smadlrp split`: a subject-disjoint protocol file from a folder of bona fide images and morph folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from smadlrp.cli import app
from smadlrp.cli.common import JsonOption, SeedOption, command, console, file_plan, notice, write_json
from smadlrp.core.errors import UsageError
from smadlrp.core.fileio import write_text_atomic
from smadlrp.data.loading import IMAGE_EXTENSIONS
from smadlrp.data.protocol import protocol_csv
from smadlrp.data.split import COLUMNS, MORPH_SET_COLUMNS, PRESETS, SPLITS, parse_ratios, plan_split


@app.command()
@command()
def split(
    folder: Annotated[Path, typer.Argument(help="Folder with a bona fide folder and one folder per morphing "
                                                "method, or a morph set written by `smadlrp morph` (read "
                                                "through its manifest).", file_okay=False)],
    out: Annotated[Path, typer.Option("--out", help="The protocol file to write (CSV).", dir_okay=False)],
    bonafide_dir: Annotated[str, typer.Option("--bonafide-dir", help="The folder (below FOLDER) holding the bona "
                                                                     "fide images.")] = "bonafide",
    subject_regex: Annotated[
        str, typer.Option("--subject-regex", help=f"Subject ids from file names: a preset ({', '.join(PRESETS)}: "
                                                  "bona fide 001_03.jpg, morphs 001_002.jpg) or a regular "
                                                  "expression whose capture groups are the ids.")
    ] = "frll",
    morph_regex: Annotated[
        str | None, typer.Option("--morph-regex", help="A different regular expression for morph file names "
                                                       "(one capture group per contributor).")
    ] = None,
    ratios: Annotated[str, typer.Option(help="Shares of the subjects for train,val,test.")] = "0.7,0.15,0.15",
    seed: SeedOption = 0,
    json_out: JsonOption = None,
) -> None:
    """Write a subject-disjoint protocol file (path,label,split,morph_method,subjects) for a folder: subjects are
    split by seeded ratios, and a morph whose contributors would fall into different splits is dropped."""
    if out.exists():
        raise UsageError(f"--out {out} exists: choose another file name (a protocol file is never overwritten)")
    file_plan({"--out": out, "--json": json_out}).reads_images_under(f"an image of {folder}", folder,
                                                                      IMAGE_EXTENSIONS)
    plan = plan_split(folder, out, bonafide_dir=bonafide_dir, subject_regex=subject_regex, morph_regex=morph_regex,
                      ratios=parse_ratios(ratios), seed=seed)
    columns = MORPH_SET_COLUMNS if any("mask_path" in row for row in plan.rows) else COLUMNS
    write_text_atomic(out, protocol_csv(plan.rows, columns))
    counts = plan.counts()
    table = Table(title=f"{out}: subject-disjoint split of {folder}")
    for column in ("split", "subjects", "bona fide", "morphs"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for name in SPLITS:
        table.add_row(name, *(str(counts[name][key]) for key in ("subjects", "bonafide", "morph")))
    console.print(table)
    dropped = sum(plan.dropped.values())
    console.print(f"dropped {dropped} morph(s) whose contributors fall into different splits"
                  + (f" ({', '.join(f'{m} {n}' for m, n in plan.dropped.items())})" if dropped else ""),
                  highlight=False)
    for name in SPLITS:
        if (counts[name]["bonafide"] == 0) != (counts[name]["morph"] == 0):
            notice(f"warning: split {name!r} has only one class; evaluate and finetune refuse it")
    write_json(json_out, {"out": str(out), "counts": counts, "dropped": dict(plan.dropped),
                          "assignment": dict(plan.assignment)})
