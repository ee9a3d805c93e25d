"""`smadlrp report`: one self-contained HTML page from what the commands wrote in one or more run folders."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from smadlrp.cli import app
from smadlrp.cli.common import JsonOption, command, console, file_plan, write_json
from smadlrp.core.fileio import write_text_atomic
from smadlrp.report.build import build_page
from smadlrp.report.collect import collect_runs
from smadlrp.report.errors import ERRORS_RULE, errors_section
from smadlrp.report.sheet import check_rule


@app.command()
@command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run folders: where finetune, evaluate, compare-rules, regions "
                                                    "and explain wrote their files (e.g. demo/).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.", dir_okay=False)]
    = Path("report.html"),
    title: Annotated[str | None, typer.Option(help="The page's title; default: the run names.")] = None,
    explain_errors: Annotated[int | None, typer.Option(
        "--explain-errors", min=1, metavar="N", help="Add an Errors section: per run the N most confident false "
        "accepts and false rejects (from its evaluate --scores file) with their heatmaps; loads the checkpoint.")]
    = None,
    errors_rule: Annotated[str, typer.Option("--errors-rule", help="The Errors section's heatmap rule (no pattern "
                                                                   "rules).")] = ERRORS_RULE,
    json_out: JsonOption = None,
) -> None:
    """One self-contained HTML report (inline figures, no scripts, opens offline) of the detector, its evaluation,
    its explanations and robustness, with one column per run; it runs no model unless --explain-errors asks."""
    start = time.perf_counter()
    plan = file_plan({"--out": out, "--json": json_out})
    rule = check_rule(errors_rule, option="--errors-rule", command="report")
    collected = collect_runs(runs)
    for run in collected:
        plan.reads(f"a file of the run {run.name}", run.read.values())
    extra = [errors_section(collected, explain_errors, rule)] if explain_errors else []
    page = build_page(collected, title=title, extra=extra)
    write_text_atomic(out, page.html)
    seconds = time.perf_counter() - start
    for line in page.left_out:
        console.print(f"not in the report: {line}", highlight=False, soft_wrap=True)
    console.print(f"wrote {out} ({len(page.html.encode()) / 1e6:.2f} MB, {len(page.sections)} sections from "
                  f"{len(page.runs)} run(s)) in {seconds:.1f} s", highlight=False)
    write_json(json_out, {**page.as_json(), "out": str(out), "seconds": seconds})
