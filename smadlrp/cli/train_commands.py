"""`smadlrp finetune` (train a detector) and `smadlrp import-model` (convert TorchLRP-era .pth models)."""

from __future__ import annotations

import pickle
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.progress import TextColumn

from smadlrp.cli import app
from smadlrp.cli.common import (
    AttackLabelOption,
    BonafideLabelOption,
    DataOption,
    DeviceOption,
    JsonOption,
    ProtocolOption,
    SeedOption,
    WorkersOption,
    console,
    data_source,
    file_plan,
    handle_errors,
    notice,
    on_ranks,
    pick_device,
    progress_bar,
    rank_line,
    write_json,
)
from smadlrp.core import distributed
from smadlrp.core.container import first_non_finite
from smadlrp.core.errors import SmadlrpError, UsageError, shorten
from smadlrp.core.locks import LOCK_FILE, locked_folder, remove_write_leftovers
from smadlrp.data.loading import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD
from smadlrp.detector.checkpoint import CheckpointMeta, first_mismatch, save_checkpoint
from smadlrp.detector.models import ARCHITECTURES, WEIGHT_CHOICES, get_architecture
from smadlrp.detector.train import (
    OPTIMIZERS,
    RESUME_FILE,
    RUN_OUTPUTS,
    SELECT_BY,
    Callbacks,
    EpochRow,
    Finetuner,
    TrainConfig,
    read_resume,
)
from smadlrp.evaluation.report import epoch_table

ArchOption = Annotated[str, typer.Option("--arch", help=f"Architecture: {', '.join(ARCHITECTURES)}.")]


GlobalBatchOption = Annotated[
    int, typer.Option("--batch-size", "-b", min=1, help="Images per batch; under torchrun the global batch, split "
                                                        "evenly over the processes (a multiple of their number).")
]


@app.command()
@handle_errors
@on_ranks
def finetune(
    ctx: typer.Context,
    arch: ArchOption = "vgg_compact",
    data: DataOption = None,
    protocol: ProtocolOption = None,
    bonafide_label: BonafideLabelOption = "bonafide",
    attack_label: AttackLabelOption = "morph",
    epochs: Annotated[int | None, typer.Option(help="Epochs to train (default 10; with --resume: the new total).")]
    = None,
    batch_size: GlobalBatchOption = 32,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-3,
    optimizer: Annotated[str, typer.Option(help=f"Optimizer: {', '.join(OPTIMIZERS)}.")] = "adam",
    schedule: Annotated[str, typer.Option(help="Learning rate per epoch: cosine (decays to 0) or constant.")]
    = "cosine",
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="L2 weight decay.")] = 0.0,
    image_size: Annotated[int, typer.Option("--image-size", help="Input side in pixels (0: the architecture's).")]
    = 0,
    full: Annotated[
        bool | None, typer.Option("--full/--head-only", help="Train every layer, or only the new head (feature "
                                                             "extraction); default: only the head on pretrained "
                                                             "weights, every layer on a random backbone.")
    ] = None,
    weights: Annotated[
        str, typer.Option(help="Initial weights: auto, imagenet, none, or a .safetensors / state-dict .pth file.")
    ] = "auto",
    amp: Annotated[bool, typer.Option("--amp", help="Mixed precision (CUDA only).")] = False,
    select_by: Annotated[str, typer.Option("--select-by", help=f"Pick best.safetensors by: {', '.join(SELECT_BY)}.")]
    = "d-eer",
    attack_class: Annotated[str, typer.Option("--attack-class", help="Class folder holding the attacks.")] = "morph",
    augment: Annotated[str, typer.Option(
        "--augment", metavar="SPEC",
        help="Perturb each training image, values drawn per sample and seeded: comma-separated NAME:LOW-HIGH, "
             "e.g. jpeg:50-95,resize:0.5-1,blur:0-1.5 (see docs/robustness.md).")] = "",
    workers: WorkersOption = 0,
    seed: SeedOption = 0,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: runs/ARCH-TIME).", file_okay=False)] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue the interrupted run in this output folder.", file_okay=False)
    ] = None,
    device: DeviceOption = None,
    json_out: JsonOption = None,
) -> None:
    """Fine-tune a torchvision CNN (or the compact VGG) on bona fide vs morph images (under torchrun: data-parallel
    on every process, rank 0 writes the run folder, holding its lock for the run's lifetime)."""
    torch_device = pick_device(device)
    ranks = distributed.current()
    plan = file_plan({"--json": json_out})
    plan.reads("the protocol file", protocol)
    plan.reads("the initial weights", Path(weights) if weights not in WEIGHT_CHOICES else None)
    with ExitStack() as held:
        if resume is not None:
            if out is not None and out.resolve() != resume.resolve():
                raise UsageError(f"--out {out} with --resume {resume}: a resumed run writes into its own folder")
            out = resume
            with ranks.shared_failure():
                if ranks.is_main:
                    _hold_run_folder(held, out, exists=True)
                config, doc, tensors = read_resume(resume)
                _refuse_resume_changes(ctx, config, resume)
            config.epochs = epochs or config.epochs
            source = data_source(Path(config.data), Path(config.protocol) if config.protocol else None,
                                 config.bonafide_label, config.attack_label)
            with ranks.shared_failure():
                trainer = Finetuner(config, source, out, torch_device, notice, workers)
                trainer.restore(doc, tensors)
            notice(f"resuming {out} after epoch {trainer.state.epoch} of {config.epochs}")
            if doc.get("world_size", 1) != ranks.world_size:
                notice(f"the run trained on {doc.get('world_size', 1)} process(es) and continues on "
                       f"{ranks.world_size}: weights, optimizer, schedule and history carry on; later epochs visit the "
                       "images in another order")
        else:
            source = data_source(data, protocol, bonafide_label, attack_label)
            plan.reads_images_under("an image of the training data", source.root, IMAGE_EXTENSIONS)
            config = TrainConfig(arch=arch, epochs=epochs or 10, batch_size=batch_size, lr=lr, schedule=schedule,
                                 optimizer=optimizer, weight_decay=weight_decay, image_size=image_size, full=full,
                                 weights=weights, amp=amp, select_by=select_by, attack_class=attack_class, seed=seed,
                                 data=str(source.root.resolve()),
                                 protocol=str(protocol.resolve()) if protocol is not None else "",
                                 bonafide_label=bonafide_label, attack_label=attack_label, augment=augment)
            out = ranks.broadcast(out or Path("runs") / f"{arch}-{time.strftime('%Y%m%d-%H%M%S')}")
            with ranks.shared_failure():
                if ranks.is_main:
                    _hold_run_folder(held, out, exists=False)
                trainer = Finetuner(config, source, out, torch_device, notice, workers)
        _train(trainer, config, out, json_out)


