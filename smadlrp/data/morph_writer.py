"""A morph set from bona fide photographs (`smadlrp morph`): aligned crops, landmark morphs, masks, manifests.

Output folder (written into a hidden staging folder beside it and renamed at the end):

    DIR/bonafide/<stem>.png                      every face, aligned into the common frame (the morphs' frame)
    DIR/morph/<species>/<stemA>__<stemB>.png     the morphs
    DIR/masks/<species>/<stemA>__<stemB>.png     their masks (8-bit blend weights, see data/morph.py)
    DIR/morph/self-blended/<stem>.png            pseudo-morphs of one face (data/selfblend.py), masks likewise
    DIR/regions/<image path>.png                 face-region maps of every image (68-point landmarks only)
    DIR/manifest.csv                             MANIFEST_COLUMNS, paths relative to DIR
    DIR/protocol.csv                             the same rows as a protocol (path,label,split + group columns)
    DIR/morph.json                               settings, landmark source and licence, counts, failures, morphs

Subjects are assigned to train/val/test by seeded ratios (data/split.py) and a morph is made only from two
subjects of one split. A stem is the image's path (relative to the input folder, or as the protocol lists it)
without its suffix, folders joined by `_`.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.core.fileio import encode_png, make_staging, remove_abandoned, replace_folder
from smadlrp.data.landmark_regions import self_blend, write_region_map
from smadlrp.data.landmarks import DLIB68, DLIB68_LICENCE, CsvLandmarks, Dlib68Landmarks, eye_centres, layout_name
from smadlrp.data.loading import list_images, load_rgb
from smadlrp.data.morph import (
    EYE_TEMPLATE,
    SEAMS,
    SPECIES,
    align_face,
    make_morph,
    mean_shape,
    to_uint8,
)
from smadlrp.data.morph_pairs import PAIRINGS, RULES, Pair, choose_pairs, possible_pairs, split_quotas
from smadlrp.data.protocol import protocol_csv, subjects_of
from smadlrp.data.selfblend import SELF_BLENDED
from smadlrp.data.split import SPLITS, assign_subjects, compile_patterns

SCHEMA = "smadlrp.morph/1"
MANIFEST_COLUMNS = ("path", "label", "split", "morph_type", "identity_a", "identity_b", "contributor_a",
                    "contributor_b", "alpha", "method", "mask_path", "region_path")
PROTOCOL_COLUMNS = ("path", "label", "split", "morph_type", "subjects", "alpha", "mask_path", "region_path")
ALL_SPECIES = (*SPECIES, SELF_BLENDED)
MASKS = {"complete": "255 inside the convex hull of the morph's face landmarks, 0 outside (outside it the two warped "
                     "pictures, hair, neck and backdrop, are blended too, but no face)",
         "splicing": "the blend weight of the pasted blended face: 255 = the blended face, 0 = contributor a warped "
                     "to the morph landmarks (feather: smoothstep over the feather width inside the face hull; "
                     "poisson: 255 inside the face hull)",
         SELF_BLENDED: "the blend weight of the transformed copy, 0 to 255 (0: the face itself, possibly "
                       "colour-changed as a whole); the region is the convex hull of the 68 landmarks (5 "
                       "landmarks: the face ellipse of data/selfblend.py)"}
_SEPARATORS = re.compile(r"[;+|\s]+")  # they separate subject ids in protocol columns


@dataclass(frozen=True)
class MorphSettings:
    """How morphs are made; validated on construction (UsageError, one line)."""

    species: tuple[str, ...] = SPECIES
    pairs: str = "random"
    count: int | None = None  # morphs per species; None: as many as each split has faces
    alphas: tuple[float, ...] = (0.5,)  # contributor b's share; several: used in turn, pair by pair
    size: int = 256
    seam: str = "feather"
    feather: float | None = None  # px; None: size / 32
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [s for s in self.species if s not in ALL_SPECIES]
        if bad or not self.species or len(set(self.species)) != len(self.species):
            raise UsageError(f"--species {','.join(self.species)}: a list of {', '.join(ALL_SPECIES)}")
        if self.pairs not in PAIRINGS:
            raise UsageError(f"--pairs {self.pairs!r}: choose {' or '.join(PAIRINGS)}")
        if self.seam not in SEAMS:
            raise UsageError(f"--seam {self.seam!r}: choose {' or '.join(SEAMS)}")
        if not self.alphas or not all(0 < a < 1 for a in self.alphas):
            raise UsageError(f"--alpha {','.join(f'{a:g}' for a in self.alphas)}: shares strictly between 0 and 1")
        if not 32 <= self.size <= 4096 or (self.count is not None and self.count < 1) or \
                (self.feather is not None and not 0 <= self.feather <= self.size / 4):
            raise UsageError(f"--size {self.size} (32 to 4096 px), --count {self.count} (>= 1) or --feather "
                             f"{self.feather} (0 to a quarter of the size) out of range")

    @property
    def pairwise(self) -> tuple[str, ...]:
        """The species made of two faces."""
        return tuple(s for s in self.species if s in SPECIES)

    @property
    def feather_px(self) -> float:
        return self.size / 32 if self.feather is None else self.feather

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "feather": self.feather_px}


def parse_species(text: str) -> tuple[str, ...]:
    """"complete,splicing" -> ("complete", "splicing")."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_alphas(text: str) -> tuple[float, ...]:
    """"0.5" or "0.4,0.5,0.6" -> contributor b's shares."""
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--alpha {text!r}: one share or a list, e.g. 0.5 or 0.4,0.5,0.6") from None


