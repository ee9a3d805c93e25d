"""`smadlrp explain` (relevance heatmaps for images) and `smadlrp trace` (relevance at every layer)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich import box
from rich.table import Table

from smadlrp.cli import app
from smadlrp.cli.common import (
    AlignOption,
    AttentionOption,
    BatchSizeOption,
    CheckpointOption,
    DeviceOption,
    ImagesPerSecond,
    JsonOption,
    ParamOption,
    PatternKindOption,
    PatternsOption,
    SumSplitOption,
    TargetOption,
    WorkersOption,
    command,
    console,
    file_plan,
    notice,
    progress_bar,
    rank_line,
    rule_option,
    write_json,
)
from smadlrp.cli.defaults import (
    find_checkpoint,
    open_model,
    rules_and_patterns,
)
from smadlrp.core import distributed
from smadlrp.core.container import write_document
from smadlrp.core.errors import UsageError
from smadlrp.data.align import recorded_aligner
from smadlrp.data.paths import (
    collect_images,
    output_stems,
    prepare_out_dir,
    refuse_outputs_over_inputs,
    safe_output,
)
from smadlrp.data.perturb import SPEC_HELP, parse_perturbations
from smadlrp.detector.checkpoint import CheckpointMeta
from smadlrp.explain.heatmaps import plot_layer_maps
from smadlrp.explain.run import (
    PATTERN_KINDS,
    SIGNAL_RULES,
    ImageResult,
    build_explainers,
    explain_images,
    head_caveat,
    image_batches,
    layer_maps,
    parse_params,
    parse_target,
)
from smadlrp.lrp import DEFAULT_ATTENTION, SUM_SPLITS, Relevance
from smadlrp.lrp import trace as lrp_trace
from smadlrp.lrp.trace import conservation_rows

DEFAULT_RULE = "epsilon"

def _gather_relevance(ranks: distributed.Ranks, share: list[int],
                      raw: dict[str, list[torch.Tensor]] | None) -> dict[str, torch.Tensor] | None:
    """Rule -> (N, C, H, W) relevance of every image in input order, on rank 0 (None elsewhere or without raw)."""
    if raw is None:
        return None
    mine = {name: torch.cat(parts) for name, parts in raw.items()}
    parts = ranks.gather_to_main((share, mine))
    if not parts:
        return None
    order = torch.tensor([p for positions, _ in parts for p in positions]).argsort()
    return {name: torch.cat([tensors[name] for positions, tensors in parts if positions])[order] for name in mine}


def _plan_inputs(outputs: dict[str, Path | None], checkpoint: Path, patterns: Path | None, images: list[Path],
                 out: Path) -> None:
    """Refuse, before any work, an output option that names the checkpoint, the patterns or an image, and an
    --out folder where the per-image files would replace input images."""
    plan = file_plan(outputs)
    plan.reads("the checkpoint", checkpoint)
    plan.reads("the pattern file", patterns)
    plan.reads("an input image", images, keep=False)
    refuse_outputs_over_inputs(out, images)


@app.command()
@command(ranks=True)
def explain(
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders (searched recursively).")],
    checkpoint: CheckpointOption = None,
    rule: Annotated[list[str] | None, rule_option(DEFAULT_RULE)] = None,
    patterns: PatternsOption = None,
    pattern_kind: PatternKindOption = PATTERN_KINDS[0],
    target: TargetOption = "predicted",
    param: ParamOption = None,
    sum_split: SumSplitOption = SUM_SPLITS[0],
    attention: AttentionOption = DEFAULT_ATTENTION,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("test_results"),
    batch_size: BatchSizeOption = 16,
    save_raw: Annotated[bool, typer.Option("--save-raw", help="Also write the relevance tensors (safetensors).")]
    = False,
    perturb: Annotated[
        list[str] | None, typer.Option("--perturb", metavar="SPEC", help=f"Also explain each image under this "
                                       f"perturbation (repeatable): {SPEC_HELP}. Writes its heatmaps, a "
                                       "NAME.perturb.png per image, and each heatmap's correlation with the clean one.")
    ] = None,
    align: AlignOption = False,
    workers: WorkersOption = 0,
    device: DeviceOption = None,
    json_out: JsonOption = None,
) -> None:
    """Explain images with LRP: a heatmap and an overlay per image and rule, a grid per image for several rules
    (under torchrun: each process explains a share of the images and writes their files)."""
    conditions = parse_perturbations(perturb or [])
    images = collect_images(paths)
    checkpoint = find_checkpoint(checkpoint)
    _plan_inputs({"--json": json_out}, checkpoint, patterns, images, out)
    model, meta, torch_device = open_model(checkpoint, device)
    rules, pattern_tensors = rules_and_patterns(rule or [DEFAULT_RULE], patterns, checkpoint, model, meta, torch_device,
                                                pattern_kind)
    params = parse_params(param or [])
    explainers = build_explainers(model, meta, rules, params, pattern_tensors, sum_split, attention, notice)
    wanted = parse_target(target, meta.class_names, meta.attack_class)
    prepare_out_dir(out)
    raw: dict[str, list[torch.Tensor]] | None = {} if save_raw else None
    ranks = distributed.current()
    share = ranks.shard(len(images), batch_size)
    rank_line(f"explaining {len(share)} of {len(images)} images")
    with progress_bar(ImagesPerSecond()) as bar, ranks.shared_failure():
        task = bar.add_task(f"explaining ({', '.join(rules)})", total=len(share))
        results = explain_images(images, meta, explainers, wanted, out, batch_size=batch_size, workers=workers,
                                 device=torch_device, raw=raw, share=share, perturbations=conditions,
                                 prepare=recorded_aligner(meta.alignment, str(checkpoint)) if align else None,
                                 on_batch=lambda n: bar.advance(task, n))
    results = ranks.gather_by_position(share, results)
    relevance = _gather_relevance(ranks, share, raw)
    if not ranks.is_main:
        return  # rank 0 prints the table of every image and writes the shared files
    console.print(_results_table(results, meta, f"{len(images)} image(s), {checkpoint.name}"))
    if conditions:
        console.print(_perturbed_table(results, meta.attack_class))
    if relevance is not None:
        raw_path = safe_output(out, "relevance.safetensors", set(images))
        write_document(raw_path, relevance,
                       {"schema": "smadlrp.relevance/1", "files": [str(p) for p in images],
                        "names": output_stems(images), "checkpoint": str(checkpoint)})
    console.print(f"wrote {sum(len(r.files) for r in results) + (relevance is not None)} file(s) to {out}",
                  highlight=False)
    images_json = [
        {"path": str(r.path), "name": r.name, "predicted": r.predicted, "p_attack": r.p_attack, "target": r.target,
         "target_logit": r.target_logit, "relevance_sum": r.relevance_sum, "term_relevance": r.term_relevance,
         "files": r.files,
         **({"perturbed": {spec: asdict(c) for spec, c in r.perturbed.items()}} if conditions else {})}
        for r in results
    ]  # fmt: skip
    write_json(json_out, {"checkpoint": str(checkpoint), "rules": rules, "sum_split": sum_split,
                          "attention": attention, "head": head_caveat(meta), "out": str(out), "images": images_json})


def _results_table(results: list[ImageResult], meta: CheckpointMeta, title: str) -> Table:
    """Per image and rule: the score, the target, its logit, the relevance sum and each learned term's share."""
    table = Table(title=title, box=box.SIMPLE_HEAD,
                  caption="logit: the target class's; sum R: the relevance sum, equal to the logit when the rule "
                          "conserves relevance and the biases absorb none; signal: the rule's output is a signal "
                          "estimate in input space, not a relevance, so its sum means nothing")
    terms = sorted({t for r in results for values in r.term_relevance.values() for t in values})
    for column in ("file", f"P({meta.attack_class})", "target", "logit", "rule", "sum R", *terms):
        text = column in {"file", "target", "rule"}
        table.add_column(column, justify="left" if text else "right", overflow="fold", no_wrap=not text,
                         min_width=14 if column == "file" else None)
    for result in results:
        # an image whose output name needed a number to be unique shows it (`sub__a.png (sub__a~2)`)
        named = f"{result.path.name} ({result.name})" if "~" in result.name else result.path.name
        image = [named, f"{result.p_attack:.4f}", result.target, f"{result.target_logit:.4g}"]
        for i, (name, value) in enumerate(result.relevance_sum.items()):
            table.add_row(*(image if i == 0 else [""] * len(image)), name,
                          "[dim]signal[/dim]" if name in SIGNAL_RULES else f"{value:.4g}",
                          *(f"{result.term_relevance.get(name, {}).get(t, 0.0):.4g}" for t in terms))
    return table