def _hold_run_folder(held: ExitStack, out: Path, exists: bool) -> None:
    """Lock the run folder `out` until `held` closes and remove the temporary files of killed writes. A new run
    (`exists=False`) needs a folder that is empty, or that holds only the files of a run stopped before its first
    epoch was saved (no resume state: nothing was done); `--resume` (`exists=True`) needs an existing folder."""
    if exists and not out.is_dir():
        raise SmadlrpError(f"--resume {out}: no such folder")
    held.enter_context(locked_folder(out, notice))
    removed = remove_write_leftovers(out)
    if removed:
        notice(f"removed {len(removed)} temporary file(s) of interrupted writes in {out}")
    others = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
    if exists:
        if not (out / RESUME_FILE).exists() and set(others) <= RUN_OUTPUTS:
            raise SmadlrpError(f"{out} holds no resume state, so there is nothing to resume (a run stopped before its "
                               f"first epoch was saved leaves none): start it again with --out {out}")
        return
    if (out / RESUME_FILE).exists():
        raise UsageError(f"{out} is not empty: it holds a run; continue it with --resume {out}, or choose another "
                         "--out")
    if others and not set(others) <= RUN_OUTPUTS:
        raise UsageError(f"{out} is not empty ({len(others)} entries, e.g. {others[0]}): choose another --out")
    if others:
        notice(f"{out} holds a run stopped before its first epoch was saved; starting it anew")


def _refuse_resume_changes(ctx: typer.Context, config: TrainConfig, run: Path) -> None:
    """UsageError naming every training option given on the command line with a value other than the stored
    run's: `--resume` continues that run as it was configured (only --epochs, --device, --workers may change)."""
    changed = []
    for name, value in ctx.params.items():
        source = ctx.get_parameter_source(name)
        if name == "epochs" or not hasattr(config, name) or source is None or source.name.startswith("DEFAULT"):
            continue
        stored = getattr(config, name)
        if name in ("data", "protocol"):
            value = str(Path(str(value)).resolve()) if value is not None else ""
        if value != stored and not (name == "image_size" and value == 0):
            changed.append(f"--{name.replace('_', '-')} {shorten(str(value), 40)} (the run's: "
                           f"{shorten(str(stored), 40)})")
    if changed:
        raise UsageError(f"--resume {run} continues the run with its stored settings, and these differ: "
                         f"{', '.join(changed)}; drop them, or start a new run with another --out")


