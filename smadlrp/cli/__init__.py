"""The `smadlrp` command line: one typer app; each command lives in a module of this package."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from smadlrp import __version__
from smadlrp.cli.common import state
from smadlrp.cli.help_style import SmadlrpGroup
from smadlrp.core.memory import reuse_freed_memory

app = typer.Typer(
    name="smadlrp",
    cls=SmadlrpGroup,
    help="Single-image morphing attack detection (S-MAD) with Layer-wise Relevance Propagation explanations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"smadlrp {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print more detail.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    config: Annotated[
        Path | None, typer.Option("--config", dir_okay=False,
                                  help="Project configuration file (a smadlrp.toml, or a pyproject.toml with a "
                                       "tool.smadlrp table); default: the first found walking up from here.")
    ] = None,
) -> None:
    """Options that apply to every command (put them before the command name)."""
    reuse_freed_memory()
    state.verbose = verbose
    state.debug = debug
    state.config_path = config
    state.config = None


from smadlrp.cli import (  # noqa: E402,F401  (each module registers its commands)
    align_command,
    compare_command,
    concepts_command,
    dataset_commands,
    evaluate_command,
    explain_commands,
    metrics_command,
    morph_command,
    patterns_command,
    predict_command,
    regions_command,
    report_command,
    split_command,
    train_commands,
    vuln_command,
)


def main() -> None:
    """Console-script entry point."""
    app()
