"""`smadlrp compare-rules`: which explanation is faithful for this detector (localisation, AOPC, time)?"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from smadlrp.cli import app
from smadlrp.cli.common import (
    AttackLabelOption,
    AttentionOption,
    BatchSizeOption,
    BonafideLabelOption,
    CheckpointOption,
    DataOption,
    DeviceOption,
    ImagesPerSecond,
    JsonOption,
    PatternKindOption,
    PatternsOption,
    ProtocolOption,
    SeedOption,
    SumSplitOption,
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
    data_source,
    find_checkpoint,
    open_model,
    rules_and_patterns,
)
from smadlrp.core import distributed
from smadlrp.core.errors import UsageError
from smadlrp.core.fileio import write_text_atomic
from smadlrp.data.loading import IMAGE_EXTENSIONS
from smadlrp.data.paths import prepare_out_dir
from smadlrp.explain.checks import CLASS_MAX_SPEARMAN, MPRT_MAX_SPEARMAN
from smadlrp.explain.compare import RANDOM, Comparison, Localisation, MethodResult, compare_methods
from smadlrp.explain.compare_csv import comparison_csv
from smadlrp.explain.grid import best_setting_line, grid_explainers, parse_grid
from smadlrp.explain.heatmaps import plot_perturbation_curves, plot_randomisation
from smadlrp.explain.imputation import DEFAULT_IMPUTATION, IMPUTATIONS
from smadlrp.explain.run import CONTRAST, PATTERN_KINDS, build_explainers
from smadlrp.lrp import Contrast
from smadlrp.lrp.composites import DEFAULT_ATTENTION, SUM_SPLITS

CSV_FILE, CURVES_FILE = "compare-rules.csv", "perturbation-curves.png"  # written into --out
RANDOMISATION_FILE = "randomisation.png"  # written into --out with --sanity
BEST = "bold green"
Column = tuple[str, Callable[[MethodResult], float | None], bool]  # header, value, higher is better


def _loc(pick: Callable[[Localisation], float | None]) -> Callable[[MethodResult], float | None]:
    return lambda m: None if m.localisation is None else pick(m.localisation)


COLUMNS: tuple[Column, ...] = (
    ("ms / image", lambda m: m.ms_per_image, False),
    ("AOPC", lambda m: m.aopc, True),
    ("AOPC - random", lambda m: m.aopc_vs_random, True),
    ("mass acc.", _loc(lambda loc: loc.mass_accuracy), True),
    ("rank acc.", _loc(lambda loc: loc.rank_accuracy), True),
    ("pointing", _loc(lambda loc: loc.pointing_game), True),
)


def _best(methods: Sequence[MethodResult], value: Callable[[MethodResult], float | None], higher: bool) -> float | None:
    """The best value of a column over every method but the random map (None when the column is empty)."""
    values = [v for m in methods if m.name != RANDOM and (v := value(m)) is not None]
    if not values:
        return None
    return max(values) if higher else min(values)


def _cell(value: float | None, best: float | None, digits: int) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    return f"[{BEST}]{text}[/{BEST}]" if best is not None and value == best else text


def results_table(result: Comparison, title: str) -> Table:
    """One row per rule and baseline; the best value of each column (random map aside) in bold green."""
    table = Table(title=title, caption=f"AOPC: mean drop of the {result.score} over {result.steps} steps of "
                                       f"{result.patch_size}x{result.patch_size}-pixel patches (higher = more "
                                       "faithful); localisation on morphs with artifact masks (higher = better)")
    table.add_column("method", justify="left", no_wrap=True)
    table.add_column("kind", justify="left", no_wrap=True)
    for header, _, _ in COLUMNS:
        table.add_column(header, justify="right")
    bests = [_best(result.methods, value, higher) for _, value, higher in COLUMNS]
    for m in result.methods:
        cells = [_cell(value(m), best, 2 if header.startswith("ms") else 4)
                 for (header, value, _), best in zip(COLUMNS, bests, strict=True)]
        table.add_row(m.name, m.kind, *cells)
    return table


def per_type_table(result: Comparison) -> Table:
    """Localisation per morph type: mass / rank / pointing for each method, best per cell column highlighted."""
    types = result.morph_types
    table = Table(title="Localisation per morph type", caption="each cell: mass accuracy / rank accuracy / "
                                                               "pointing game")
    table.add_column("method", justify="left", no_wrap=True)
    counts = {t: next(m.per_type[t].n_images for m in result.methods if t in m.per_type) for t in types}
    for t in types:
        table.add_column(f"{t} (n={counts[t]})", justify="right", no_wrap=True)
    getters = (lambda loc: loc.mass_accuracy, lambda loc: loc.rank_accuracy, lambda loc: loc.pointing_game)

    def value(t: str, get: Callable[[Localisation], float | None]) -> Callable[[MethodResult], float | None]:
        return lambda m: get(m.per_type[t]) if t in m.per_type else None

    bests = {(t, i): _best(result.methods, value(t, get), True) for t in types for i, get in enumerate(getters)}
    for m in result.methods:
        table.add_row(m.name, *(" / ".join(_cell(value(t, get)(m), bests[t, i], 3) for i, get in enumerate(getters))
                                for t in types))
    return table


CHECK_COLUMNS: tuple[Column, ...] = (
    ("AOPC LeRF", lambda m: m.lerf_aopc, False),
    ("ABPC", lambda m: m.abpc, True),
    ("class ρ", lambda m: m.class_sensitivity, False),
    ("MPRT ρ", lambda m: m.randomisation.spearman[-1] if m.randomisation else None, False),
    ("MPRT SSIM", lambda m: m.randomisation.ssim[-1] if m.randomisation else None, False),
    ("eMPRT", lambda m: m.randomisation.emprt if m.randomisation else None, True),
)


def checks_table(result: Comparison) -> Table:
    """One row per method: LeRF AOPC, ABPC, class sensitivity, MPRT and eMPRT, and how many checks it passes."""
    table = Table(title="Faithfulness and sanity checks", caption=(
        f"ABPC = AOPC(MoRF) - AOPC(LeRF), higher = more faithful; class ρ: Spearman between the maps of the two "
        f"classes, below {CLASS_MAX_SPEARMAN:g} = class-sensitive; MPRT: Spearman and SSIM of |map| with the "
        f"trained model's when every layer is randomised, below {MPRT_MAX_SPEARMAN:g} passes; eMPRT: rise of the "
        "map's entropy, above 0 passes"))
    table.add_column("method", justify="left", no_wrap=True)
    for header, _, _ in CHECK_COLUMNS:
        table.add_column(header, justify="right")
    table.add_column("passed", justify="right")
    bests = [_best(result.methods, value, higher) for _, value, higher in CHECK_COLUMNS]
    for m in result.methods:
        ran = [v for v in m.checks.values() if v is not None]
        table.add_row(m.name, *(_cell(value(m), best, 4 if header.startswith(("AOPC", "ABPC")) else 3)
                                for (header, value, _), best in zip(CHECK_COLUMNS, bests, strict=True)),
                      f"{sum(ran)}/{len(ran)}")
    return table


def _summary(result: Comparison) -> None:
    """The verdicts in words, one line per method."""
    console.print("[bold]Checks per method[/bold] (thresholds: " + ", ".join(
        f"{k} {v:g}" for k, v in result.thresholds.items()) + ")", highlight=False)
    for m in result.methods:
        console.print(f"  {m.name}: {m.summary}", highlight=False, soft_wrap=True)


def _figures(result: Comparison, name: str, out: Path) -> list[str]:
    """Write the perturbation curves (both orders) and, with the randomisation checks, their curves; file names."""
    baselines = [m.name for m in result.methods if m.kind == "baseline"]
    plot_perturbation_curves({m.name: m.curve for m in result.methods}, out / CURVES_FILE,
                             aopc={m.name: m.aopc for m in result.methods}, baselines=baselines,
                             ylabel=f"mean drop of the {result.score}", title=f"{name}, target {result.target}",
                             lerf={m.name: m.lerf_curve for m in result.methods},
                             abpc={m.name: m.abpc for m in result.methods})
    if result.randomised_layers is None:
        return [CURVES_FILE]
    randomised = [m for m in result.methods if m.randomisation is not None]
    plot_randomisation({m.name: m.randomisation.spearman for m in randomised if m.randomisation},
                       {m.name: m.randomisation.ssim for m in randomised if m.randomisation},
                       result.randomised_layers, out / RANDOMISATION_FILE, baselines=baselines,
                       threshold=MPRT_MAX_SPEARMAN, title=f"MPRT: {name}")
    return [CURVES_FILE, RANDOMISATION_FILE]


def _target(text: str | None, class_names: Sequence[str], attack_class: str) -> int | str | Contrast | None:
    """`--target`: a class name or index, or contrast; None (the attack class) when not given."""
    if text is None or text in class_names:
        return text
    if text == CONTRAST:
        return Contrast(attack_class)
    if text.isdigit():
        return int(text)
    if text == "predicted":
        raise UsageError("--target predicted: compare-rules explains one class for every image, so that all maps of "
                         f"an image answer the same question; use a class name ({', '.join(class_names)}) or an index")
    raise UsageError(f"--target {text!r}: unknown class; use a class name ({', '.join(class_names)}) or an index "
                     f"(0 to {len(class_names) - 1})")


@app.command("compare-rules")
@command(ranks=True)
def compare_rules(
    checkpoint: CheckpointOption = None,
    data: DataOption = None,
    protocol: ProtocolOption = None,
    bonafide_label: BonafideLabelOption = "bonafide",
    attack_label: AttackLabelOption = "morph",
    split: Annotated[str, typer.Option(help="Split to compare on.")] = "test",
    rule: Annotated[list[str] | None, rule_option("all (every method; the pattern rules when patterns are "
                                                  "available)")] = None,
    patterns: PatternsOption = None,
    pattern_kind: PatternKindOption = PATTERN_KINDS[0],
    target: Annotated[
        str | None, typer.Option(help="Class explained and scored for every image (name or index); default: the "
                                      "attack class.")
    ] = None,
    max_images: Annotated[int, typer.Option("--max-images", min=1, help="Images drawn (seeded, both classes).")]
    = 200,
    batch_size: BatchSizeOption = 32,
    patch_size: Annotated[
        int | None, typer.Option("--patch-size", min=1, help="Side of the perturbed square patches, model-input "
                                                             "pixels; default: input size / 16.")
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Patches removed, in each order (most and least relevant "
                                                   "first).")] = 50,
    impute: Annotated[str, typer.Option(metavar="|".join(IMPUTATIONS), help="What a removed patch becomes: road "
                                        "(noisy linear imputation from its neighbours), mean (the image's channel "
                                        "means) or blur (a blurred copy of the image).")] = DEFAULT_IMPUTATION,
    sanity: Annotated[bool, typer.Option("--sanity", help="Also run the randomisation checks (MPRT, eMPRT): every "
                                         "method again on the images once per layer of the model, randomised "
                                         "from the output down.")] = False,
    seed: SeedOption = 0,
    out: Annotated[Path, typer.Option(help="Output folder (CSV and figures).")] = Path("compare_results"),
    workers: WorkersOption = 0,
    device: DeviceOption = None,
    sum_split: SumSplitOption = SUM_SPLITS[0],
    attention: AttentionOption = DEFAULT_ATTENTION,
    grid: Annotated[
        list[str] | None, typer.Option("--grid", metavar="PARAM=V1,V2,...", help="Search the parameters of the one "
                                       "--rule given (repeatable; every combination is compared, e.g. --rule "
                                       "gamma-transformer --grid projection_gamma=0,0.05,0.25 --grid "
                                       "dense_gamma=0.05,0.25) and print the most faithful setting.")
    ] = None,
    json_out: JsonOption = None,
) -> None:
    """Compare LRP rules with the gradient, gradient x input and a random map: localisation against artifact
    masks, region perturbation in both orders (AOPC, ABPC), class sensitivity, with --sanity the randomisation
    checks (MPRT, eMPRT), and time per image; then which checks each method passes (under torchrun: each process
    takes a share of the images; rank 0 reports on all of them)."""
    checkpoint = find_checkpoint(checkpoint)
    plan = file_plan({"--json": json_out}, ("--out", out, (CSV_FILE, CURVES_FILE, *(
        (RANDOMISATION_FILE,) if sanity else ()))))
    plan.reads("the checkpoint", checkpoint)
    plan.reads("the pattern file", patterns)
    plan.reads("the protocol file", protocol)
    model, meta, torch_device = open_model(checkpoint, device)
    rules, pattern_tensors = rules_and_patterns(rule or ["all"], patterns, checkpoint, model, meta, torch_device,
                                                pattern_kind)
    wanted = _target(target, meta.class_names, meta.attack_class)
    explainers = grid_explainers(rules, parse_grid(grid or []), lambda rs, params: build_explainers(
        model, meta, rs, params, pattern_tensors, sum_split, attention, notice))
    source = data_source(data, protocol, bonafide_label, attack_label, meta)
    plan.reads_images_under(f"an image of {source.name}", source.root, IMAGE_EXTENSIONS)
    prepare_out_dir(out)
    with progress_bar(ImagesPerSecond()) as bar:

        def start(share: int, n: int) -> None:
            rank_line(f"comparing on {share} of {n} images")
            bar.update(task, total=share)

        def randomising(total: int | None, n: int) -> None:
            if total is not None:
                tasks.append(bar.add_task("randomisation checks (image passes)", total=total))
            bar.advance(tasks[-1], n)

        task = bar.add_task(f"comparing {len(rules)} rule(s) and 3 baselines", total=None)
        tasks = [task]
        result = compare_methods(model, meta, explainers, source, split=split, max_images=max_images,
                                 batch_size=batch_size, patch_size=patch_size, steps=steps, seed=seed, target=wanted,
                                 workers=workers, imputation=impute, sanity=sanity, pattern_kind=pattern_kind,
                                 device=torch_device, warn=notice, on_start=start,
                                 on_batch=lambda n: bar.advance(task, n), on_sanity=randomising)
    if not distributed.current().is_main:
        return  # rank 0 reports on every image and writes the files
    if result.localisation_note is not None:
        notice(f"localisation columns are n/a: {result.localisation_note}")
    counts = ", ".join(f"{n} {name}" for name, n in result.class_counts.items())
    console.print(results_table(result, f"{checkpoint.name} on {split} ({counts}), target {result.target}"))
    if result.morph_types:
        console.print(per_type_table(result))
    console.print(checks_table(result))
    _summary(result)
    write_text_atomic(out / CSV_FILE, comparison_csv(result))
    written = _figures(result, checkpoint.name, out)
    if grid:
        console.print(best_setting_line(result, list(explainers)), highlight=False, soft_wrap=True)
    console.print(f"wrote {CSV_FILE}, {' and '.join(written)} to {out}", highlight=False)
    write_json(json_out, {"checkpoint": str(checkpoint), "sum_split": sum_split, "attention": attention,
                          **result.as_dict()})
