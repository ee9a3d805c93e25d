"""What every command shares: consoles, option types, error handling, device choice, JSON output, progress."""

from __future__ import annotations

import functools
import json
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TextIO, TypeVar

import torch
import typer
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from smadlrp.core import distributed, processes
from smadlrp.core.config import ProjectConfig, load_config
from smadlrp.core.device import DEVICE_HELP
from smadlrp.core.errors import SmadlrpError, shorten
from smadlrp.core.fileio import write_text_atomic
from smadlrp.core.outputs import FilePlan
from smadlrp.data.loading import DataSource
from smadlrp.detector.checkpoint import CheckpointMeta
from smadlrp.evaluation.metrics import Breakdown, MetricsSummary
from smadlrp.evaluation.report import breakdown_table, confusion_table, metrics_table
from smadlrp.explain.pattern_file import PatternFit, fit_pattern_file
from smadlrp.explain.run import PATTERN_KINDS
from smadlrp.lrp.composites import SUM_SPLITS

console = Console()
err_console = Console(stderr=True)


class _State:
    """Global flags set by the top-level callback, and the project configuration once read."""

    debug: bool = False
    verbose: bool = False
    config_path: Path | None = None
    config: ProjectConfig | None = None


state = _State()


def project_config() -> ProjectConfig:
    """The configuration of `--config FILE`, else of the file found walking up from the working directory (read
    once per command; an empty configuration when there is none)."""
    if state.config is None:
        state.config = load_config(state.config_path)
        if state.config.source is not None:
            detail(f"configuration: {state.config.where}")
    return state.config


DeviceOption = Annotated[
    str | None, typer.Option("--device", help=f"{DEVICE_HELP}; default: the configured device, else auto.")
]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed for every random generator.")]
JsonOption = Annotated[
    Path | None, typer.Option("--json", help="Also write the results as JSON to this file.", dir_okay=False)
]
CheckpointOption = Annotated[
    Path | None,
    typer.Option("--checkpoint", "-c", dir_okay=False,
                 help="A smadlrp checkpoint (.safetensors); default: the project's configured checkpoint, else the "
                      "newest best.safetensors under ./runs/."),
]
DataOption = Annotated[
    Path | None,
    typer.Option("--data", file_okay=False,
                 help="Data folder with train/val/test splits; default: the project's configured data, else the "
                      "checkpoint's training data, else the embedded synthetic set."),
]
ProtocolOption = Annotated[
    Path | None,
    typer.Option("--protocol", help="A protocol CSV (path,label,split[,group columns]) instead of split folders; "
                                    "paths relative to the file, or to --data when given.", dir_okay=False),
]
BonafideLabelOption = Annotated[
    str, typer.Option("--bonafide-label", help="The label value of bona fide rows in protocol and score files.")
]
AttackLabelOption = Annotated[
    str, typer.Option("--attack-label", help="The label value of attack (morph) rows in protocol and score files "
                                             "(MorDeephy: --attack-label 0 --bonafide-label 1).")
]
SumSplitOption = Annotated[
    str, typer.Option("--sum-split", help=f"How a sum a + b of two tensors (a residual connection) shares relevance: "
                                          f"{' or '.join(SUM_SPLITS)} (z: a / (a + b); absolute: |a| / (|a| + |b|)).")
]
AttentionOption = Annotated[
    str, typer.Option("--attention", help="How attention shares relevance (transformers): cp (the attention weights "
                                          "are constants, relevance flows to the values; conserves) or attnlrp (the "
                                          "softmax and product rules of AttnLRP, relevance also through queries and "
                                          "keys).")
]
WorstSpeciesOption = Annotated[
    bool, typer.Option("--worst-species", help="With a val-max-apcer criterion: the threshold at which the worst group "
                                               "of the first --by column meets the APCER target.")
]
CiOption = Annotated[
    float, typer.Option("--ci", min=0.0, max=0.999, help="Confidence level of the intervals on every figure "
                                                         "(0: none).")
]
BootstrapOption = Annotated[
    int, typer.Option("--bootstrap", min=0, help="Bootstrap resamples for the D-EER, BPCER@APCER and AUC "
                                                 "intervals, over subjects when the data names them (0: none).")
]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per batch.")]
WorkersOption = Annotated[
    int, typer.Option("--workers", min=0, help="DataLoader worker processes (0: load in-process).")
]
AlignOption = Annotated[
    bool, typer.Option("--align", help="Crop each face as the checkpoint's training data was cropped (its recorded "
                                       "`smadlrp align` policy; needs the align extra).")
]

