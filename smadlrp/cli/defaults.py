"""The project's defaults, in the order a command looks for them: the option given, the project configuration, what
the checkpoint recorded (its training data, its stored threshold, the patterns beside it), the newest run under
./runs/, and the embedded synthetic set; each default taken is named in a notice line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from smadlrp.cli.common import (
    device_spec,
    err_console,
    fit_with_progress,
    notice,
    progress_bar,
    project_config,
)
from smadlrp.core import distributed
from smadlrp.core.device import resolve_device
from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.data.loading import DataSource
from smadlrp.data.protocol import read_protocol
from smadlrp.detector.checkpoint import CheckpointMeta, load_checkpoint, newest_checkpoint
from smadlrp.evaluation.thresholds import (
    CRITERIA,
    STORED,
    VALIDATION_PREFIX,
    Threshold,
    parse_threshold,
    stored_point_name,
)
from smadlrp.explain.pattern_file import AUTO_FIT_MAX_IMAGES
from smadlrp.explain.pattern_file import rules_and_patterns as choose_rules_and_patterns
from smadlrp.explain.run import PATTERN_KINDS

RUNS_DIR = Path("runs")


def pick_device(spec: str | None) -> torch.device:
    """Resolve `--device`, else the configured device, else auto (under torchrun: this rank's device), and print
    the choice."""
    ranks = distributed.current()
    try:
        device = ranks.device if ranks.distributed else resolve_device(device_spec(spec))
    except SmadlrpError as exc:
        config = project_config()
        if spec is None and config.device is not None:
            raise config.error("device", exc.message) from None
        raise
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    err_console.print(f"[dim]device: {device} ({name})[/dim]", highlight=False)
    return device


def find_checkpoint(given: Path | None) -> Path:
    """`--checkpoint`, else the configured one, else the newest `best.safetensors` under ./runs/ (with a notice
    saying which)."""
    if given is not None:
        return given
    config = project_config()
    if config.checkpoint is not None:
        notice(f"checkpoint: {config.checkpoint} (from {config.where})")
        return config.checkpoint
    newest = newest_checkpoint(RUNS_DIR)
    if newest is None:
        raise SmadlrpError("no checkpoint: none given with --checkpoint and no best.safetensors under ./runs/; "
                           "run `smadlrp finetune` first")
    notice(f"checkpoint: {newest} (the newest under {RUNS_DIR}/; choose another with --checkpoint)")
    return newest


def data_root(data: Path | None, meta: CheckpointMeta | None = None) -> Path:
    """`--data`, else the data `meta`'s checkpoint was trained on (when it still exists), else the embedded
    synthetic set (generated once into its cache folder); a notice says which default was taken."""
    if data is not None:
        return data
    config = project_config()
    if config.data is not None:
        notice(f"data: {config.data} (from {config.where})")
        return config.data
    recorded = meta.training_data if meta is not None else None
    if recorded is not None:
        notice(f"data: {recorded} (the checkpoint's training data; choose other data with --data)")
        return recorded
    from smadlrp.data.synthetic.generator import ensure_default_dataset

    def generate() -> Path:
        with progress_bar() as bar:
            task = bar.add_task("generating the synthetic data set", total=None)
            return ensure_default_dataset(
                notify=notice, progress=lambda done, total: bar.update(task, completed=done, total=total)
            )

    root = distributed.main_first(generate)  # the other ranks then find it generated
    notice(f"using the embedded synthetic data set in {root} (it exercises the pipeline, not real-world accuracy)")
    return root


def data_source(data: Path | None, protocol: Path | None = None, bonafide_label: str = "bonafide",
                attack_label: str = "morph", meta: CheckpointMeta | None = None) -> DataSource:
    """`--protocol` (paths relative to --data when given, else to the file), else `--data` split folders, else the
    configured data, else the protocol or folder `meta`'s checkpoint was trained on, else the embedded synthetic
    set (see `data_root`). Warns when a subject column shows one subject in two splits."""
    unset = data is None and project_config().data is None
    recorded = meta.training.get("protocol") if meta is not None and unset else None
    if protocol is None and recorded and Path(recorded).is_file():
        notice(f"data: {recorded} (the checkpoint's training protocol; choose other data with --data or --protocol)")
        protocol, data = Path(recorded), Path(meta.training["data"])  # type: ignore[union-attr]
        bonafide_label = meta.training.get("bonafide_label", bonafide_label)  # type: ignore[union-attr]
        attack_label = meta.training.get("attack_label", attack_label)  # type: ignore[union-attr]
    if protocol is not None:
        source = DataSource(data or protocol.parent, read_protocol(protocol, base=data, bonafide_label=bonafide_label,
                                                                   attack_label=attack_label))
    else:
        source = DataSource(data_root(data, meta))
    warning = source.leak_warning()
    if warning is not None:
        notice(f"warning: {warning}")
    return source


def worst_species_column(worst_species: bool, threshold: str, by: list[str] | None) -> str | None:
    """The --by column `--worst-species` uses (the first), None without the flag; UsageError unless the threshold
    is an APCER criterion on labelled scores and a --by column is given."""
    if not worst_species:
        return None
    wanted = parse_threshold(threshold) if threshold.startswith(VALIDATION_PREFIX) else None
    if not isinstance(wanted, str) or (CRITERIA[wanted] or ("eer",))[0] != "apcer" or not by:
        raise UsageError("--worst-species needs an APCER criterion (e.g. --threshold val-max-apcer10) and a --by "
                         "column")
    return by[0]


def threshold_text(given: str | None, default: str = STORED) -> str:
    """`--threshold`, else the configured threshold, else `default`, checked: a number in [0, 1], `stored`, a
    stored operating point, or a `val-` criterion (an error from the file names the key and the file)."""
    config = project_config()
    text = given if given is not None else config.threshold or default
    if stored_point_name(text) is None:
        try:
            parse_threshold(text)
        except UsageError:
            message = (f"--threshold {text!r}: use a number in [0, 1], {STORED}, a stored operating point "
                       f"({', '.join(CRITERIA)}) or a criterion on the validation split "
                       f"({', '.join(VALIDATION_PREFIX + name for name in CRITERIA)})")
            if given is None and config.threshold is not None:
                raise config.error("threshold", message) from None
            raise UsageError(message) from None
    return text


def configured_threshold(given: str | None, resolve: Callable[[], Threshold]) -> Threshold:
    """`resolve()`, with a usage error about a threshold that came from the project configuration (no
    `--threshold` given) reported against the configuration file's key."""
    config = project_config()
    try:
        return resolve()
    except UsageError as exc:
        if given is None and config.threshold is not None:
            raise config.error("threshold", exc.message.removeprefix("--threshold ")) from None
        raise


def open_model(checkpoint: Path, device: str | None) -> tuple[torch.nn.Module, CheckpointMeta, torch.device]:
    """The preamble of every command that runs a model: the device (`--device`, configured, auto; printed) and the
    checkpoint's model on it, in eval mode, with its metadata."""
    torch_device = pick_device(device)
    model, meta = load_checkpoint(checkpoint, torch_device)
    return model, meta, torch_device


def rules_and_patterns(requested: list[str], patterns: Path | None, checkpoint: Path, model: torch.nn.Module,
                       meta: CheckpointMeta, device: torch.device,
                       kind: str = PATTERN_KINDS[0]) -> tuple[list[str], dict[str, torch.Tensor] | None]:
    """The rules and patterns of the pattern auto-fit policy (explain/pattern_file.py), fitting a missing pattern
    file on the checkpoint's training data (at most AUTO_FIT_MAX_IMAGES images) under a progress bar."""
    def fit(out: Path, kinds: tuple[str, ...]) -> None:
        source = data_source(None, meta=meta)
        notice(f"fitting patterns for {checkpoint.name} on {source.name} (train split, at most "
               f"{AUTO_FIT_MAX_IMAGES} images) into {out}; later runs reuse that file")
        fit_with_progress(model, meta, checkpoint, source, "train", kinds, out, max_images=AUTO_FIT_MAX_IMAGES,
                          seed=0, batch_size=32, workers=0, device=device)

    return choose_rules_and_patterns(requested, patterns, checkpoint, model, meta, kind, fit, notice)
