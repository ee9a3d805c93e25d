"""Region shares on an examiner sheet: per face region, the photo's share of positive relevance beside the detector's
typical share on bona fide images (a `regions --json` of the same checkpoint) and the region's area share.

The share is the one `smadlrp regions` computes (explain.regions): the positive relevance (R+) of the attack class
inside a region over all positive relevance of the image. The photo's region map comes from its 68 landmarks
(`--landmarks dlib68` or a CSV, turned into a map by data.landmark_regions) or from a folder of region maps
(`--regions FOLDER`, the format of docs/regions.md). `region_plan` checks the options before any work,
`check_typical` the typical shares against the loaded detector, `photo_regions` does one photo.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from torch import nn

from smadlrp.core.errors import SmadlrpError, UsageError, shorten
from smadlrp.data.landmark_regions import region_map
from smadlrp.data.landmarks import DLIB68_LICENCE, CsvLandmarks, Dlib68Landmarks, landmark_source
from smadlrp.data.loading import Prepare, load_rgb
from smadlrp.data.regions import REGIONS, read_region_map, resize_region_map
from smadlrp.detector.checkpoint import CheckpointMeta
from smadlrp.explain.regions import region_sums
from smadlrp.explain.run import pattern_rules
from smadlrp.lrp import method_names
from smadlrp.lrp.composites import DEFAULT_ATTENTION, SUM_SPLITS
from smadlrp.lrp.fitted_patterns import weights_fingerprint
from smadlrp.report.collect import json_kind, read_json
from smadlrp.report.numbers import MISSING, share

NEEDS_SOURCE = ("Region shares need landmarks or region maps: add --landmarks dlib68 (or a CSV of 68 landmarks per "
                "image) or --regions FOLDER (region maps, docs/regions.md) to predict --sheet.")
NOT_PROOF = ("A share far from the typical one says that the detector used this face differently from the bona fide "
             "photos it was measured on, not that the region was manipulated; a share close to it does not show "
             "that the photo is bona fide. The typical shares are means over other faces, taken and cropped as that "
             "split was, and region maps of another kind (drawn maps against landmarks) shift every share.")
# One colour per region id (REGIONS order), for the region map figure and the table's swatches.
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
MAP_ALPHA = 0.5


@dataclass(frozen=True)
class Typical:
    """The bona fide row of a `regions --json` file: its mean R+ share per region, and what it was made from."""

    file: Path
    checkpoint: str
    fingerprint: str | None
    rule: str
    sum_split: str
    attention: str
    split: str
    data: str
    images: int
    positive: dict[str, float | None]

    def describe(self) -> str:
        return (f"the bona fide row of {self.file.name}: the mean over {self.images} bona fide images of the "
                f"{self.split} split of {self.data}, rule {self.rule}")


def read_typical(file: Path, meta_class_names: list[str], attack: str) -> Typical:
    """The typical shares of `file`; SmadlrpError (one line) when it is no `regions --json` output, explains another
    class than the attack class, or has no bona fide row."""
    doc = read_json(file)
    if json_kind(doc) != "regions":
        raise UsageError(f"--typical {file}: not a `smadlrp regions --json` file")
    if doc.get("target") != attack:
        raise UsageError(f"--typical {file}: its shares are of the relevance for {doc.get('target')!r}; the sheet "
                         f"explains {attack!r} (run `smadlrp regions` without --target)")
    bona_fide = [name for name in meta_class_names if name != attack]
    rows = [row for row in doc["rows"] if isinstance(row, dict) and row.get("class") in bona_fide
            and not row.get("group")]
    if not rows or not isinstance(rows[0].get("positive"), dict):
        raise SmadlrpError(f"--typical {file}: no {' or '.join(bona_fide)} row (run `smadlrp regions` on a split "
                           "with bona fide images)")
    return Typical(file, str(doc.get("checkpoint", "")), doc.get("weights_fingerprint"), str(doc.get("rule")),
                   str(doc.get("sum_split", "z")), str(doc.get("attention", "")), str(doc.get("split", "?")),
                   str(doc.get("data", "?")), int(rows[0].get("images") or 0), dict(rows[0]["positive"]))


def check_typical(typical: Typical, model: nn.Module, checkpoint: Path) -> None:
    """SmadlrpError (one line) unless `typical` was made with this checkpoint: the same weights fingerprint, or, for a
    file that records none, the same checkpoint file."""
    rerun = f"run `smadlrp regions --checkpoint {checkpoint} --json FILE`"
    recorded = shorten(typical.checkpoint, 80)
    if typical.fingerprint is not None:
        if typical.fingerprint != weights_fingerprint(model.state_dict()):
            raise SmadlrpError(f"--typical {typical.file} was made with other weights than {checkpoint} (its "
                               f"checkpoint: {recorded}; the weights fingerprints differ): {rerun}")
    elif not typical.checkpoint or Path(typical.checkpoint).resolve() != checkpoint.resolve():
        raise SmadlrpError(f"--typical {typical.file} was made with another checkpoint ({recorded or 'not named'}), "
                           f"not {checkpoint}: {rerun}")


def usable_rule(rule: str) -> bool:
    """Whether the sheet can compute a rule's relevance without more input (a known rule without patterns)."""
    return rule in method_names() and rule not in pattern_rules()


