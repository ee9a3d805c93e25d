"""Subject-disjoint splits of a folder of bona fide images and morphs, written as a protocol file.

A folder written by `smadlrp morph` (it holds morph.json and manifest.csv) is read through its manifest instead:
subjects from the identity columns, the species as the morph method, and the masks and region maps kept.

Layout: `FOLDER/<bonafide dir>/**` holds the bona fide images; every other folder directly below FOLDER holds the
morphs of one morphing method (its name is the `morph_method`), as FRLL-Morphs ships them. Subject ids come from
file names through a regular expression whose capture groups are the ids (a morph names every contributor).
Subjects, not images, are assigned to train/val/test with seeded ratios; a bona fide image follows its subject;
a morph goes where all of its contributors are, and a morph whose contributors fall into different splits is
dropped (and counted), so that no subject is ever seen in two splits.
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.data.loading import is_image_file, list_images
from smadlrp.data.manifest import read_manifest

SPLITS = ("train", "val", "test")
COLUMNS = ("path", "label", "split", "morph_method", "subjects")
MORPH_SET_COLUMNS = (*COLUMNS, "mask_path", "region_path")  # a morph set's protocol keeps its masks and maps
MORPH_SET_FILES = ("morph.json", "manifest.csv")
# name -> (bona fide regex, morph regex); FRLL: bona fide 001_03.jpg (subject 001, pose 03), morph 001_002.jpg
PRESETS: Mapping[str, tuple[str, str]] = {
    "frll": (r"^(\d+)_\d+\.", r"^(\d+)_(\d+)\."),
}


def parse_ratios(text: str) -> tuple[float, float, float]:
    """"0.7,0.15,0.15" -> train, val and test shares (non-negative, summing to 1)."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--ratios {text!r}: three numbers, e.g. 0.7,0.15,0.15") from None
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1.0) > 1e-6:
        raise UsageError(f"--ratios {text!r}: three non-negative shares for train,val,test that sum to 1")
    return values[0], values[1], values[2]


def compile_patterns(subject_regex: str, morph_regex: str | None) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """The bona fide and morph patterns: a preset name, or regular expressions with capture groups."""
    if subject_regex in PRESETS:
        bona, morph = PRESETS[subject_regex]
        morph = morph_regex or morph
    else:
        bona, morph = subject_regex, morph_regex or subject_regex
    patterns = []
    for option, text in (("--subject-regex", bona), ("--morph-regex", morph)):
        try:
            pattern = re.compile(text)
        except re.error as exc:
            raise UsageError(f"{option} {text!r}: not a regular expression ({exc})") from None
        if pattern.groups == 0:
            raise UsageError(f"{option} {text!r}: needs a capture group per subject id, e.g. ^(\\d+)_")
        patterns.append(pattern)
    return patterns[0], patterns[1]


def subject_ids(path: Path, pattern: re.Pattern[str]) -> tuple[str, ...]:
    """The subject ids a file name gives (its non-empty capture groups, unique, in order)."""
    match = pattern.search(path.name)
    if match is None:
        raise SmadlrpError(f"{path}: the file name does not match the subject pattern {pattern.pattern!r} "
                           "(set --subject-regex / --morph-regex)")
    return tuple(dict.fromkeys(group for group in match.groups() if group))


@dataclass(frozen=True)
class SplitPlan:
    """The protocol rows of a subject-disjoint split and what it left out.

    assignment: subject id -> split; dropped: morph method -> morphs dropped because their contributors fall
    into different splits.
    """

    rows: tuple[dict[str, str], ...]
    assignment: Mapping[str, str]
    dropped: Mapping[str, int]

    def counts(self) -> dict[str, dict[str, int]]:
        """Per split: subjects, bona fide images, morphs."""
        subjects = Counter(self.assignment.values())
        images = Counter((row["split"], row["label"]) for row in self.rows)
        return {split: {"subjects": subjects[split], "bonafide": images[split, "bonafide"],
                        "morph": images[split, "morph"]} for split in SPLITS}


