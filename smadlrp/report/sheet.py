"""Examiner sheets: one self-contained HTML page per image of `smadlrp predict --sheet`.

A page puts one photograph in front of the person who decides about it: the photo (and the aligned crop the
detector saw), P(morph), the decision and what its operating point means, the relevance heatmap of one rule over
the face, its share per face region beside the detector's typical shares on bona fide images (sheet_regions), and
whether the decision holds under perturbations, each with a line saying what it does not prove. `plan_sheets` checks
the options and the output names before any work, `SheetPlan.for_detector` what needs the detector; `write_sheets`
does the work as one call (and prints each page to PDF with `--pdf`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from torch import nn

from smadlrp.core.distributed import Ranks
from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.core.fileio import write_text_atomic
from smadlrp.data.loading import Prepare, load_rgb
from smadlrp.data.paths import output_stems, refuse_outputs_over_inputs, safe_output
from smadlrp.data.perturb import Perturbation, parse_perturbations
from smadlrp.detector.checkpoint import CheckpointMeta
from smadlrp.detector.inference import ImageScore, score_files
from smadlrp.evaluation.thresholds import Threshold, describe, stored_point_name
from smadlrp.explain.heatmaps import HEATMAP_PERCENTILE, heatmap_index, heatmap_lut, overlay_rgb, robust_scale
from smadlrp.explain.run import build_explainers, image_batches, pattern_rules, to_uint8
from smadlrp.lrp import method_names
from smadlrp.lrp.composites import DEFAULT_ATTENTION, SUM_SPLITS
from smadlrp.report import sheet_regions
from smadlrp.report.build import environment, png_uri, stylesheet
from smadlrp.report.numbers import percent
from smadlrp.report.pdf import find_browser, print_pdf
from smadlrp.report.sheet_regions import PhotoRegions, RegionPlan, check_typical, region_plan, with_typical

SHEET_RULE = "epsilon-plus-flat"  # flat at the input, z+ on convolutions, epsilon on dense layers: ReLU CNNs
SHEET_PERTURBATIONS = ("jpeg:30", "print-scan")
SUFFIX = ".sheet.html"
PDF_SUFFIX = ".sheet.pdf"
BONA_FIDE = "bona fide"
DISPLAY_PX = 288  # small images (the detector's input, a crop) are enlarged to at least this width, pixel for pixel
PHOTO_PX = 480  # larger photos are shrunk to at most this size on the page

NOT_PROOF = {
    "score": "A morph score is evidence for an examiner, not a proof that the photo is a morph; a low score is not a "
             "proof that it is bona fide. The detector was trained on particular morphing tools and cameras and can "
             "be wrong on others.",
    "point": "The rates were measured on the validation split of the detector's training data; on photos from "
             "other sources, printers or morphing tools the real error rates can be higher.",
    "fixed": "A fixed threshold was not chosen on labelled data, so nothing here says how often a decision at it is "
             "wrong.",
    "heatmap": "The heatmap shows what the detector used for its score, not where the image was manipulated: red "
               "areas are not proven morphing traces, and an untouched area can be red.",
    "perturbed": "These are a few simulated conditions (one seed each); a decision that holds under them may still "
                 "change under another printer, scanner or compression, and a decision that changes weighs less.",
    "failed": "No score was computed for this file: this says nothing about whether the photo is a morph.",
}


def colour_scale_text(attack_class: str) -> str:
    return (f"Red marks pixels whose relevance speaks for \"{attack_class}\", blue pixels that speak against it (for "
            f"{BONA_FIDE}), white or grey pixels that hardly matter; the deeper the colour, the larger the "
            f"relevance. The map is scaled on its own: full colour is its {HEATMAP_PERCENTILE:g}th percentile of "
            f"|relevance|, so colours compare places within this photo, not with other photos.")


@dataclass(frozen=True)
class SheetPlan:
    """Checked `--sheet` options: the folder, the rule, the perturbations, each input's page name, where the region
    maps and typical shares come from, and the browser that prints PDFs (None: no PDF)."""

    out: Path
    rule: str
    perturbations: list[Perturbation]
    names: list[str]
    regions: RegionPlan = field(default_factory=RegionPlan)
    typical: Path | None = None
    browser: str | None = None

    @property
    def files(self) -> tuple[str, Path, list[str]]:
        """The pages (and PDFs) as `cli.common.file_plan` declares a folder's files."""
        pdfs = [name.removesuffix(SUFFIX) + PDF_SUFFIX for name in self.names] if self.browser else []
        return "--sheet", self.out, self.names + pdfs

    @property
    def reads(self) -> list[Path]:
        """The files the sheets read besides the images: the typical shares, a landmark CSV."""
        landmarks = self.regions.landmarks
        return [p for p in (self.typical, getattr(landmarks, "file", None)) if p is not None]

    def for_detector(self, model: nn.Module, meta: CheckpointMeta, checkpoint: Path) -> SheetPlan:
        """The plan with the typical shares read and checked against the detector (one line when they were made
        with another checkpoint), before any image is scored."""
        regions = with_typical(self.regions, self.typical, meta)
        if regions.typical is not None:
            check_typical(regions.typical, model, checkpoint)
        return replace(self, regions=regions)


