"""The work behind `smadlrp explain` and `smadlrp trace`: load images, run explainers, write per-image files.

No printing here: the CLI renders what these functions return.
"""

from __future__ import annotations

import functools
import re
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.utils.data import Subset

from smadlrp.core.errors import UsageError
from smadlrp.data.loading import ImageDataset, Prepare, Sample, make_loader
from smadlrp.data.paths import output_stems, safe_output
from smadlrp.data.perturb import Perturbation
from smadlrp.detector.checkpoint import CheckpointMeta
from smadlrp.detector.inference import refuse_non_finite
from smadlrp.explain.heatmaps import (
    heatmap_index,
    heatmap_lut,
    overlay_rgb,
    plot_condition_grid,
    plot_rule_grid,
    relevance_map,
    robust_scale,
    save_heatmap,
    save_rgb,
)
from smadlrp.lrp import (
    ATTENTION_RULES,
    DEFAULT_ATTENTION,
    SUM_SPLITS,
    Contrast,
    Explainer,
    Relevance,
    method_is_signal,
    method_names,
    method_parameters,
)
from smadlrp.lrp.patterns import check_fingerprint, load_patterns, weights_fingerprint

CONTRAST = "contrast"  # `--target contrast`: the attack logit minus the other's (lrp.Contrast)
SIGNAL_RULES = ("patternnet",)  # output a signal estimate in input space, not a relevance: its sum means nothing
PATTERN_KINDS = ("positive", "all")  # default first: the two-component estimator suits ReLU networks (Kindermans 2018)


def pattern_rules() -> tuple[str, ...]:
    """Methods that need fitted patterns."""
    return tuple(m for m in method_names() if "patterns" in method_parameters(m))


def resolve_rules(requested: Sequence[str], have_patterns: bool) -> list[str]:
    """Expand `all` (every method; pattern rules only with patterns) and check the names, keeping order."""
    names: list[str] = []
    for rule in requested:
        if rule == "all":
            names += [m for m in method_names() if have_patterns or m not in pattern_rules()]
        elif rule not in method_names():
            raise UsageError(f"unknown rule {rule!r}; choose one of: all, {', '.join(method_names())}")
        elif rule in pattern_rules() and not have_patterns:
            raise UsageError(f"rule {rule} needs fitted patterns: run `smadlrp fit-patterns --checkpoint CKPT "
                             "--out patterns.safetensors` and pass --patterns patterns.safetensors")
        else:
            names.append(rule)
    return list(dict.fromkeys(names))


