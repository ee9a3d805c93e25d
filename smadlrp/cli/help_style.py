"""How the help pages look: plain metavars (TEXT, INTEGER RANGE, PATH..., none for flags) instead of typer's
`<bool>`/`<list[Path]>` style, and the commands listed in the order of the work, not of registration; and how a
command line that cannot be parsed is answered: one red `error:` line, exit 2."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, get_args

import typer.core

try:  # typer >= 0.2x vendors click and renders `<bool>`-style metavars, which this module replaces
    from typer import _click
except ImportError:  # older typer on click: already the plain style
    import click as _click  # type: ignore[no-redef]

from smadlrp.cli.common import fail_line

# The order of the work; a command not listed here follows, in the order it was registered.
COMMAND_ORDER = (
    "synth", "split", "align", "morph", "vuln", "finetune", "evaluate", "metrics", "predict", "fit-patterns",
    "explain", "trace", "compare-rules", "regions", "concepts", "report", "info", "import-model",
)
_TYPE_NAMES = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "bool": "BOOLEAN", "Path": "PATH"}


def plain_metavar(param: typer.core.TyperArgument | typer.core.TyperOption) -> str:
    """The metavar click's plain style gives a parameter: "" for a flag, TEXT, INTEGER RANGE, FILE, [a|b], ..."""
    if isinstance(param, typer.core.TyperOption) and (param.is_flag or param.count):
        return ""
    desc = param.type_descriptor
    if desc.is_choice:
        return "[" + "|".join(str(c) for c in desc.choices or ()) + "]"
    annotation: Any = desc.annotation
    if desc.is_list:
        (annotation,) = get_args(annotation)
    name = getattr(annotation, "__name__", str(annotation))
    if desc.is_path or name == "Path":
        kind = desc.path_type.upper() if desc.is_path else "PATH"
        return kind if kind in ("FILE", "DIRECTORY") else "PATH"
    label = _TYPE_NAMES.get(name, name.upper())
    return f"{label} RANGE" if desc.is_ranged else label


class _PlainArgument(typer.core.TyperArgument):
    """An argument shown by its metavar alone (PATH..., FILE), in the usage line too."""

    def display_type_rich(self, ctx: _click.Context) -> str | None:
        return None

    def _usage_display_name(self) -> str:
        return self.display_name_raw if self.required else f"[{self.display_name_raw}]"


def _plain_help_option(option: _click.Parameter | None) -> None:
    if option is not None:
        option.metavar = ""


class _PlainCommand(typer.core.TyperCommand):
    """A command whose --help option, made by click on first use, is shown without a metavar."""

    def get_help_option(self, ctx: _click.Context) -> Any:
        option = super().get_help_option(ctx)
        _plain_help_option(option)
        return option


def _plain(command: _click.Command) -> None:
    if type(command) is typer.core.TyperCommand:
        command.__class__ = _PlainCommand  # same state, only its help option is rendered differently
    for param in command.params:
        if not hasattr(param, "type_descriptor"):
            continue  # a typer that renders click's plain metavars itself
        if isinstance(param, typer.core.TyperOption) and param.metavar is None:
            param.metavar = plain_metavar(param)
        elif isinstance(param, typer.core.TyperArgument) and param.metavar is None:
            param.metavar = plain_metavar(param) + ("..." if param.nargs != 1 else "")
            param.__class__ = _PlainArgument  # same state, only the rendering of its name differs


def usage_line(error: _click.ClickException) -> str:
    """The one line a command line that cannot be parsed gets: click's message (an unknown option or command, a
    bad or missing value) and where the help is, e.g. "invalid value for '--epochs': ... (see `smadlrp finetune
    --help`)"."""
    message = " ".join(error.format_message().split()).rstrip(".")
    if message[1:2].islower():
        message = message[0].lower() + message[1:]
    ctx = getattr(error, "ctx", None)
    return f"{message} (see `{ctx.command_path} --help`)" if ctx is not None else message


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """Answer a click error while parsing (and Ctrl-C there) with one red line and its exit code, instead of
    typer's usage box; the help that no arguments at all ask for still shows."""
    try:
        yield
    except _click.ClickException as error:
        if error.__class__.__name__ == "NoArgsIsHelpError":  # prints the help, as typer does
            raise
        fail_line(usage_line(error))
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:
        fail_line("interrupted")
        raise typer.Exit(130) from None


class SmadlrpGroup(typer.core.TyperGroup):
    """The top-level command group: plain help metavars on every command, commands in COMMAND_ORDER, one-line
    usage errors (exit 2)."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        _plain(self)
        for command in self.commands.values():
            _plain(command)

    def get_help_option(self, ctx: _click.Context) -> Any:
        option = super().get_help_option(ctx)
        _plain_help_option(option)
        return option

    def make_context(self, info_name: str | None, args: list[str], parent: _click.Context | None = None,
                     **extra: Any) -> _click.Context:
        """Parse the options before the command name (a bad one is one red line)."""
        with _one_line_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: _click.Context) -> Any:
        """Find the command and parse its options (a bad one is one red line), then run it."""
        with _one_line_errors():
            return super().invoke(ctx)

    def list_commands(self, ctx: _click.Context) -> list[str]:
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        names = list(self.commands)
        return sorted(names, key=lambda name: (rank.get(name, len(rank)), names.index(name)))