@dataclass(frozen=True)
class RegionPlan:
    """Where the photos' region maps come from (landmarks or a folder; neither: no shares) and the typical shares."""

    landmarks: Dlib68Landmarks | CsvLandmarks | None = None
    folder: Path | None = None
    typical: Typical | None = None

    @property
    def active(self) -> bool:
        return self.landmarks is not None or self.folder is not None

    def recomputed(self, sheet_rule: str) -> bool:
        """Whether the shares need a relevance pass of their own (another rule or relevance setting than the
        heatmap's)."""
        typical = self.typical
        return self.rule(sheet_rule) != sheet_rule or typical is not None and (
            typical.sum_split, typical.attention or DEFAULT_ATTENTION) != (SUM_SPLITS[0], DEFAULT_ATTENTION)

    def notes(self, sheet_rule: str) -> list[str]:
        """What the two share columns were computed with, in words, for the page."""
        rule = self.rule(sheet_rule)
        heatmap = f" (the heatmap above uses {sheet_rule})" if rule != sheet_rule else ""
        typical = self.typical
        if typical is None:
            return [f"This photo's shares use rule {rule}. --typical FILE (the `smadlrp regions --json` output of "
                    "this detector) adds its typical shares on bona fide images."]
        checked = "the same weights fingerprint" if typical.fingerprint else "the same checkpoint file"
        lines = [f"Typical: {typical.describe()}, made with this detector ({checked})."]
        if usable_rule(typical.rule):
            lines.append(f"Both columns use rule {rule}{heatmap}.")
        else:
            lines.append(f"The typical shares use rule {typical.rule}, which the sheet cannot compute (it needs "
                         f"fitted patterns); this photo's shares use {rule}: the two columns come from different "
                         "rules.")
        return lines

    def rule(self, sheet_rule: str) -> str:
        """The rule of the photo's shares: the typical shares' rule where the sheet can compute it, else the
        heatmap's."""
        return self.typical.rule if self.typical is not None and usable_rule(self.typical.rule) else sheet_rule

    def source(self, aligned: bool) -> str:
        """Where the map comes from, in words (with the landmark model's licence)."""
        if isinstance(self.landmarks, Dlib68Landmarks):
            where = "the aligned crop" if aligned else "the photograph"
            return (f"68 landmarks that dlib's shape_predictor_68_face_landmarks.dat found on {where} (licence: "
                    f"{DLIB68_LICENCE}), turned into regions by smadlrp's landmark polygons; they draw no hair region")
        if isinstance(self.landmarks, CsvLandmarks):
            return (f"the 68 landmarks of {self.landmarks.file.name}, turned into regions by smadlrp's landmark "
                    "polygons; they draw no hair region")
        return f"the region map in {self.folder}"


def region_plan(landmarks: str | None, regions: Path | None, *, aligned: bool) -> RegionPlan:
    """Check the region options before any work (UsageError, exit code 2): one source at most, a folder that is one,
    a landmark CSV of 68 points; `--align` takes landmarks found on the crop only (maps and a CSV are of the stored
    photos). The typical shares are read later (`with_typical`), once the detector's classes are known."""
    if landmarks is not None and regions is not None:
        raise UsageError("--landmarks and --regions are two sources of region maps: give one")
    if regions is not None:
        if not regions.is_dir():
            raise UsageError(f"--regions {regions}: no such folder")
        if aligned:
            raise UsageError("--regions maps are of the stored photos, which --align crops: use --landmarks dlib68 "
                             "(found on the aligned crop) or drop --align")
        return RegionPlan(folder=regions)
    if landmarks is None:
        return RegionPlan()
    finder = landmark_source(landmarks)
    if isinstance(finder, CsvLandmarks):
        if aligned:
            raise UsageError(f"--landmarks {landmarks}: the points are in the stored photos' pixels, which --align "
                             "crops: use --landmarks dlib68 or drop --align")
        if finder.points != 68:
            raise UsageError(f"--landmarks {landmarks}: region maps need 68 landmarks per image (iBUG 300-W), the "
                             f"file has {finder.points}")
    return RegionPlan(landmarks=finder)