PatternsOption = Annotated[
    Path | None, typer.Option("--patterns", dir_okay=False,
                              help="Pattern file from `smadlrp fit-patterns`; default: patterns.safetensors beside "
                                   "the checkpoint, fitted on its training split when a pattern rule needs it.")
]
TargetOption = Annotated[
    str, typer.Option(help="Class to explain: predicted, a class name, a class index, or contrast (the attack "
                           "logit minus the other class's: the log-odds of P(attack), in one relevance pass).")
]
PatternKindOption = Annotated[
    str, typer.Option("--pattern-kind", metavar="|".join(PATTERN_KINDS),
                      help="Which fitted patterns patternnet and patternattribution use: positive (two-component "
                           "estimator, suited to ReLU networks) or all (linear).")
]
ParamOption = Annotated[
    list[str] | None, typer.Option("--param", help="Rule parameter KEY=NUMBER (repeatable), e.g. epsilon=1e-6.")
]


def rule_option(default: str) -> Any:
    """`--rule`, repeatable, with its default (`default`) stated in the help."""
    return typer.Option("--rule", "-r", help="Rule or composite (repeatable); `all` for every one available. "
                                             f"Default: {default}.")


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
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)


def rank_line(message: str) -> None:
    """A dim line on stderr from every rank (prefixed with the rank under torchrun), e.g. the share it took."""
    ranks = distributed.current()
    prefix = f"{ranks.describe()}: " if ranks.distributed else ""
    _rank_console.print(f"[dim]{prefix}{message}[/dim]", highlight=False, soft_wrap=True)


_rank_console = Console(stderr=True)


def handle_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn SmadlrpError into one red line and its exit code; other exceptions are bugs (traceback with --debug).

    Under torchrun with several processes, a command not marked with `on_ranks` is refused; an error that every
    rank raised together (a RankError) and Ctrl-C are printed by rank 0 alone, other errors by the rank they
    happened on, prefixed with it. Ctrl-C is exit 130, also when a library swallowed its KeyboardInterrupt and
    failed afterwards (see core/processes.py)."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        rank, world = 0, 1  # until torchrun's variables are read (a bad one is reported as by one process)

        def fail(message: str, once: bool = False) -> None:
            if world == 1:
                fail_line(message)
            elif rank == 0 or not once:
                fail_line(message if message.startswith("rank ") else f"rank {rank}: {message}")

        with processes.noting_interrupts(), _warnings_as_notices():
            try:
                rank, world, _ = distributed.launched_ranks()
                if world > 1 and not getattr(command, "runs_on_ranks", False):
                    name = command.__name__.removesuffix("_command").replace("_", "-")
                    raise distributed.RankError(rank, f"`smadlrp {name}` runs in one process: start it without "
                                                      "torchrun", exit_code=2)  # every rank refuses: rank 0 says it
                return command(*args, **kwargs)
            except (typer.Exit, typer.Abort):
                raise
            except SmadlrpError as exc:
                if state.debug:
                    traceback.print_exc()
                fail(exc.message, once=isinstance(exc, distributed.RankError))
                raise typer.Exit(exc.exit_code) from None
            except Exception as exc:
                if processes.is_interrupt(exc):  # e.g. DataLoader workers that the same Ctrl-C ended
                    fail("interrupted", once=True)
                    raise typer.Exit(130) from None
                if state.debug:
                    raise
                fail(f"internal error: {exc.__class__.__name__}: {shorten(str(exc), 300)} (run `smadlrp --debug ...` "
                     "for the traceback)")
                raise typer.Exit(1) from None
            except KeyboardInterrupt:
                fail("interrupted", once=True)
                raise typer.Exit(130) from None

    return wrapper