def assign_subjects(subjects: Sequence[str], ratios: Sequence[float], seed: int) -> dict[str, str]:
    """Shuffle the sorted subjects with `seed` and cut them into train/val/test by `ratios` (rounded counts)."""
    order = sorted(set(subjects))
    random.Random(seed).shuffle(order)
    n_train = round(ratios[0] * len(order))
    n_val = round(ratios[1] * len(order))
    return {subject: SPLITS[0 if i < n_train else 1 if i < n_train + n_val else 2] for i, subject in
            enumerate(order)}


def plan_split(folder: Path, out: Path, *, bonafide_dir: str = "bonafide", subject_regex: str = "frll",
               morph_regex: str | None = None, ratios: Sequence[float] = (0.7, 0.15, 0.15),
               seed: int = 0) -> SplitPlan:
    """Split the images of `folder` subject-disjointly; row paths are relative to `out`'s folder."""
    if not folder.is_dir():
        raise SmadlrpError(f"data folder not found: {folder}")
    if all((folder / name).is_file() for name in MORPH_SET_FILES):
        return _assign(_morph_set_images(folder), out, ratios, seed)
    bona_pattern, morph_pattern = compile_patterns(subject_regex, morph_regex)
    bona_root = folder / bonafide_dir
    if not bona_root.is_dir():
        raise SmadlrpError(f"{folder}: no bona fide folder {bonafide_dir!r} (set --bonafide-dir)")
    methods = sorted(p for p in folder.iterdir() if p.is_dir() and p.name != bonafide_dir)
    if not methods:
        raise SmadlrpError(f"{folder}: no morph folders next to {bonafide_dir}/ (one folder per morphing method)")
    stray = sorted(p for p in folder.iterdir() if is_image_file(p))
    if stray:
        raise SmadlrpError(f"{stray[0]}: an image outside the bona fide and morph-method folders")
    images: list[Image] = []
    images += [Image(p, "bonafide", "", subject_ids(p, bona_pattern)) for p in list_images(bona_root)]
    for method_dir in methods:
        images += [Image(p, "morph", method_dir.name, subject_ids(p, morph_pattern)) for p in list_images(method_dir)]
    return _assign(images, out, ratios, seed, [m.name for m in methods])


@dataclass(frozen=True)
class Image:
    """One image to split: its file, label, morph method ("" for bona fide), subjects, and files that go with it
    (mask_path, region_path: paths relative to the data folder)."""

    path: Path
    label: str
    method: str
    subjects: tuple[str, ...]
    files: Mapping[str, Path] = field(default_factory=dict)


def _assign(images: Sequence[Image], out: Path, ratios: Sequence[float], seed: int,
            methods: Sequence[str] | None = None) -> SplitPlan:
    """Rows of `images` by a seeded subject assignment; a morph whose subjects fall into two splits is dropped."""
    assignment = assign_subjects([s for image in images for s in image.subjects], ratios, seed)
    base = out.resolve().parent
    rows: list[dict[str, str]] = []
    dropped: Counter[str] = Counter()
    for image in images:
        splits = {assignment[s] for s in image.subjects}
        if len(splits) > 1:
            dropped[image.method] += 1
            continue
        rows.append({"path": _relative(image.path, base), "label": image.label, "split": splits.pop(),
                     "morph_method": image.method, "subjects": ";".join(image.subjects),
                     **{name: _relative(path, base) for name, path in image.files.items()}})
    names = methods if methods is not None else sorted({i.method for i in images if i.method})
    return SplitPlan(tuple(rows), assignment, {m: dropped[m] for m in names})


def _relative(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path.resolve(), base)).as_posix()


def _morph_set_images(folder: Path) -> list[Image]:
    """The images of a morph set by its manifest: subjects from identity_a/identity_b, the species as method."""
    images = []
    for row in read_manifest(folder):
        subjects = tuple(s for s in (row.get("identity_a", ""), row.get("identity_b", "")) if s)
        if row.get("label") not in ("bonafide", "morph") or not subjects:
            raise SmadlrpError(f"{folder / 'manifest.csv'}: {row.get('path')!r} has no label or subject; is it "
                               "the manifest smadlrp morph wrote?")
        files = {name: folder / row[name] for name in ("mask_path", "region_path") if row.get(name)}
        images.append(Image(folder / row["path"], row["label"], row.get("morph_type", ""), subjects, files))
    return images