@dataclass(frozen=True)
class BonaFide:
    """An input photograph: its file, how the report shows it, its subject and its output stem."""

    path: Path
    name: str
    subject: str
    stem: str

    @property
    def crop(self) -> str:
        return f"bonafide/{self.stem}.png"


@dataclass
class Face:
    """An acquired face: its input, split, landmarks in the output frame and (look-alike pairing) embedding."""

    source: BonaFide
    split: str
    points: NDArray[np.float64]
    embedding: NDArray[np.float64] | None = None


class MorphProgress:
    """Progress callbacks of `make_morph_set` (no-ops; the CLI shows a bar)."""

    def start(self, stage: str, total: int) -> None:
        """A stage (`faces`, `embedding`, `morphs`) begins with `total` steps."""

    def step(self, failure: tuple[str, str] | None = None) -> None:
        """One step done; `failure` = (image, reason) for a failure to acquire."""


@dataclass
class MorphReport:
    """What was written: the manifest rows, per split the counts, the failures, and morph.json's document."""

    rows: list[dict[str, str]]
    counts: dict[str, dict[str, Any]]
    failures: list[dict[str, str]]
    document: dict[str, Any] = field(default_factory=dict)


def _stem(relative: str) -> str:
    parts = [p for p in Path(relative).with_suffix("").parts if p not in ("", "..", ".", "/")]
    return "_".join(parts).replace("\\", "_") or "image"


def read_inputs(source: Path, subject_regex: str | None = None, bonafide_label: str = "bonafide") -> list[BonaFide]:
    """The bona fide images of a folder (recursively) or of a protocol CSV (its rows labelled `bonafide_label`, or
    every row without a label column). Subject: the protocol's subject column, else the capture group of
    `subject_regex` on the file name, else the file itself."""
    pattern = None
    if subject_regex is not None:
        pattern = compile_patterns(subject_regex, None)[0]
        if pattern.groups != 1:
            raise UsageError(f"--subject-regex {subject_regex!r}: needs exactly one capture group (the subject id)")
    if source.is_dir():
        found = [(p, p.relative_to(source).as_posix(), "") for p in list_images(source)]
    elif source.is_file():
        found = _protocol_images(source, bonafide_label)
    else:
        raise SmadlrpError(f"no such file or folder: {source}")
    inputs: list[BonaFide] = []
    for path, name, listed in found:
        match = pattern.search(path.name) if pattern is not None and not listed else None
        if pattern is not None and not listed and (match is None or not match.group(1)):
            raise SmadlrpError(f"{name}: the file name does not match --subject-regex {pattern.pattern!r}")
        subject = listed or (match.group(1) if match is not None else _stem(name))
        inputs.append(BonaFide(path, name, _SEPARATORS.sub("_", subject), _stem(name)))
    stems: dict[str, str] = {}
    for item in inputs:
        if item.stem in stems:
            raise SmadlrpError(f"{stems[item.stem]} and {item.name} would both be written as {item.crop}; rename "
                               "one of them")
        stems[item.stem] = item.name
    return inputs


def _protocol_images(file: Path, bonafide_label: str) -> list[tuple[Path, str, str]]:
    from smadlrp.data.align import protocol_jobs

    jobs, rows, columns = protocol_jobs(file)
    found = []
    for job, row in zip(jobs, rows, strict=True):
        if "label" in columns and row.get("label", "") != bonafide_label:
            continue
        subjects = subjects_of(row)
        if len(subjects) > 1:
            raise SmadlrpError(f"{file}: the bona fide row of {job.name} names {len(subjects)} subjects")
        found.append((job.source, job.name, subjects[0] if subjects else ""))
    return found


