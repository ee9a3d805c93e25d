"""What every command shares: consoles, option types, error handling, device choice, JSON output, progress."""

from __future__ import annotations

import functools
import json
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import torch
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from smadlrp.core.device import DEVICE_HELP, resolve_device
from smadlrp.core.errors import SmadlrpError
from smadlrp.core.fileio import write_text_atomic

console = Console()
err_console = Console(stderr=True)


class _State:
    """Global flags set by the top-level callback."""

    debug: bool = False
    verbose: bool = False


state = _State()

DeviceOption = Annotated[str, typer.Option("--device", help=DEVICE_HELP, show_default=True)]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed for every random generator.")]
JsonOption = Annotated[
    Path | None, typer.Option("--json", help="Also write the results as JSON to this file.", dir_okay=False)
]
CheckpointOption = Annotated[
    Path, typer.Option("--checkpoint", "-c", help="A smadlrp checkpoint (.safetensors).", dir_okay=False)
]
DataOption = Annotated[
    Path | None,
    typer.Option("--data", help="Data folder with train/val/test splits; default: the embedded synthetic set.",
                 file_okay=False),
]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per batch.")]
WorkersOption = Annotated[
    int, typer.Option("--workers", min=0, help="DataLoader worker processes (0: load in-process).")
]

P = ParamSpec("P")
R = TypeVar("R")


def notice(message: str) -> None:
    """A yellow line on stderr for things the user should know (defaults taken, files skipped)."""
    err_console.print(f"[yellow]{message}[/yellow]", highlight=False)


def detail(message: str) -> None:
    """A dim line on stderr, only with --verbose."""
    if state.verbose:
        err_console.print(f"[dim]{message}[/dim]", highlight=False)


def fail_line(message: str) -> None:
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)


def handle_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn SmadlrpError into one red line and its exit code; other exceptions are bugs (traceback with --debug)."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except SmadlrpError as exc:
            if state.debug:
                traceback.print_exc()
            fail_line(exc.message)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            fail_line("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:
            if state.debug:
                raise
            fail_line(f"internal error: {exc.__class__.__name__}: {exc} (run `smadlrp --debug ...` for the traceback)")
            raise typer.Exit(1) from None

    return wrapper


def pick_device(spec: str) -> torch.device:
    """Resolve `--device` and print the choice."""
    device = resolve_device(spec)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    err_console.print(f"[dim]device: {device} ({name})[/dim]", highlight=False)
    return device


def data_root(data: Path | None) -> Path:
    """`--data`, or the embedded synthetic set (generated once into its cache folder, with a notice)."""
    if data is not None:
        return data
    from smadlrp.data.synthetic.generator import ensure_default_dataset

    with progress_bar() as bar:
        task = bar.add_task("generating the synthetic data set", total=None)
        root = ensure_default_dataset(
            notify=notice, progress=lambda done, total: bar.update(task, completed=done, total=total)
        )
    notice(f"using the embedded synthetic data set in {root} (it exercises the pipeline, not real-world accuracy)")
    return root


def write_json(path: Path | None, payload: Any) -> None:
    """Write `payload` as indented JSON to `path` atomically (nothing when `path` is None)."""
    if path is None:
        return
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    detail(f"wrote {path}")


@contextmanager
def progress_bar(*extra: Any) -> Iterator[Progress]:
    """A rich progress bar on stderr (hidden when stderr is not a terminal is rich's own behaviour)."""
    with Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(), *extra,
        TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=True,
    ) as bar:
        yield bar


class ImagesPerSecond(ProgressColumn):
    """Throughput of a task whose steps are images."""

    def render(self, task: Task) -> Text:
        return Text("" if task.speed is None else f"{task.speed:.1f} img/s", style="cyan")