def with_typical(plan: RegionPlan, typical: Path | None, meta: CheckpointMeta) -> RegionPlan:
    """The plan with the typical shares of `typical` read (None: without)."""
    if typical is None:
        return plan
    return RegionPlan(plan.landmarks, plan.folder, read_typical(typical, list(meta.class_names), meta.attack_class))


def map_file(folder: Path, image: Path) -> Path | None:
    """The region map of `image` in `folder`: `folder/<the image's last N path parts>.png` for the largest N that
    exists, so that both a data set's layout (`regions/test/morph/x.png` for `DATA/test/morph/x.png`) and a flat
    folder (`regions/x.png`) work; None when there is none."""
    parts = image.resolve().parts[1:]
    for n in range(len(parts), 0, -1):
        candidate = folder.joinpath(*parts[-n:]).with_suffix(".png")
        if candidate.is_file():
            return candidate
    return None


@dataclass
class PhotoRegions:
    """One photo's region table (or why it has none): per region its colour, the photo's R+ share, the typical
    share and the area share, as text; the map figure; the rules and sources in words."""

    rows: list[dict[str, str]] = field(default_factory=list)
    reason: str = ""
    figure: dict[str, str] | None = None
    rule: str = ""
    source: str = ""
    map_file: str = ""


def photo_ids(plan: RegionPlan, path: Path, size: int, prepare: Prepare | None) -> tuple[npt.NDArray[np.uint8] | None,
                                                                                         str, str]:
    """The (size, size) region ids of the image the detector saw, the map file read ("" for landmarks), and why
    there are none ("" when there are)."""
    try:
        photo = load_rgb(path)
        if plan.folder is not None:
            found = map_file(plan.folder, path)
            if found is None:
                return None, "", f"no region map for {path.name} in {plan.folder}"
            return resize_region_map(read_region_map(found, photo.size), size), str(found), ""
        assert plan.landmarks is not None
        image = prepare(photo) if prepare is not None else photo
        points, reason = plan.landmarks.locate(image, str(path), path)
        if points is None:
            return None, "", f"no landmarks for {path.name}: {reason}"
        return resize_region_map(region_map(points, image.height, image.width), size), "", ""
    except SmadlrpError as exc:
        return None, "", exc.message


def map_figure(seen: npt.NDArray[np.uint8], ids: npt.NDArray[np.uint8], name: str,
               png: Callable[[npt.NDArray[np.uint8]], str]) -> dict[str, str]:
    """The region map over a grey copy of the image the detector saw, as the sheet shows it."""
    grey = seen.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    palette = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in COLOURS], dtype=np.float32)
    blended = (1 - MAP_ALPHA) * grey[..., None] + MAP_ALPHA * palette[ids]
    return {"src": png(np.clip(blended + 0.5, 0, 255).astype(np.uint8)), "kind": "regions",
            "alt": f"The face regions of {name} over a grey copy of the image the detector saw, each region in the "
                   "colour of its row in the table.", "caption": "The face regions"}


def photo_regions(plan: RegionPlan, rmap: npt.NDArray[Any], ids: npt.NDArray[np.uint8]) -> list[dict[str, str]]:
    """The table rows of one photo: every region with pixels in its map or a typical share above zero, in REGIONS
    order; the photo's share is "—" where its map has no pixels of the region."""
    sums = region_sums(np.asarray(rmap, dtype=np.float32)[None], ids[None])
    positive, area = sums.positive[0], sums.area[0]
    total = positive.sum()
    photo = positive / total if total > 0 else np.full(len(REGIONS), np.nan)
    typical = plan.typical.positive if plan.typical is not None else {}
    rows = []
    for i, region in enumerate(REGIONS):
        if area[i] == 0 and not (typical.get(region) or 0) > 0:
            continue
        rows.append({"region": region, "colour": COLOURS[i], "photo": share(photo[i]) if area[i] else MISSING,
                     "typical": share(typical.get(region)) if plan.typical is not None else "",
                     "area": share(area[i] / area.sum())})
    return rows