def check_rule(rule: str, *, option: str = "--sheet-rule", command: str = "predict") -> str:
    """A rule the sheet (or the report's Errors section) can use without more input: a known one that needs no
    fitted patterns; UsageError naming `option` and the `command` that takes no pattern file."""
    if rule not in method_names():
        raise UsageError(f"{option} {rule!r}: unknown rule; choose one of: {', '.join(method_names())}")
    if rule in pattern_rules():
        raise UsageError(f"{option} {rule} needs fitted patterns, which {command} does not take: choose a rule "
                         f"without patterns (default {SHEET_RULE}), or run `smadlrp explain --rule {rule} --patterns "
                         "patterns.safetensors` (patterns from `smadlrp fit-patterns`)")
    return rule


def plan_sheets(out: Path | None, inputs: Sequence[Path], *, rule: str = SHEET_RULE,
                perturbations: Sequence[str] = SHEET_PERTURBATIONS, landmarks: str | None = None,
                regions: Path | None = None, typical: Path | None = None, pdf: bool = False,
                aligned: bool = False) -> SheetPlan | None:
    """Check everything before any work: the rule, the perturbation specs, the region options, that Chromium is
    there for `pdf`, and that no page would take the name of an input image in `out` (UsageError, exit code 2).
    None without `out` (no --sheet), after refusing the options that only a sheet uses."""
    if out is None:
        given = [name for name, value in (("--landmarks", landmarks), ("--regions", regions),
                                          ("--typical", typical), ("--pdf", pdf)) if value]
        if given:
            raise UsageError(f"{', '.join(given)} {'is an option' if len(given) == 1 else 'are options'} of the "
                             "examiner sheets: add --sheet DIR")
        return None
    if out.exists() and not out.is_dir():
        raise UsageError(f"--sheet {out} is an existing file, not a folder")
    conditions = parse_perturbations(list(perturbations))
    if typical is not None and not typical.is_file():
        raise UsageError(f"--typical {typical}: no such file (the `smadlrp regions --json` output of the detector)")
    sources = region_plan(landmarks, regions, aligned=aligned)
    browser = find_browser() if pdf else None
    refuse_outputs_over_inputs(out, inputs, option="--sheet")
    names = [stem + SUFFIX for stem in output_stems(inputs)] if inputs else []
    return SheetPlan(out, check_rule(rule), conditions, names, sources, typical, browser)


@dataclass
class Condition:
    """The image under one perturbation: its score and decision, and whether the decision is the clean one's."""

    spec: str
    score: float
    decision: str
    holds: bool