def parse_params(items: Sequence[str]) -> dict[str, float]:
    """`KEY=VALUE` rule parameters (numbers), e.g. `epsilon=1e-6`."""
    params: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            params[key.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--param {item!r}: expected KEY=NUMBER, e.g. epsilon=1e-6") from None
        if not sep or not key.strip():
            raise UsageError(f"--param {item!r}: expected KEY=NUMBER, e.g. epsilon=1e-6")
    return params


def load_pattern_tensors(path: Path, model: nn.Module, kind: str = PATTERN_KINDS[0]) -> dict[str, torch.Tensor]:
    """The `kind` patterns (positive or all) of `path` for `model`; refused when fitted on other weights or
    when the file holds no patterns of that kind."""
    if kind not in PATTERN_KINDS:
        raise UsageError(f"--pattern-kind {kind!r}: choose {' or '.join(PATTERN_KINDS)}")
    sets, meta = load_patterns(path)
    check_fingerprint(meta, weights_fingerprint(model.state_dict()))
    if kind not in sets:
        raise UsageError(f"{path} holds {' and '.join(sets)} patterns, not {kind}: choose --pattern-kind "
                         f"{next(iter(sets))}, or refit with `smadlrp fit-patterns --kind {kind}` (or --kind both)")
    return sets[kind].patterns


def head_caveat(meta: CheckpointMeta) -> str | None:
    """What an explanation of this checkpoint says about its head when no LRP rule explains it (a one-class
    Gaussian mixture), else None."""
    if meta.head.get("kind") != "gmm":
        return None
    return ("the gmm head (a Gaussian mixture of bona fide features) is explained by gradient x input of its score, "
            "R_f = f * dS/df, which does not conserve relevance; the backbone below it by the chosen rule")


def build_explainers(model: nn.Module, meta: CheckpointMeta, rules: Sequence[str], params: Mapping[str, float],
                     patterns: Mapping[str, torch.Tensor] | None, sum_split: str = "z",
                     attention: str = DEFAULT_ATTENTION, notify: Callable[[str], None] = lambda _: None
                     ) -> dict[str, Explainer]:
    """One explainer per rule, each given the parameters it accepts (z-box bounds from the checkpoint's
    normalisation, patterns for the pattern rules, and the user's `--param` values); `sum_split` and
    `attention` go to the relevance rules (signal rules pass sums by the gradient and hold attention constant).
    `notify` hears how a head without an LRP rule is explained (`head_caveat`)."""
    caveat = head_caveat(meta)
    if caveat is not None:
        notify(caveat)
    offered: dict[str, Any] = {"mean": meta.mean, "std": meta.std, "patterns": patterns, **params}
    unused = set(params) - {p for rule in rules for p in method_parameters(rule)}
    if unused:
        raise UsageError(f"--param {', '.join(sorted(unused))}: not a parameter of {', '.join(rules)}")
    if sum_split not in SUM_SPLITS:
        raise UsageError(f"--sum-split {sum_split!r}: choose {' or '.join(SUM_SPLITS)}")
    relevance_rules = [rule for rule in rules if not method_is_signal(rule)]
    if sum_split != "z" and not relevance_rules:
        raise UsageError(f"--sum-split {sum_split}: {', '.join(rules)} propagate(s) a signal, which passes sums by "
                         "the gradient")
    if attention not in ATTENTION_RULES:
        raise UsageError(f"--attention {attention!r}: choose {' or '.join(ATTENTION_RULES)}")
    split: dict[str, Any] = {"sum_split": sum_split, "attention": attention}
    return {rule: Explainer(model, rule, class_names=meta.class_names,
                            **{k: v for k, v in offered.items() if k in method_parameters(rule)},
                            **(split if rule in relevance_rules else {}))
            for rule in rules}


def parse_target(text: str, class_names: Sequence[str], attack_class: str | None = None) -> int | str | Contrast | None:
    """`predicted` -> None, a class name -> itself, an integer -> the index (checked later against the model),
    `contrast` -> the attack class's logit minus the other's (`lrp.Contrast`)."""
    if text == "predicted":
        return None
    if text == CONTRAST and attack_class is not None:
        return Contrast(attack_class)
    if text in class_names:
        return text
    if re.fullmatch(r"\d+", text):
        return int(text)
    raise UsageError(f"--target {text!r}: use predicted, {CONTRAST}, a class name ({', '.join(class_names)}) or an "
                     "index")


def to_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> npt.NDArray[np.uint8]:
    """Undo normalisation: (B, 3, H, W) model input -> (B, H, W, 3) uint8 pixels as the model saw them."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    pixels = ((x.cpu() * s + m).clamp(0, 1) * 255 + 0.5).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


@dataclass
class ImageResult:
    """One image's explanation numbers: prediction, score, target, and per rule the relevance sum."""

    path: Path
    predicted: str
    p_attack: float
    target: str
    target_logit: float
    relevance_sum: dict[str, float] = field(default_factory=dict)
    term_relevance: dict[str, dict[str, float]] = field(default_factory=dict)  # rule -> learned term -> relevance
    name: str = ""  # the output files' common stem (data.paths.output_stems): unique among the images
    files: list[str] = field(default_factory=list)
    perturbed: dict[str, ConditionResult] = field(default_factory=dict)  # by perturbation spec


@dataclass
class ConditionResult:
    """The same image under one perturbation: its score, and per rule how its heatmap relates to the clean one."""

    p_attack: float
    target: str  # the class explained (with target `predicted`, the prediction under the perturbation)
    target_logit: float
    correlation: dict[str, float] = field(default_factory=dict)  # Pearson r of the (H, W) maps, clean vs perturbed


def image_batches(images: Sequence[Path], meta: CheckpointMeta, batch_size: int, workers: int,
                  device: torch.device, share: Sequence[int] | None = None,
                  perturbation: Perturbation | None = None,
                  prepare: Prepare | None = None) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """(B, 3, H, W) preprocessed batches of `images` (only the positions in `share` when given; each image under
    `perturbation`, seeded by its position, when given) with their positions in the list."""
    dataset = ImageDataset([Sample(p, 0) for p in images], meta.input_size, meta.mean, meta.std,
                           perturb=perturbation, prepare=prepare)
    chosen = dataset if share is None else Subset(dataset, list(share))
    for x, _, index in make_loader(chosen, batch_size, workers=workers, device=device):
        yield x, index.tolist()


class BackgroundWriter:
    """Runs file-writing jobs in order on one background thread, so that encoding and writing the PNGs of one
    batch overlaps the relevance pass of the next. At most `pending` jobs wait; `submit` blocks beyond that.
    The first job that fails raises its exception in the caller (at the next submit or at exit); leaving the
    `with` block waits for every job."""

    def __init__(self, pending: int = 32) -> None:
        self.limit = pending
        self.jobs: deque[Future[object]] = deque()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smadlrp-writer")

    def __enter__(self) -> BackgroundWriter:
        return self

    def submit(self, job: Callable[[], object]) -> None:
        while self.jobs and (len(self.jobs) >= self.limit or self.jobs[0].done()):
            self.jobs.popleft().result()
        self.jobs.append(self.pool.submit(job))

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                while self.jobs:
                    self.jobs.popleft().result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def explain_images(images: Sequence[Path], meta: CheckpointMeta, explainers: Mapping[str, Explainer],
                   target: int | str | Contrast | None, out: Path, *, batch_size: int, workers: int,
                   device: torch.device,
                   raw: dict[str, list[torch.Tensor]] | None = None, share: Sequence[int] | None = None,
                   perturbations: Sequence[Perturbation] = (),
                   prepare: Prepare | None = None,
                   on_batch: Callable[[int], None] = lambda n: None) -> list[ImageResult]:
    """Explain every image with every explainer (each computed independently) and write its files into `out`:
    `<name>.<rule>.heatmap.png`, `<name>.<rule>.overlay.png` and, with several rules, `<name>.grid.png`.
    Files are written on a background thread while the next batch is explained; all exist on return.
    With `raw`, each rule's (B, C, H, W) relevance batches are appended to `raw[rule]`. With `share`, only
    those positions of `images` are explained (one process's share under torchrun; names stay those of the
    whole list). Each of `perturbations` explains the images once more under it: `<name>.<tag>.<rule>.heatmap.png`
    and `.overlay.png` (tag: the spec with `-` for `:`), `<name>.perturb.png` with a row per condition, and the
    score and heatmap correlation with the clean one in `ImageResult.perturbed`."""
    stems = output_stems(images)
    inputs = {p.resolve() for p in images}
    results: list[ImageResult] = []
    perturbed_batches = [image_batches(images, meta, batch_size, workers, device, share, p, prepare)
                         for p in perturbations]
    with BackgroundWriter() as writer:
        for x, positions in image_batches(images, meta, batch_size, workers, device, share, prepare=prepare):
            pixels = to_uint8(x, meta.mean, meta.std)
            maps: dict[str, np.ndarray] = {}
            batch_results: list[ImageResult] = []
            for rule, explainer in explainers.items():
                res = explainer.explain(x, target)
                relevance = res.relevance.detach().cpu()
                if raw is not None:
                    raw.setdefault(rule, []).append(relevance)
                maps[rule] = relevance.sum(dim=1).numpy()
                if not batch_results:
                    batch_results = _predictions(images, positions, res, meta)
                sums = relevance.flatten(1).sum(dim=1).double()
                for result, value in zip(batch_results, sums.tolist(), strict=True):
                    result.relevance_sum[rule] = value
                for term, values in res.terms.items():
                    for result, value in zip(batch_results, values.double().tolist(), strict=True):
                        result.term_relevance.setdefault(rule, {})[term] = value
            for row, result in enumerate(batch_results):
                result.name = stems[positions[row]]
                image_maps = {rule: maps[rule][row] for rule in explainers}
                files = {name: safe_output(out, f"{stems[positions[row]]}.{name}.png", inputs)
                         for rule in explainers for name in (f"{rule}.heatmap", f"{rule}.overlay")}
                if len(explainers) > 1:
                    files["grid"] = safe_output(out, f"{stems[positions[row]]}.grid.png", inputs)
                result.files += [path.name for path in files.values()]
                title = f"{result.path.name}: target {result.target}, P({meta.attack_class}) {result.p_attack:.3f}"
                writer.submit(functools.partial(_write_image_files, pixels[row], image_maps, files, title))
            rows: list[list[tuple[str, np.ndarray, dict[str, np.ndarray]]]] = [
                [("clean", pixels[row], {rule: maps[rule][row] for rule in explainers})]
                for row in range(len(positions))]
            for perturbation, batches in zip(perturbations, perturbed_batches, strict=True):
                xp, _ = next(batches)
                tag = perturbation.spec.replace(":", "-")
                p_pixels, p_maps = to_uint8(xp, meta.mean, meta.std), {}
                for rule, explainer in explainers.items():
                    res = explainer.explain(xp, target)
                    p_maps[rule] = res.relevance.detach().cpu().sum(dim=1).numpy()
                    scored = _predictions(images, positions, res, meta)
                    for row, (result, score) in enumerate(zip(batch_results, scored, strict=True)):
                        condition = result.perturbed.setdefault(
                            perturbation.spec, ConditionResult(score.p_attack, score.target, score.target_logit))
                        condition.correlation[rule] = pearson(maps[rule][row], p_maps[rule][row])
                for row, result in enumerate(batch_results):
                    stem = stems[positions[row]]
                    files = {name: safe_output(out, f"{stem}.{tag}.{name}.png", inputs)
                             for rule in explainers for name in (f"{rule}.heatmap", f"{rule}.overlay")}
                    result.files += [path.name for path in files.values()]
                    image_maps = {rule: p_maps[rule][row] for rule in explainers}
                    rows[row].append((perturbation.spec, p_pixels[row], image_maps))
                    writer.submit(functools.partial(_write_image_files, p_pixels[row], image_maps, files, ""))
            for row, result in enumerate(batch_results if perturbations else []):
                path = safe_output(out, f"{stems[positions[row]]}.perturb.png", inputs)
                result.files.append(path.name)
                writer.submit(functools.partial(plot_condition_grid, rows[row], path, title=result.path.name))
            results += batch_results
            on_batch(len(positions))
    return results


def pearson(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Pearson correlation of two maps of the same shape (NaN when either is constant)."""
    x, y = np.ravel(np.asarray(a, dtype=np.float64)), np.ravel(np.asarray(b, dtype=np.float64))
    x, y = x - x.mean(), y - y.mean()
    norm = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / norm) if norm > 0 else float("nan")


def _write_image_files(pixels: npt.NDArray[np.uint8], maps: Mapping[str, np.ndarray], files: Mapping[str, Path],
                       title: str) -> None:
    """One image's heatmap and overlay per rule (each on its own robust scale) and, when `files` names one, the
    grid; `pixels` (H, W, 3) uint8, `maps` rule -> (H, W) channel-summed relevance."""
    for rule, rmap in maps.items():
        limit = robust_scale(rmap)
        index = heatmap_index(rmap, limit)
        save_heatmap(index, files[f"{rule}.heatmap"])
        save_rgb(overlay_rgb(pixels, rmap, limit=limit, heat=heatmap_lut()[index]), files[f"{rule}.overlay"])
    if "grid" in files:
        plot_rule_grid(pixels, maps, files["grid"], title=title)


def _predictions(images: Sequence[Path], positions: Sequence[int], res: Relevance,
                 meta: CheckpointMeta) -> list[ImageResult]:
    """Per image: the prediction, P(attack), the target (`A - B` for a contrast) and the explained output."""
    logits, target, explained = res.logits.cpu(), res.target.cpu(), res.explained.cpu()
    probs = torch.softmax(logits.double(), dim=1)
    refuse_non_finite(probs[:, meta.attack_index].tolist(), [images[pos] for pos in positions], [""] * len(positions))
    names = [meta.class_names[int(t)] + (f" - {meta.class_names[1 - int(t)]}" if res.contrast else "")
             for t in target]
    return [ImageResult(path=images[pos], predicted=meta.class_names[int(logits[i].argmax())],
                        p_attack=float(probs[i, meta.attack_index]), target=names[i], target_logit=float(explained[i]))
            for i, pos in enumerate(positions)]


TRACE_PANELS = 24  # at most this many maps in a trace figure: a ResNet-50 has about 170 spatial nodes


def layer_maps(records: Sequence[Any], limit: int = TRACE_PANELS) -> tuple[list[tuple[str, np.ndarray]], int]:
    """Channel-summed (H, W) maps of the spatial trace records (first image of the batch), labelled, and how
    many spatial records there were: all of them, or `limit` spread evenly from the first to the last."""
    spatial = [rec for rec in records if rec.relevance.dim() == 4]
    total = len(spatial)
    if total > limit:
        spatial = [spatial[i] for i in np.linspace(0, total - 1, limit).round().astype(int)]
    return [(f"{rec.index}: {rec.name}", relevance_map(rec.relevance[0].cpu().numpy())) for rec in spatial], total