def check_output(source: Path, out: Path) -> None:
    """UsageError unless `out` is absent or an empty folder, outside the input folder (a later run would read the
    crops and morphs as inputs)."""
    folder, resolved = source.resolve(), out.resolve()
    if source.is_dir() and (resolved == folder or folder in resolved.parents):
        raise UsageError(f"--out {out} lies inside the input {folder}: choose an output folder outside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} exists and is not an empty folder: choose another output folder")


def _check_pairs_possible(inputs: Sequence[BonaFide], assignment: dict[str, str], ratios: Sequence[float]) -> None:
    if len(inputs) < 2:
        raise SmadlrpError(f"a morph needs two bona fide images; found {len(inputs)}"
                           + (f" ({inputs[0].name})" if inputs else ""))
    if len({item.subject for item in inputs}) < 2:
        raise SmadlrpError(f"all {len(inputs)} images show one subject ({inputs[0].subject}): a morph needs two")
    if all(possible_pairs([i.subject for i in inputs if assignment[i.subject] == s]) == 0 for s in SPLITS):
        raise SmadlrpError(f"no split holds two subjects with --ratios {','.join(f'{r:g}' for r in ratios)} "
                           f"({len(assignment)} subjects): no morph can be made (e.g. --ratios 0,0,1)")


def _acquire(inputs: Sequence[BonaFide], landmarks: Dlib68Landmarks | CsvLandmarks, settings: MorphSettings,
             assignment: dict[str, str], staging: Path, progress: MorphProgress
             ) -> tuple[list[Face], list[dict[str, str]], dict[str, str]]:
    """Find, align and write every face and its region map (failures to acquire are recorded, not raised)."""
    regions: dict[str, str] = {}
    template = None
    if isinstance(landmarks, CsvLandmarks) and landmarks.points not in (5, 68):  # unknown layout: align all
        shapes = [landmarks.lookup(i.name, i.path)[0] for i in inputs]  # landmarks onto the set's mean shape
        known = [s for s in shapes if s is not None]
        template = mean_shape(known, settings.size) if known else None
    faces: list[Face] = []
    failures: list[dict[str, str]] = []
    progress.start("faces", len(inputs))
    for item in inputs:
        try:
            image = load_rgb(item.path)
            points, reason = landmarks.locate(image, item.name, item.path)
        except SmadlrpError as exc:
            points, reason = None, exc.message
        if points is None:
            failures.append({"image": item.name, "reason": reason, "split": assignment[item.subject]})
            progress.step((item.name, reason))
            continue
        crop, aligned = align_face(image, points, settings.size, eyes=eye_centres(points), template=template)
        (staging / item.crop).write_bytes(encode_png(to_uint8(crop)))
        faces.append(Face(item, assignment[item.subject], aligned))
        regions[item.crop] = write_region_map(staging, item.crop, aligned)
        progress.step()
    return faces, failures, regions


def _embed(faces: Sequence[Face], staging: Path, progress: MorphProgress) -> list[str]:
    """Embed every aligned crop with dlib's recogniser (look-alike pairs); the names it finds no face in."""
    from smadlrp.data.recognition import FaceRecogniser

    recogniser = FaceRecogniser()
    missing = []
    progress.start("embedding", len(faces))
    for face in faces:
        with Image.open(staging / face.source.crop) as crop:
            face.embedding = recogniser.embed(crop.convert("RGB"))
        if face.embedding is None:
            missing.append(face.source.name)
        progress.step()
    return missing


def _read(path: Path) -> NDArray[np.float32]:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _morph_rows(pairs: Sequence[tuple[Face, Face, Pair, float]], settings: MorphSettings, method: str,
                staging: Path, progress: MorphProgress) -> list[dict[str, str]]:
    rows = []
    progress.start("morphs", len(pairs) * len(settings.pairwise))
    for a, b, _, alpha in pairs:
        image_a, image_b = _read(staging / a.source.crop), _read(staging / b.source.crop)
        for species in settings.pairwise:
            morph = make_morph(image_a, image_b, a.points, b.points, alpha, species, seam=settings.seam,
                               feather=settings.feather_px)
            name = f"{species}/{a.source.stem}__{b.source.stem}.png"
            (staging / "morph" / name).write_bytes(encode_png(to_uint8(morph.image)))
            (staging / "masks" / name).write_bytes(encode_png(morph.mask))
            seam = "feather" if species == "splicing" and settings.seam == "feather" else \
                "poisson" if species == "splicing" else "blend"
            rows.append({"path": f"morph/{name}", "label": "morph", "split": a.split, "morph_type": species,
                         "identity_a": a.source.subject, "identity_b": b.source.subject,
                         "contributor_a": a.source.crop, "contributor_b": b.source.crop, "alpha": f"{alpha:g}",
                         "method": f"{method}/{seam}", "mask_path": f"masks/{name}",
                         "region_path": write_region_map(staging, f"morph/{name}", morph.geometry.points_m[
                             :morph.geometry.faces])})
            progress.step()
    return rows