@dataclass
class Sheet:
    """One page's content."""

    path: Path
    name: str
    score: float | None
    decision: str | None
    error: str | None
    figures: list[dict[str, str]] = field(default_factory=list)
    conditions: list[Condition] = field(default_factory=list)
    regions: PhotoRegions | None = None  # None: no region source was given


def decide(score: float, threshold: float, attack_class: str) -> str:
    """predict's decision: the attack class at or above the threshold, else bona fide."""
    return attack_class if score >= threshold else BONA_FIDE


def _png(array: npt.NDArray[np.uint8] | Image.Image, *, smooth: bool = False) -> str:
    """An image as a data: URI, enlarged pixel for pixel (or smoothly) to DISPLAY_PX wide when small, shrunk to
    PHOTO_PX when large."""
    image = array if isinstance(array, Image.Image) else Image.fromarray(array)
    if image.width < DISPLAY_PX:
        factor = math.ceil(DISPLAY_PX / image.width)
        resample = Image.Resampling.BICUBIC if smooth else Image.Resampling.NEAREST
        image = image.resize((image.width * factor, image.height * factor), resample)
    elif max(image.size) > PHOTO_PX:
        image = image.copy()
        image.thumbnail((PHOTO_PX, PHOTO_PX), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return png_uri(buffer.getvalue())


def operating_point(threshold: Threshold, point: str | None, meta: CheckpointMeta) -> dict[str, Any]:
    """What the threshold means: a stored point's validation APCER and BPCER (with the counts they come from), or
    that a fixed number has no validation meaning."""
    stored = meta.operating_points or {}
    name = stored_point_name(point) if point is not None and threshold.source.startswith("stored") else None
    found = (stored.get("points") or {}).get(name or "", {}) if name else {}
    if not found or found.get("threshold") is None:
        return {"stored": False, "caveat": NOT_PROOF["fixed"]}
    return {"stored": True, "name": describe(name or "eer"), "apcer": percent(found.get("apcer")),
            "bpcer": percent(found.get("bpcer")), "split": stored.get("split", "val"),
            "epoch": stored.get("epoch", "?"), "n_bonafide": stored.get("n_bonafide", "?"),
            "n_morph": stored.get("n_morph", "?"), "caveat": NOT_PROOF["point"]}


def heatmaps(model: nn.Module, meta: CheckpointMeta, paths: Sequence[Path], rule: str, *, batch_size: int,
             device: torch.device, prepare: Prepare | None, sum_split: str = SUM_SPLITS[0],
             attention: str = DEFAULT_ATTENTION) -> list[tuple[npt.NDArray[np.uint8], np.ndarray]]:
    """Per image: the pixels the detector saw (H, W, 3) and the (H, W) relevance of the attack class under `rule`
    (what the sheet and the report's Errors section show)."""
    explainer = build_explainers(model, meta, [rule], {}, None, sum_split, attention)[rule]
    found: list[tuple[npt.NDArray[np.uint8], np.ndarray]] = []
    for x, _ in image_batches(paths, meta, batch_size, 0, device, prepare=prepare):
        relevance = explainer.explain(x, meta.attack_class).relevance.detach().cpu().sum(dim=1).numpy()
        found += list(zip(to_uint8(x, meta.mean, meta.std), relevance, strict=True))
    return found


def _figures(path: Path, seen: npt.NDArray[np.uint8], rmap: np.ndarray, meta: CheckpointMeta,
             prepare: Prepare | None) -> list[dict[str, str]]:
    size = meta.input_size
    photo = load_rgb(path)
    figures = [{"src": _png(photo, smooth=True), "alt": f"The photograph {path.name} as stored "
                f"({photo.width} x {photo.height} pixels).", "caption": f"The photograph ({photo.width} x "
                f"{photo.height} px)", "kind": "photo"}]
    if prepare is not None:
        figures.append({"src": _png(seen), "alt": f"The aligned face crop of {path.name}, at the {size} x {size} "
                        "pixels the detector saw.", "caption": f"The aligned crop the detector saw ({size} x {size} "
                        "px)", "kind": "photo"})
    return figures + heatmap_figures(seen, rmap, meta.attack_class)


def heatmap_figures(seen: npt.NDArray[np.uint8], rmap: np.ndarray, attack: str, *,
                    of: str = "the face") -> list[dict[str, str]]:
    """The relevance map `rmap` of the attack class as two inline PNGs (src, alt, caption, kind "heatmap"): over a
    grey copy of the image the detector saw, and alone, scaled to its own robust maximum and enlarged pixel for
    pixel; `of` names the image in the alt text."""
    limit = robust_scale(rmap)
    heat = heatmap_lut()[heatmap_index(rmap, limit)]
    return [
        {"src": _png(overlay_rgb(seen, rmap, limit=limit, heat=heat)), "alt": f"Relevance heatmap over a grey copy "
         f"of {of}: red where the detector's evidence for {attack} lies, blue where it speaks for {BONA_FIDE}.",
         "caption": "Heatmap over the face", "kind": "heatmap"},
        {"src": _png(heat), "alt": f"The relevance heatmap of {of} alone: red for {attack}, blue against, white "
         "none.", "caption": "The heatmap alone", "kind": "heatmap"},
    ]


def _perturbed(model: nn.Module, meta: CheckpointMeta, paths: Sequence[Path], clean: Sequence[float],
               perturbations: Sequence[Perturbation], threshold: float, *, batch_size: int, device: torch.device,
               prepare: Prepare | None) -> list[list[Condition]]:
    """Per image, its score and decision under each perturbation, scored as predict scores (one process)."""
    rows: list[list[Condition]] = [[] for _ in paths]
    for perturbation in perturbations:
        scored = score_files(model, meta, paths, batch_size=batch_size, device=device, ranks=Ranks(),
                             prepare=prepare, perturb=perturbation)
        for row, base, result in zip(rows, clean, scored, strict=True):
            if result.score is None:
                raise SmadlrpError(f"{result.path}: {result.error}")
            decision = decide(result.score, threshold, meta.attack_class)
            row.append(Condition(perturbation.spec, result.score, decision,
                                 decision == decide(base, threshold, meta.attack_class)))
    return rows


def build_sheets(model: nn.Module, meta: CheckpointMeta, results: Sequence[ImageScore], threshold: Threshold,
                 plan: SheetPlan, *, batch_size: int = 16, device: torch.device | None = None,
                 prepare: Prepare | None = None) -> list[Sheet]:
    """The content of every page: heatmaps and perturbed scores for the scored images, an error for the others."""
    device = device or next(model.parameters()).device
    names = output_stems([r.path for r in results])
    sheets = [Sheet(r.path, name, r.score, None if r.score is None else decide(r.score, threshold.value,
                                                                               meta.attack_class), r.error)
              for r, name in zip(results, names, strict=True)]
    scored = [s for s in sheets if s.score is not None]
    paths = [s.path for s in scored]
    if not scored:
        return sheets
    maps = heatmaps(model, meta, paths, plan.rule, batch_size=batch_size, device=device, prepare=prepare)
    rows = _perturbed(model, meta, paths, [s.score for s in scored if s.score is not None], plan.perturbations,
                      threshold.value, batch_size=batch_size, device=device, prepare=prepare)
    for sheet, (seen, rmap), conditions in zip(scored, maps, rows, strict=True):
        sheet.figures = _figures(sheet.path, seen, rmap, meta, prepare)
        sheet.conditions = conditions
    if plan.regions.active:
        _add_regions(model, meta, scored, maps, plan, batch_size=batch_size, device=device, prepare=prepare)
    return sheets


def _add_regions(model: nn.Module, meta: CheckpointMeta, scored: Sequence[Sheet],
                 maps: Sequence[tuple[npt.NDArray[np.uint8], np.ndarray]], plan: SheetPlan, *, batch_size: int,
                 device: torch.device, prepare: Prepare | None) -> None:
    """Each scored sheet's region table: its photo's region map, and the shares of the heatmap's relevance, or of a
    pass of their own under the typical shares' rule and settings; a photo without a map gets the reason."""
    regions = plan.regions
    rule = regions.rule(plan.rule)
    found = [sheet_regions.photo_ids(regions, s.path, meta.input_size, prepare) for s in scored]
    mapped = [i for i, (ids, _, _) in enumerate(found) if ids is not None]
    relevance = {i: maps[i][1] for i in mapped}
    if regions.recomputed(plan.rule) and mapped:
        typical = regions.typical
        again = heatmaps(model, meta, [scored[i].path for i in mapped], rule, batch_size=batch_size, device=device,
                         prepare=prepare, sum_split=typical.sum_split if typical else SUM_SPLITS[0],
                         attention=(typical.attention if typical else "") or DEFAULT_ATTENTION)
        relevance = {i: rmap for i, (_, rmap) in zip(mapped, again, strict=True)}
    for i, (sheet, (ids, file, reason)) in enumerate(zip(scored, found, strict=True)):
        sheet.regions = PhotoRegions(reason=reason, rule=rule, source=regions.source(prepare is not None),
                                     map_file=file)
        if ids is not None:
            sheet.regions.rows = sheet_regions.photo_regions(regions, relevance[i], ids)
            sheet.regions.figure = sheet_regions.map_figure(maps[i][0], ids, sheet.path.name, _png)


def render_sheet(sheet: Sheet, meta: CheckpointMeta, threshold: Threshold, plan: SheetPlan, *,
                 checkpoint: str = "", point: str | None = None, aligned: bool = False) -> str:
    """One page as HTML text."""
    return environment().get_template("sheet.html").render(
        title=f"Morph detection sheet: {sheet.path.name}", css=stylesheet(), sheet=sheet, meta=meta,
        attack=meta.attack_class, threshold=threshold, point=operating_point(threshold, point, meta),
        rule=plan.rule, checkpoint=checkpoint, aligned=aligned, not_proof=NOT_PROOF, bona_fide=BONA_FIDE,
        scale_text=colour_scale_text(meta.attack_class), regions_hint=sheet_regions.NEEDS_SOURCE,
        regions_not_proof=sheet_regions.NOT_PROOF, region_notes=plan.regions.notes(plan.rule),
        has_typical=plan.regions.typical is not None)


def write_sheets(model: nn.Module, meta: CheckpointMeta, results: Sequence[ImageScore], threshold: Threshold,
                 plan: SheetPlan, *, point: str | None = None, checkpoint: str = "", batch_size: int = 16,
                 device: torch.device | None = None, prepare: Prepare | None = None) -> list[Path]:
    """`predict --sheet`: write `NAME.sheet.html` into `plan.out` for every result (a page saying that the image
    could not be read for a failed one), atomically, and with a browser in the plan (`--pdf`) its print on A4,
    `NAME.sheet.pdf`; `point` is the `--threshold` text (a stored point's name gives its validation rates). Returns
    the pages' paths in the order of `results`, then the PDFs'."""
    sheets = build_sheets(model, meta, results, threshold, plan, batch_size=batch_size, device=device,
                          prepare=prepare)
    try:
        plan.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SmadlrpError(f"cannot create the --sheet folder {plan.out}: {exc.strerror or exc}") from None
    inputs = {r.path.resolve() for r in results}
    written = []
    for sheet in sheets:
        target = safe_output(plan.out, sheet.name + SUFFIX, inputs)
        write_text_atomic(target, render_sheet(sheet, meta, threshold, plan, checkpoint=checkpoint, point=point,
                                               aligned=prepare is not None))
        written.append(target)
    if plan.browser is not None:
        written += [print_pdf(page, page.with_name(page.name.removesuffix(SUFFIX) + PDF_SUFFIX), plan.browser)
                    for page in list(written)]
    return written

