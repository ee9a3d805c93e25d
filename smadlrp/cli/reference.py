"""Generate the Markdown CLI reference (docs/cli.md) from the typer app: `python -m smadlrp.cli.reference FILE`."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from typer.cli import get_docs_for_click

from smadlrp.cli import app
from smadlrp.core.fileio import write_text_atomic


def cli_reference() -> str:
    """The whole CLI reference as Markdown text."""
    command = typer.main.get_command(app)
    text = get_docs_for_click(obj=command, ctx=typer.Context(command), name="smadlrp", title="CLI reference")
    return text.rstrip() + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m smadlrp.cli.reference OUTPUT.md")
    write_text_atomic(Path(sys.argv[1]), cli_reference())
