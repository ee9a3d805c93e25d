"""`smadlrp evaluate`: score a split, print ISO/IEC 30107-3 metrics, write machine outputs, gate CI."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Annotated

import typer

from smadlrp.cli import app
from smadlrp.cli.common import (
    AttackLabelOption,
    BatchSizeOption,
    BonafideLabelOption,
    CheckpointOption,
    DataOption,
    DeviceOption,
    JsonOption,
    ProtocolOption,
    WorkersOption,
    console,
    data_source,
    detail,
    fail_line,
    find_checkpoint,
    handle_errors,
    notice,
    pick_device,
    progress_bar,
    write_json,
)
from smadlrp.core.errors import UsageError
from smadlrp.core.fileio import write_text_atomic
from smadlrp.data.loading import DataSource, ImageDataset, SplitIndex, make_loader
from smadlrp.detector.checkpoint import CheckpointMeta, load_checkpoint
from smadlrp.detector.inference import Predictions, predict
from smadlrp.evaluation.metrics import check_gates, d_eer, det_points, parse_gate, per_group, summarize
from smadlrp.evaluation.plots import plot_det
from smadlrp.evaluation.report import confusion_table, metrics_table, per_type_table, summary_markdown, to_jsonable


def _score_split(model: object, meta: CheckpointMeta, source: DataSource, split: str, batch_size: int,
                 workers: int, device: object) -> tuple[Predictions, SplitIndex]:
    index = source.split(split, meta.class_names, meta.attack_class, warn=notice)
    dataset = ImageDataset(index.samples, meta.input_size, meta.mean, meta.std)
    loader = make_loader(dataset, batch_size, workers=workers, device=device)  # type: ignore[arg-type]
    with progress_bar() as bar:
        task = bar.add_task(f"scoring {split}", total=len(dataset))
        preds = predict(model, loader, device, meta.attack_index,  # type: ignore[arg-type]
                        on_batch=lambda n: bar.advance(task, n))
    return preds, index


def _threshold(text: str) -> float | str:
    if text == "val-eer":
        return text
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--threshold {text!r}: use a number in [0, 1] or val-eer") from None
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"--threshold {text}: a P(morph) threshold lies in [0, 1]")
    return value


@app.command()
@handle_errors
def evaluate(
    checkpoint: CheckpointOption = None,
    data: DataOption = None,
    protocol: ProtocolOption = None,
    bonafide_label: BonafideLabelOption = "bonafide",
    attack_label: AttackLabelOption = "morph",
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    batch_size: BatchSizeOption = 64,
    threshold: Annotated[
        str, typer.Option(help="Decision threshold on P(morph): a number, or val-eer (the validation split's D-EER).")
    ] = "0.5",
    fail_above: Annotated[
        list[str] | None, typer.Option("--fail-above", help="Gate METRIC=LIMIT: exit 1 if the metric is above.")
    ] = None,
    fail_below: Annotated[
        list[str] | None, typer.Option("--fail-below", help="Gate METRIC=LIMIT: exit 1 if the metric is below.")
    ] = None,
    scores_out: Annotated[Path | None, typer.Option("--scores", help="Write path,label,score as CSV.",
                                                    dir_okay=False)] = None,
    det_out: Annotated[Path | None, typer.Option("--det", help="Write the DET curve as PNG.", dir_okay=False)] = None,
    markdown_out: Annotated[
        Path | None, typer.Option("--markdown", help="Write a Markdown summary (e.g. for a CI job summary).",
                                  dir_okay=False)
    ] = None,
    workers: WorkersOption = 0,
    device: DeviceOption = "auto",
    json_out: JsonOption = None,
) -> None:
    """Score a split with a checkpoint and report APCER, BPCER, D-EER, BPCER10/20/100 and more."""
    above = [parse_gate(g) for g in fail_above or []]
    below = [parse_gate(g) for g in fail_below or []]
    wanted = _threshold(threshold)
    checkpoint = find_checkpoint(checkpoint)
    torch_device = pick_device(device)
    model, meta = load_checkpoint(checkpoint, torch_device)
    source = data_source(data, protocol, bonafide_label, attack_label, meta)
    if wanted == "val-eer":
        val, _ = _score_split(model, meta, source, "val", batch_size, workers, torch_device)
        eer = d_eer(val.labels, val.scores)
        if eer.threshold is None:
            raise UsageError(f"--threshold val-eer: the validation split's D-EER is not estimable ({eer.reason})")
        t, threshold_source = eer.threshold, "validation D-EER"
        detail(f"threshold {t:.6f} from the validation split's D-EER ({eer.value:.2%})")
    else:
        t, threshold_source = float(wanted), "fixed"
    preds, index = _score_split(model, meta, source, split, batch_size, workers, torch_device)
    paths = [index.samples[i].path for i in preds.indices]
    summary = summarize(preds.labels, preds.scores, t, threshold_source=threshold_source)
    types = index.groups.get("morph_type", ("",) * len(index.samples))
    groups = [types[i] for i in preds.indices]
    by_type = per_group(preds.labels, preds.scores, groups, t) if any(groups) else None
    title = f"{checkpoint.name} on {split} ({summary.n_bonafide} {meta.class_names[1 - meta.attack_index]}, " \
            f"{summary.n_morph} {meta.attack_class})"
    console.print(confusion_table(summary.confusion))
    console.print(metrics_table(summary, title=title))
    if by_type is not None:
        console.print(per_type_table(by_type))
    if scores_out is not None:
        write_text_atomic(scores_out, _scores_csv(paths, preds))
    if det_out is not None:
        apcer, bpcer = det_points(preds.labels, preds.scores)
        plot_det({checkpoint.stem: (apcer, bpcer)}, det_out,
                 eer={checkpoint.stem: summary.eer.value} if summary.eer.value is not None else None)
    if markdown_out is not None:
        write_text_atomic(markdown_out, summary_markdown(summary, by_type, title))
    failures = check_gates(summary, above, below)
    write_json(json_out, to_jsonable({
        "checkpoint": str(checkpoint), "data": source.name, "split": split, "metrics": summary.as_dict(),
        "per_morph_type": by_type, "gates": {"failed": failures},
    }))
    for message in failures:
        fail_line(f"gate failed: {message}")
    if failures:
        raise typer.Exit(1)


def _scores_csv(paths: list[Path], preds: Predictions) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "score"])
    for path, label, score in zip(paths, preds.labels, preds.scores, strict=True):
        writer.writerow([str(path), int(label), f"{score:.8f}"])
    return buffer.getvalue()