def _train(trainer: Finetuner, config: TrainConfig, out: Path, json_out: Path | None) -> None:
    """Run the epochs under progress bars and print the epoch table."""
    ranks = distributed.current()
    train_share, train_total, val_share, val_total = trainer.shares
    rank_line(f"training on {train_share} of {train_total} images ({config.batch_size // ranks.world_size} per "
              f"batch of {config.batch_size}), validating on {val_share} of {val_total}")
    console.print(f"[bold]{config.arch}[/bold] ({'all layers' if config.full else 'head only'}), "
                  f"{config.image_size} px, weights: {trainer.weights_source}, attack class: {config.attack_class}, "
                  f"{f'augmentation: {config.augment}, ' if config.augment else ''}output: {out}", highlight=False)
    with progress_bar(TextColumn("{task.fields[info]}")) as bar:
        epochs_task = bar.add_task("epochs", total=config.epochs, completed=trainer.state.epoch, info="")
        batch_task = bar.add_task("batches", total=None, info="")

        def epoch_start(epoch: int, batches: int) -> None:
            bar.reset(batch_task, total=batches, description=f"epoch {epoch}", info="")

        def batch_end(running_loss: float) -> None:
            bar.update(batch_task, advance=1, info=f"loss {running_loss:.4f}")

        def epoch_end(row: EpochRow, is_best: bool) -> None:
            bar.update(epochs_task, advance=1)
            eer = "n/a" if row.d_eer is None else f"{row.d_eer:.2%}"
            bar.console.print(f"epoch {row.epoch}: train loss {row.train_loss:.4f} acc {row.train_acc:.2%} | val loss "
                              f"{row.val_loss:.4f} acc {row.val_acc:.2%} D-EER {eer} ({row.seconds:.0f} s)"
                              f"{'  [green]best[/green]' if is_best else ''}", highlight=False)

        state = trainer.run(Callbacks(epoch_start, batch_end, epoch_end))
    console.print(epoch_table(state.history))
    console.print(f"best epoch {state.best_epoch} by {config.select_by}: {out / 'best.safetensors'}", highlight=False)
    write_json(json_out, {"out": str(out), "best_epoch": state.best_epoch, "history": state.history})


@app.command("import-model")
@handle_errors
def import_model(
    source: Annotated[Path, typer.Argument(help="A .pth file: a state dict, or a whole pickled model.",
                                           dir_okay=False)],
    arch: ArchOption = ...,  # type: ignore[assignment]
    out: Annotated[Path, typer.Option(help="The smadlrp checkpoint to write (.safetensors).", dir_okay=False)]
    = ...,  # type: ignore[assignment]
    classes: Annotated[str, typer.Option(help="Comma-separated class names, in output order.")] = "bonafide,morph",
    attack_class: Annotated[str, typer.Option("--attack-class", help="Which class is the attack.")] = "morph",
    image_size: Annotated[int, typer.Option("--image-size", help="Input side in pixels (0: the architecture's).")]
    = 0,
    trust_pickle: Annotated[
        bool, typer.Option("--trust-pickle", help="Allow unpickling arbitrary objects (runs code: trusted files only).")
    ] = False,
    json_out: JsonOption = None,
) -> None:
    """Convert a PyTorch .pth model (state dict or whole pickled model) into a smadlrp checkpoint."""
    if not source.is_file():
        raise SmadlrpError(f"file not found: {source}")
    file_plan({"--out": out, "--json": json_out}).reads("the model it converts", source)
    spec = get_architecture(arch)
    class_names = [c.strip() for c in classes.split(",") if c.strip()]
    meta = CheckpointMeta(architecture=arch, class_names=class_names, attack_class=attack_class,
                          input_size=image_size or spec.input_size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                          weights_source=f"imported from {source.name}")
    problem = meta.first_problem()  # the checks every checkpoint read passes, before any work
    if problem is not None:
        options = {"class_names": "--classes", "attack_class": "--attack-class", "input_size": "--image-size"}
        raise UsageError(f"{options.get(problem[0], problem[0])}: {problem[1]}")
    state, key = _read_pth(source, trust_pickle)
    if key is not None:
        notice(f"{source.name}: using the weights under its {key!r} key")
        meta.weights_source += f" (key {key})"
    model = spec.build(len(class_names))
    state = {k.removeprefix("module."): v for k, v in state.items()}
    mismatch = first_mismatch(model.state_dict(), state)
    if mismatch is not None:
        raise SmadlrpError(f"{source} does not hold {arch} weights for {len(class_names)} classes "
                           f"(first mismatch: {mismatch!r}); check --arch and --classes")
    bad = first_non_finite(state)
    if bad is not None:
        raise SmadlrpError(f"{source}: tensor {bad!r} holds NaN or infinity")
    model.load_state_dict(state)
    save_checkpoint(out, model, meta)
    console.print(f"wrote {out} ({arch}, classes {class_names}, attack class {attack_class})", highlight=False)
    write_json(json_out, {"source": str(source), "key": key, "out": str(out), "metadata": asdict(meta)})