def _perturbed_table(results: list[ImageResult], attack_class: str) -> Table:
    """Per image and condition: the score, its change from the clean image, and per rule the correlation of the
    heatmap with the clean one."""
    rules = list(results[0].relevance_sum)
    table = Table(title="Under perturbation", box=box.SIMPLE_HEAD,
                  caption="r: Pearson correlation of the heatmap with the clean image's (1 = unmoved; "
                          "negative when the explained class changed with the prediction)")
    for column in ("file", "condition", f"P({attack_class})", "change", "target", *(f"r {rule}" for rule in rules)):
        table.add_column(column, justify="left" if column in {"file", "condition", "target"} else "right",
                         overflow="fold")
    for result in results:
        for i, (spec, condition) in enumerate(result.perturbed.items()):
            table.add_row(result.path.name if i == 0 else "", spec, f"{condition.p_attack:.4f}",
                          f"{condition.p_attack - result.p_attack:+.4f}", condition.target,
                          *(f"{condition.correlation[rule]:.3f}" for rule in rules))
    return table


@app.command()
@command()
def trace(
    image: Annotated[Path, typer.Argument(help="One image file.", dir_okay=False)],
    checkpoint: CheckpointOption = None,
    rule: Annotated[str, typer.Option("--rule", "-r", help="Rule or composite.")] = DEFAULT_RULE,
    patterns: PatternsOption = None,
    pattern_kind: PatternKindOption = PATTERN_KINDS[0],
    target: TargetOption = "predicted",
    param: ParamOption = None,
    sum_split: SumSplitOption = SUM_SPLITS[0],
    attention: AttentionOption = DEFAULT_ATTENTION,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("test_results"),
    device: DeviceOption = None,
    json_out: JsonOption = None,
) -> None:
    """Relevance at the input of every layer and at the output: a conservation table, tensors and a figure."""
    images = collect_images([image])
    if rule == "all":
        raise UsageError("trace takes one rule, not all")
    checkpoint = find_checkpoint(checkpoint)
    _plan_inputs({"--json": json_out}, checkpoint, patterns, images, out)
    model, meta, torch_device = open_model(checkpoint, device)
    (rule,), pattern_tensors = rules_and_patterns([rule], patterns, checkpoint, model, meta, torch_device,
                                                  pattern_kind)
    explainer = build_explainers(model, meta, [rule], parse_params(param or []), pattern_tensors, sum_split,
                                 attention, notice)[rule]
    prepare_out_dir(out)
    x, _ = next(image_batches(images, meta, 1, 0, torch_device))
    with lrp_trace() as recorded:
        result = explainer.explain(x, parse_target(target, meta.class_names, meta.attack_class))
    records = recorded.records
    rows = conservation_rows(records)
    columns = ["#", "layer", "type", "shape", "sum", "pos.", "neg.", "ratio"]
    cells = [[str(row["index"]), row["name"], row["type"], "x".join(str(n) for n in row["shape"][1:]),
              f"{row['sum']:.4g}", f"{row['positive']:.4g}", f"{row['negative']:.4g}", f"{row['ratio']:.4f}"]
             for row in rows]
    # Long graph names (ResNet-50's layer4.0.downsample.1) keep their row: the type column goes first.
    widths = [max(len(c[i]) for c in [columns, *cells]) for i in range(len(columns))]
    if sum(widths) + 2 * (len(widths) - 1) > console.width:
        del columns[2]
        for c in cells:
            del c[2]
    table = Table(title=f"{image.name}: {rule}, target {_target_name(meta, result)}",
                  caption="relevance at each node's input (at the output of a sum, gate or concatenation): sum, "
                          "positive and negative mass; ratio = sum / output relevance (1 = conserved)",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for column in columns:
        table.add_column(column, justify="left" if column in {"layer", "type", "shape"} else "right",
                         overflow="fold", no_wrap=column not in {"layer", "type"})
    for c in cells:
        table.add_row(*c)
    console.print(table)
    terms = {name: float(values[0]) for name, values in result.terms.items()}
    if terms:
        console.print(_terms_line(terms, rows), highlight=False)
    stem = output_stems(images)[0]
    inputs = set(images)
    write_document(safe_output(out, f"{stem}.{rule}.trace.safetensors", inputs),
                   {f"{rec.index:03d}.{rec.name}": rec.relevance[0] for rec in records},
                   {"schema": "smadlrp.trace/1", "image": str(image), "rule": rule, "sum_split": sum_split,
                    "attention": attention, "layers": rows, "terms": terms})
    maps, spatial = layer_maps(records)
    note = None if len(maps) == spatial else (f"{len(maps)} of {spatial} nodes, evenly spaced; every node's map "
                                              f"is in {stem}.{rule}.trace.safetensors")
    plot_layer_maps(maps, safe_output(out, f"{stem}.{rule}.trace.png", inputs), note)
    console.print(f"wrote {stem}.{rule}.trace.safetensors and {stem}.{rule}.trace.png to {out}", highlight=False)
    write_json(json_out, {"image": str(image), "rule": rule, "sum_split": sum_split, "attention": attention,
                          "target": _target_name(meta, result), "explained": float(result.explained[0]),
                          "layers": rows, "terms": terms})


def _target_name(meta: CheckpointMeta, result: Relevance) -> str:
    """The explained class of the first image, `A - B` for a contrast."""
    target = int(result.target[0])
    return meta.class_names[target] + (f" - {meta.class_names[1 - target]}" if result.contrast else "")


def _terms_line(terms: dict[str, float], rows: list[dict[str, Any]]) -> str:
    """The relevance of each learned term (positional embedding, class token) and of the input with them, as
    ratios of the output relevance."""
    output = rows[-1]["sum"]
    ratio = (lambda v: f"{v / output:.4f}") if output else (lambda v: "nan")
    total = rows[0]["sum"] + sum(terms.values())
    parts = [f"{name} {value:.4g} (ratio {ratio(value)})" for name, value in terms.items()]
    return f"learned terms: {'; '.join(parts)}; input + terms: {total:.4g} (ratio {ratio(total)})"