@contextmanager
def _warnings_as_notices() -> Iterator[None]:
    """While a command runs, PIL's DecompressionBombWarning (an image of more pixels than PIL.Image.MAX_IMAGE_PIXELS,
    decoded anyway) is a yellow notice line instead of Python's two lines with PIL's source path."""
    with warnings.catch_warnings():
        show = warnings.showwarning

        def shown(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
            if issubclass(category, Image.DecompressionBombWarning):
                notice(f"warning: {shorten(str(message), 200)} (it is decoded anyway)")
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = shown
        yield


def on_ranks(command: Callable[P, R]) -> Callable[P, R]:
    """Let a command run under torchrun: it gets a process group for its `--device` (see core/distributed.py);
    ranks other than 0 print nothing but their share and their errors. Put it below `handle_errors`."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with distributed.session(device_spec(kwargs.get("device"))) as ranks:  # type: ignore[arg-type]
            if not ranks.distributed:
                return command(*args, **kwargs)
            quiet = console.quiet, err_console.quiet
            console.quiet = err_console.quiet = not ranks.is_main
            try:
                rank_line(f"device {ranks.device}")
                return command(*args, **kwargs)
            finally:
                console.quiet, err_console.quiet = quiet

    wrapper.runs_on_ranks = True  # type: ignore[attr-defined]
    return wrapper


def command(*, ranks: bool = False) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """What every command is wrapped in (below `@app.command()`): one-line errors (`handle_errors`) and, with
    `ranks`, a process group of its own under torchrun (`on_ranks`); without it torchrun is refused."""
    def wrap(function: Callable[P, R]) -> Callable[P, R]:
        return handle_errors(on_ranks(function) if ranks else function)
    return wrap


def device_spec(spec: str | None) -> str:
    """`--device`, else the configured device, else auto."""
    return spec if spec is not None else project_config().device or "auto"


def file_plan(outputs: dict[str, Path | None], folder_files: tuple[str, Path, Sequence[str]] | None = None
              ) -> FilePlan:
    """The command's output options (option -> path, None when not asked for) and the fixed files of its output
    folder (`folder_files`: option, folder, names), checked against each other and, when one is in use, the
    project configuration file; the command then declares its other inputs on the plan before any work starts
    (see core/outputs.py)."""
    plan = FilePlan()
    plan.reads("the project configuration", state.config.source if state.config is not None else state.config_path)
    for option, path in outputs.items():
        plan.writes(option, path)
    if folder_files is not None:
        option, folder, names = folder_files
        for name in names:
            plan.writes(option, folder / name)
    return plan


def write_json(path: Path | None, payload: Any) -> None:
    """Write `payload` as indented JSON to `path` atomically (nothing when `path` is None, or on ranks other
    than 0 under torchrun). A dict payload gets the number of processes as "world_size"."""
    ranks = distributed.current()
    if path is None or not ranks.is_main:
        return
    if isinstance(payload, dict):
        payload = {**payload, "world_size": ranks.world_size}
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    detail(f"wrote {path}")


def show_summary(summary: MetricsSummary, breakdowns: Sequence[Breakdown], title: str) -> None:
    """Print the confusion matrix, the metrics table and one table per group breakdown."""
    console.print(confusion_table(summary.confusion))
    console.print(metrics_table(summary, title=title))
    for breakdown in breakdowns:
        console.print(breakdown_table(breakdown, summary, title=f"By {breakdown.label}"))


@contextmanager
def progress_bar(*extra: Any) -> Iterator[Progress]:
    """A rich progress bar on stderr (hidden when stderr is not a terminal is rich's own behaviour)."""
    with Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(), *extra,
        TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=True,
    ) as bar:
        yield bar


class BarProgress:
    """Scoring progress on a rich progress bar: a task per split scored, and this process's share of it."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.task: TaskID | None = None

    def start(self, split: str, condition: str | None, share: int, total: int) -> None:
        rank_line(f"scoring {share} of {total} {split} images" + (f" under {condition}" if condition else ""))
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task(f"scoring {split}" + (f" under {condition}" if condition else ""), total=share)

    def advance(self, n: int) -> None:
        if self.task is not None:
            self.bar.advance(self.task, n)


class ImagesPerSecond(ProgressColumn):
    """Throughput of a task whose steps are images."""

    def render(self, task: Task) -> Text:
        return Text("" if task.speed is None else f"{task.speed:.1f} img/s", style="cyan")


def fit_with_progress(model: torch.nn.Module, meta: CheckpointMeta, checkpoint: Path, data: DataSource, split: str,
                      kinds: Sequence[str], out: Path, *, max_images: int | None, seed: int, batch_size: int,
                      workers: int, device: torch.device) -> PatternFit:
    """`fit_pattern_file` under a progress bar of its two passes."""
    with progress_bar(ImagesPerSecond()) as bar:
        tasks = [bar.add_task(f"{'+'.join(kinds)} patterns, {step}", total=None)
                 for step in ("pass 1/2: unit means", "pass 2/2: statistics")]

        def start(share: int, n: int) -> None:
            rank_line(f"fitting on {share} of {n} images")
            for task in tasks:
                bar.update(task, total=share)

        return fit_pattern_file(model, meta, checkpoint, data, split, kinds, out, max_images=max_images, seed=seed,
                                batch_size=batch_size, workers=workers, device=device, warn=notice, on_start=start,
                                progress=lambda pass_number, n: bar.advance(tasks[pass_number - 1], n))