NESTING_KEYS = ("state_dict", "model_state_dict", "model")  # where training scripts keep the weights


def _is_state_dict(value: object) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _read_pth(source: Path, trust_pickle: bool) -> tuple[dict[str, torch.Tensor], str | None]:
    """A state dict from `source` and the key it was nested under (None: the file is the state dict or the model);
    whole pickled models only with `trust_pickle`."""
    try:
        loaded = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the file's content decides; report it in one line
        if not _holds_other_objects(source, exc):
            raise SmadlrpError(_not_loadable(source, exc)) from None
        if not trust_pickle:
            raise SmadlrpError(
                f"{source} holds pickled Python objects (e.g. a whole model saved with torch.save(model)); "
                "unpickling can run arbitrary code, so only weights_only loading was tried. "
                "If you trust the file, rerun with --trust-pickle"
            ) from None
        try:
            loaded = torch.load(source, map_location="cpu", weights_only=False)
        except Exception as inner:  # noqa: BLE001
            raise SmadlrpError(f"{source}: cannot be loaded ({shorten(str(inner))})") from exc
    key = None
    if isinstance(loaded, dict) and not _is_state_dict(loaded):
        key = next((k for k in NESTING_KEYS if k in loaded), None)
        if key is None:
            found = ", ".join(repr(k) for k in list(loaded)[:8]) or "none"
            raise SmadlrpError(f"{source}: neither a model nor a state dict of tensors, and none of the keys where "
                               f"training scripts keep the weights ({', '.join(NESTING_KEYS)}); its keys: {found}. "
                               "Save the model's state_dict() on its own")
        loaded = loaded[key]
    if isinstance(loaded, torch.nn.Module):
        loaded = loaded.state_dict()
    if not _is_state_dict(loaded):
        where = f"its {key!r} entry is" if key else "it is"
        raise SmadlrpError(f"{source}: {where} neither a model nor a state dict of tensors")
    return loaded, key


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive format (PyTorch >= 1.6)
_PICKLE_PROTOCOLS = range(2, 6)  # the legacy format: a pickle, protocol 2 or later (b"\x80" + protocol byte)


def _looks_like_pytorch(source: Path) -> bool:
    """Does `source` start like a file of torch.save: a zip archive, or a pickle of protocol 2 or later?"""
    with source.open("rb") as fh:
        head = fh.read(4)
    return head == _ZIP_MAGIC or (len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS)


def _holds_other_objects(source: Path, exc: Exception) -> bool:
    """Did weights_only loading refuse a PyTorch file because it holds objects other than tensors and plain
    containers (whereas garbage, an empty file or a truncated archive fails in other ways)?"""
    refused = isinstance(exc, pickle.UnpicklingError) and str(exc).startswith("Weights only load failed")
    return refused and _looks_like_pytorch(source)


def _not_loadable(source: Path, exc: Exception) -> str:
    """The one-line reason why `source` is no PyTorch file, or a damaged one."""
    if source.stat().st_size == 0:
        return f"{source}: an empty file, not a PyTorch model"
    if not _looks_like_pytorch(source):
        return f"{source}: not a PyTorch model file (neither a torch.save zip archive nor a pickle)"
    reason = "it ends too early" if isinstance(exc, EOFError) else shorten(str(exc))
    return f"{source}: a damaged or truncated PyTorch file ({reason})"