def _self_blended_rows(faces: Sequence[Face], settings: MorphSettings, staging: Path,
                       progress: MorphProgress) -> list[dict[str, str]]:
    """One seeded pseudo-morph per face (at most `count` per split), blended inside its landmarks' hull."""
    rows: list[dict[str, str]] = []
    chosen = [f for s in SPLITS for f in [f for f in faces if f.split == s][:settings.count]]
    progress.start(SELF_BLENDED, len(chosen))
    for n, face in enumerate(chosen):
        with Image.open(staging / face.source.crop) as crop:
            pixels = np.asarray(crop.convert("RGB"))
        image, weight = self_blend(pixels, face.points, np.random.default_rng([settings.seed, n]))
        name = f"{SELF_BLENDED}/{face.source.stem}.png"
        (staging / "morph" / name).write_bytes(encode_png(image))
        (staging / "masks" / name).write_bytes(encode_png(np.rint(weight * 255).astype(np.uint8)))
        rows.append({"path": f"morph/{name}", "label": "morph", "split": face.split, "morph_type": SELF_BLENDED,
                     "identity_a": face.source.subject, "contributor_a": face.source.crop,
                     "method": "self-blended/selfmad", "mask_path": f"masks/{name}",
                     "region_path": write_region_map(staging, f"morph/{name}", face.points)})
        progress.step()
    return rows


def _choose(faces: Sequence[Face], settings: MorphSettings) -> list[tuple[Face, Face, Pair, float]]:
    by_split = {s: [f for f in faces if f.split == s] for s in SPLITS}
    subjects = {s: [f.source.subject for f in group] for s, group in by_split.items()}
    quotas = split_quotas({s: len(g) for s, g in by_split.items()},
                          {s: possible_pairs(subjects[s]) for s in SPLITS}, settings.count)
    chosen = []
    for split, group in by_split.items():
        rng = random.Random(f"smadlrp-morph-pairs/{settings.seed}/{split}")
        embeddings = [f.embedding for f in group] if settings.pairs == "similar" else None
        chosen += [(group[p.a], group[p.b], p) for p in choose_pairs(settings.pairs, subjects[split], embeddings,
                                                                      quotas[split], rng)]
    return [(a, b, p, settings.alphas[n % len(settings.alphas)]) for n, (a, b, p) in enumerate(chosen)]


def _counts(inputs: Sequence[BonaFide], assignment: dict[str, str], faces: Sequence[Face],
            failures: Sequence[dict[str, str]], rows: Sequence[dict[str, str]],
            species: Sequence[str]) -> dict[str, dict[str, Any]]:
    morphs = Counter((r["split"], r["morph_type"]) for r in rows)
    return {s: {"subjects": len({i.subject for i in inputs if assignment[i.subject] == s}),
                "bonafide": sum(f.split == s for f in faces), "morph": {t: morphs[s, t] for t in species},
                "fta": sum(f["split"] == s for f in failures)} for s in SPLITS}


