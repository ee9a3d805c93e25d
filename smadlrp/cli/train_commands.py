"""`smadlrp finetune` (train a detector) and `smadlrp import-model` (convert TorchLRP-era .pth models)."""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

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
    command,
    console,
    file_plan,
    notice,
    progress_bar,
    rank_line,
    write_json,
)
from smadlrp.cli.defaults import (
    data_source,
    pick_device,
)
from smadlrp.core import distributed
from smadlrp.core.errors import SmadlrpError, UsageError, shorten
from smadlrp.data.loading import IMAGE_EXTENSIONS
from smadlrp.detector.frozen_heads import KINDS as HEAD_KINDS
from smadlrp.detector.importing import import_checkpoint
from smadlrp.detector.models import ARCHITECTURES, WEIGHT_CHOICES
from smadlrp.detector.run_folder import held_run_folder
from smadlrp.detector.train import (
    OPTIMIZERS,
    SELECT_BY,
    Callbacks,
    EpochRow,
    Finetuner,
    TrainConfig,
)
from smadlrp.evaluation.report import epoch_table

ArchOption = Annotated[str, typer.Option("--arch", help=f"Architecture: {', '.join(ARCHITECTURES)}, or timm/NAME.")]


GlobalBatchOption = Annotated[
    int, typer.Option("--batch-size", "-b", min=1, help="Images per batch; under torchrun the global batch, split "
                                                        "evenly over the processes (a multiple of their number).")
]


@app.command()
@command(ranks=True)
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
        str, typer.Option(help="Initial weights: auto, pretrained (the library's: ImageNet for torchvision; "
                               "imagenet is the same), none, or a .safetensors / state-dict .pth file.")
    ] = "auto",
    amp: Annotated[bool, typer.Option("--amp", help="Mixed precision (CUDA only).")] = False,
    select_by: Annotated[str, typer.Option("--select-by", help=f"Pick best.safetensors by: {', '.join(SELECT_BY)}.")]
    = "d-eer",
    attack_class: Annotated[str, typer.Option("--attack-class", help="Class folder holding the attacks.")] = "morph",
    augment: Annotated[str, typer.Option(
        "--augment", metavar="SPEC",
        help="Perturb each training image, values drawn per sample and seeded: comma-separated NAME:LOW-HIGH, "
             "e.g. jpeg:50-95,resize:0.5-1,blur:0-1.5 (see docs/robustness.md).")] = "",
    lora: Annotated[int, typer.Option("--lora", metavar="RANK", min=0, help=(
        "Train LoRA adapters of this rank on a transformer's attention projections, and the head; the rest stays "
        "frozen (0: no LoRA)."))] = 0,
    lora_alpha: Annotated[float, typer.Option("--lora-alpha", help="LoRA alpha (0: the rank, a scaling of 1).")] = 0.0,
    lora_targets: Annotated[str, typer.Option("--lora-targets", help="Projections LoRA adapts, among q, k, v, out.")]
    = "q,v",
    frozen: Annotated[bool, typer.Option("--frozen", help=(
        "Extract the backbone's features once (cached) and fit --head on them."))] = False,
    head: Annotated[str | None, typer.Option("--head", help=(
        f"The head --frozen fits: {', '.join(HEAD_KINDS)} (gmm: one-class, on bona fide images only; default "
        "linear)."))] = None,
    pseudo_morphs: Annotated[bool, typer.Option("--selfmorph", help=(
        "Train on bona fide images alone: each one and a self-blended pseudo-morph of it, drawn anew every "
        "epoch; validation on fixed pseudo-morphs of the validation bona fide images. Morphs in the data are "
        "ignored (see docs/real-faces.md)."))] = False,
    pseudo_and_real: Annotated[bool, typer.Option("--selfmorph-mixed", help=(
        "As --selfmorph, and train on the training split's morphs as well."))] = False,
    workers: WorkersOption = 0,
    seed: SeedOption = 0,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: runs/ARCH-TIME).", file_okay=False)] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue the interrupted run in this output folder.", file_okay=False)
    ] = None,
    device: DeviceOption = None,
    json_out: JsonOption = None,
) -> None:
    """Fine-tune a detector on bona fide vs morph images: every layer, the head only, LoRA adapters, or a head on
    frozen features (under torchrun: data-parallel on every process, rank 0 writes the run folder, holding its
    lock for the run's lifetime)."""
    if head is not None and not frozen:
        raise UsageError("--head chooses the head that --frozen fits: add --frozen")
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
                    held.enter_context(held_run_folder(out, resume=True, notify=notice))
            trainer = Finetuner.resume(out, torch_device, epochs=epochs, workers=workers, notify=notice,
                                       check=lambda stored: _refuse_resume_changes(ctx, stored, resume))
        else:
            source = data_source(data, protocol, bonafide_label, attack_label)
            plan.reads_images_under("an image of the training data", source.root, IMAGE_EXTENSIONS)
            config = TrainConfig(arch=arch, epochs=epochs or 10, batch_size=batch_size, lr=lr, schedule=schedule,
                                 optimizer=optimizer, weight_decay=weight_decay, image_size=image_size, full=full,
                                 weights=weights, amp=amp, select_by=select_by, attack_class=attack_class, seed=seed,
                                 data=str(source.root.resolve()),
                                 protocol=str(protocol.resolve()) if protocol is not None else "",
                                 bonafide_label=bonafide_label, attack_label=attack_label, augment=augment,
                                 lora=lora, lora_alpha=lora_alpha, lora_targets=lora_targets,
                                 frozen=(head or "linear") if frozen else "",
                                 selfmorph="mixed" if pseudo_and_real else "only" if pseudo_morphs else "")
            out = ranks.broadcast(out or Path("runs") / f"{arch}-{time.strftime('%Y%m%d-%H%M%S')}")
            with ranks.shared_failure():
                if ranks.is_main:
                    held.enter_context(held_run_folder(out, resume=False, notify=notice))
                trainer = Finetuner(config, source, out, torch_device, notice, workers)
        _train(trainer, trainer.config, out, json_out)


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
                  f"{f'augmentation: {config.augment}, ' if config.augment else ''}"
                  f"{f'self-blended pseudo-morphs ({config.selfmorph}), ' if config.selfmorph else ''}output: {out}",
                  highlight=False)
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
@command()
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
    class_names = [c.strip() for c in classes.split(",") if c.strip()]
    meta, key = import_checkpoint(source, out, arch, class_names, attack_class, image_size, trust_pickle, notice)
    console.print(f"wrote {out} ({arch}, classes {class_names}, attack class {attack_class})", highlight=False)
    write_json(json_out, {"source": str(source), "key": key, "out": str(out), "metadata": asdict(meta)})
