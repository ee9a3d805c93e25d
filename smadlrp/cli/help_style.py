"""How the help pages look: plain metavars (TEXT, INTEGER RANGE, PATH..., none for flags) instead of typer's
`<bool>`/`<list[Path]>` style, and the commands listed in the order of the work, not of registration."""

from __future__ import annotations

from typing import Any, get_args

import typer.core

try:  # typer >= 0.2x vendors click and renders `<bool>`-style metavars, which this module replaces
    from typer import _click
except ImportError:  # older typer on click: already the plain style
    import click as _click  # type: ignore[no-redef]

# The order of the work; a command not listed here follows, in the order it was registered.
COMMAND_ORDER = (
    "synth", "split", "align", "finetune", "evaluate", "metrics", "predict", "fit-patterns", "explain", "trace",
    "compare-rules", "regions", "info", "import-model",
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


class SmadlrpGroup(typer.core.TyperGroup):
    """The top-level command group: plain help metavars on every command, commands in COMMAND_ORDER."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        _plain(self)
        for command in self.commands.values():
            _plain(command)

    def get_help_option(self, ctx: _click.Context) -> Any:
        option = super().get_help_option(ctx)
        _plain_help_option(option)
        return option

    def list_commands(self, ctx: _click.Context) -> list[str]:
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        names = list(self.commands)
        return sorted(names, key=lambda name: (rank.get(name, len(rank)), names.index(name)))