def make_morph_set(source: Path, out: Path, landmarks: Dlib68Landmarks | CsvLandmarks, settings: MorphSettings, *,
                   subject_regex: str | None = None, bonafide_label: str = "bonafide",
                   progress: MorphProgress | None = None) -> MorphReport:
    """Write the morph set of the bona fide images of `source` (a folder or a protocol CSV) into `out` (absent or
    empty). SmadlrpError (one line) when no morph can be made: fewer than two images or subjects, no split with
    two subjects, or fewer than two faces acquired in every split."""
    progress = progress or MorphProgress()
    started = time.perf_counter()
    check_output(source, out)
    inputs = read_inputs(source, subject_regex, bonafide_label)
    assignment = assign_subjects([i.subject for i in inputs], settings.ratios, settings.seed)
    if settings.pairwise:
        _check_pairs_possible(inputs, assignment, settings.ratios)
    remove_abandoned(out)
    staging = make_staging(out, ["bonafide", *(f"{top}/{s}" for top in ("morph", "masks") for s in settings.species)])
    try:
        faces, failures, regions = _acquire(inputs, landmarks, settings, assignment, staging, progress)
        if not faces:
            raise SmadlrpError(f"no face found in any of the {len(inputs)} images ({len(failures)} failures to "
                               "acquire)")
        if settings.pairwise and not any(possible_pairs([f.source.subject for f in faces if f.split == s])
                                         for s in SPLITS):
            raise SmadlrpError(f"no morph can be made: faces found in {len(faces)} of {len(inputs)} images "
                               f"({len(failures)} failures to acquire), and no split holds faces of two subjects")
        unembedded = _embed(faces, staging, progress) if settings.pairs == "similar" and settings.pairwise else []
        chosen = _choose(faces, settings) if settings.pairwise else []
        method = f"landmark-delaunay/{DLIB68 if landmarks.name == DLIB68 else f'csv{landmarks.points}'}"
        rows = [{"path": f.source.crop, "label": "bonafide", "split": f.split, "identity_a": f.source.subject,
                 "region_path": regions[f.source.crop]} for f in faces]
        rows += _morph_rows(chosen, settings, method, staging, progress)
        if SELF_BLENDED in settings.species:
            rows += _self_blended_rows(faces, settings, staging, progress)
        rows = [{c: row.get(c, "") for c in MANIFEST_COLUMNS} for row in rows]
        counts = _counts(inputs, assignment, faces, failures, rows, settings.species)
        document = _document(source, landmarks, settings, subject_regex, counts, failures, unembedded, rows,
                             chosen, time.perf_counter() - started)
        _write_tables(staging, rows, document)
        check_output(source, out)  # again: the folder may have changed meanwhile
        replace_folder(out, staging, "the morph set")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return MorphReport(rows, counts, failures, document)


def protocol_rows(rows: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Manifest rows as protocol rows (PROTOCOL_COLUMNS; `subjects` = `a;b` for a morph)."""
    return [{**row, "subjects": ";".join(s for s in (row["identity_a"], row["identity_b"]) if s)} for row in rows]


def _write_tables(folder: Path, rows: Sequence[dict[str, str]], document: dict[str, Any]) -> None:
    (folder / "manifest.csv").write_text(protocol_csv(rows, MANIFEST_COLUMNS), encoding="utf-8")
    (folder / "protocol.csv").write_text(protocol_csv(protocol_rows(rows), PROTOCOL_COLUMNS), encoding="utf-8")
    (folder / "morph.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def _document(source: Path, landmarks: Dlib68Landmarks | CsvLandmarks, settings: MorphSettings,
              subject_regex: str | None, counts: dict[str, dict[str, Any]], failures: Sequence[dict[str, str]],
              unembedded: Sequence[str], rows: Sequence[dict[str, str]],
              chosen: Sequence[tuple[Face, Face, Pair, float]], seconds: float) -> dict[str, Any]:
    images = sum(c["bonafide"] + c["fta"] for c in counts.values())
    eyes = (np.array(EYE_TEMPLATE) * (settings.size - 1)).round(2).tolist()
    described = landmarks.describe()
    alignment = (f"similarity transform of the eye centres onto {eyes} px" if landmarks.points in (5, 68) else
                 f"least-squares similarity transform of the {layout_name(landmarks.points)} onto their "
                 "Procrustes mean shape")
    doc: dict[str, Any] = {
        "schema": SCHEMA, "source": str(source),
        "settings": {**settings.as_dict(), "subject_regex": subject_regex, "pair_rule": RULES[settings.pairs]},
        "landmarks": described, "alignment": alignment, "masks": MASKS,
        "counts": {"images": images, "faces": images - len(failures), "fta": len(failures),
                   "fta_rate": len(failures) / images if images else None, "per_split": counts},
        "failures": list(failures), "seconds": round(seconds, 2),
        "morphs": [row for row in rows if row["label"] == "morph"],
        "pairs": [{"contributor_a": a.source.crop, "contributor_b": b.source.crop, "split": a.split,
                   "alpha": alpha, "distance": pair.distance} for a, b, pair, alpha in chosen],
    }
    if described["source"] == DLIB68:
        doc["licence"] = f"landmarks by dlib68: {DLIB68_LICENCE}"
    if settings.pairs == "similar":
        from smadlrp.data.recognition import RECOGNITION_MODEL
        doc["recogniser"] = {"model": RECOGNITION_MODEL, "no_face_in_crop": list(unembedded)}
    return doc
