"""A morph folder as `smadlrp morph` writes it, read for a vulnerability test: each morph with its contributors,
their probe images and its species, and the bona fide images with their identities.

`MORPHS/manifest.csv` has the columns path,label,split,morph_type,identity_a,identity_b,contributor_a,
contributor_b,alpha,method,mask_path. Morph rows (label `morph`): `path` is the morph, `contributor_a/_b` the bona
fide images it was made from (paths relative to MORPHS), `identity_a/_b` their subject ids, `morph_type` its species.
Bona fide rows (label `bonafide`): `path` is a face image of the subject `identity_a`.

The probes of a contributor are the bona fide images of its identity (MORPHS' bona fide rows, or the bona fide rows
of a probe protocol) other than the very image the morph was made from; when there is no other, that image itself
is the probe (the same-sample setting, friendlier to the attacker than ISO/IEC 20059's different probe samples).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from smadlrp.core.errors import SmadlrpError, shown
from smadlrp.data.embeddings import image_key
from smadlrp.data.manifest import MANIFEST
from smadlrp.data.protocol import BONAFIDE, read_protocol, subjects_of
from smadlrp.data.selfblend import SELF_BLENDED

MORPH_COLUMNS = ("path", "label", "morph_type", "identity_a", "identity_b", "contributor_a", "contributor_b")
LABELS = ("bonafide", "morph")
UNSPECIFIED = "unspecified"  # the species of a morph row with an empty morph_type


@dataclass(frozen=True)
class FaceImage:
    """One image: `key` is its path as its list writes it (relative to MORPHS, or to the probe protocol's folder),
    `path` where it is on disk, `identity` its subject id ("" for a morph)."""

    key: str
    path: Path
    identity: str


@dataclass(frozen=True)
class Contributor:
    """A subject of a morph: the image the morph was made from and the probe images it is compared with (in list
    order: probe j is attempt j); `same_sample` when the only probe is that very image."""

    source: FaceImage
    probes: tuple[FaceImage, ...]
    same_sample: bool


@dataclass(frozen=True)
class MorphEntry:
    """A morph of the manifest (its line number, the header being line 1), its species and contributors."""

    image: FaceImage
    species: str
    contributors: tuple[Contributor, ...]
    line: int


@dataclass(frozen=True)
class MorphSet:
    """A morph folder read for a vulnerability test: the morphs, and the bona fide images (MORPHS' own and the probe
    protocol's) that the non-mated and mated pairs of the FMR/FNMR are made of."""

    folder: Path
    morphs: tuple[MorphEntry, ...]
    bonafide: tuple[FaceImage, ...]
    probes_source: str  # "the manifest" or the probe protocol's path
    single: tuple[str, ...] = ()  # pseudo-morphs of one face (self-blended) in the manifest, left out


def _manifest_rows(folder: Path) -> list[tuple[int, dict[str, str]]]:
    """(line, row) of MORPHS/manifest.csv, values stripped; SmadlrpError when it is absent, unreadable or misses a
    column."""
    file = folder / MANIFEST
    if not folder.is_dir():
        raise SmadlrpError(f"{folder}: not a folder (MORPHS is a folder written by `smadlrp morph`)")
    if not file.is_file():
        raise SmadlrpError(f"{folder}: no {MANIFEST} (MORPHS is a folder written by `smadlrp morph`)")
    try:
        with file.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [name.strip() for name in reader.fieldnames or []]
            rows = [(reader.line_num, {(k or "").strip(): (v or "").strip() for k, v in record.items()})
                    for record in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SmadlrpError(f"{file}: unreadable manifest ({exc})") from None
    missing = [name for name in MORPH_COLUMNS if name not in header]
    if missing:
        raise SmadlrpError(f"{file}: a morph manifest needs the columns {','.join(MORPH_COLUMNS)}; missing "
                           f"{', '.join(missing)}")
    return rows


def _image(folder: Path, text: str, identity: str) -> FaceImage:
    key = image_key(text)
    return FaceImage(key, folder / key, identity)


def _probe_images(file: Path, check_files: bool) -> list[FaceImage]:
    """The bona fide rows of a probe protocol, each with its one subject id."""
    protocol = read_protocol(file, check_files=check_files, both_classes=False)
    base = protocol.base.resolve()
    images = []
    for row in protocol.rows:
        if row.label != BONAFIDE:
            continue
        subjects = subjects_of(row.groups)
        if len(subjects) != 1:
            raise SmadlrpError(f"{file}, line {row.line}: a probe needs one subject id (a subjects, subject or "
                               f"identity_a column), found {len(subjects)}")
        key = row.path.relative_to(base).as_posix() if row.path.is_relative_to(base) else row.path.as_posix()
        images.append(FaceImage(key, row.path, subjects[0]))
    if not images:
        raise SmadlrpError(f"{file}: no bona fide rows to use as probes")
    return images


def _contributor(source: FaceImage, pool: dict[str, list[FaceImage]]) -> Contributor:
    """The contributor's probes: the pool's images of its identity other than `source`, else `source` itself."""
    own = source.path.resolve()
    others = tuple(image for image in pool.get(source.identity, []) if image.path.resolve() != own)
    return Contributor(source, others, False) if others else Contributor(source, (source,), True)


def _by_key(images: list[FaceImage]) -> dict[str, FaceImage]:
    """Images by key, the first of each; SmadlrpError when one key names two files (embeddings are found by key)."""
    found: dict[str, FaceImage] = {}
    for image in images:
        first = found.setdefault(image.key, image)
        if first.path.resolve() != image.path.resolve():
            raise SmadlrpError(f"the image path {shown(image.key)} names two files ({first.path} and {image.path}); "
                               "give the probe images other relative paths")
    return found


def read_morph_set(folder: Path, *, probes: Path | None = None, check_files: bool = True) -> MorphSet:
    """Read MORPHS/manifest.csv (and the probe protocol `probes`, whose bona fide rows replace MORPHS' as probes).

    `check_files`: refuse an image that does not exist (not needed when the embeddings come from a file). One-line
    SmadlrpError for a missing or unreadable manifest, a missing column, a row of another label, a morph row
    without its contributors or their identities, a bona fide row without identity, or a manifest without morphs.
    """
    file = folder / MANIFEST
    bonafide: dict[str, FaceImage] = {}
    morph_rows = []
    single: list[str] = []
    for line, row in _manifest_rows(folder):
        where = f"{file}, line {line}"
        if row["label"] not in LABELS:
            raise SmadlrpError(f"{where}: label {shown(row['label'])} is neither bonafide nor morph")
        if not row["path"]:
            raise SmadlrpError(f"{where}: empty path")
        if row["label"] == "bonafide":
            if not row["identity_a"]:
                raise SmadlrpError(f"{where}: a bona fide row needs its subject id in identity_a")
            image = _image(folder, row["path"], row["identity_a"])
            if bonafide.setdefault(image.key, image).identity != image.identity:
                raise SmadlrpError(f"{where}: {image.key} is listed with two identities")
            continue
        if row["morph_type"] == SELF_BLENDED:  # one face blended with itself: no second subject to match
            single.append(row["path"])
            continue
        empty = [c for c in ("identity_a", "identity_b", "contributor_a", "contributor_b") if not row[c]]
        if empty:
            raise SmadlrpError(f"{where}: a morph row needs its contributors; empty: {', '.join(empty)}")
        morph_rows.append((line, row))
    if not morph_rows:
        raise SmadlrpError(f"{file}: no morph rows (label morph) of two subjects; nothing to test")
    probe_list = _probe_images(probes, check_files) if probes is not None else list(bonafide.values())
    pool: dict[str, list[FaceImage]] = defaultdict(list)
    for image in probe_list:
        pool[image.identity].append(image)
    morphs = []
    for line, row in morph_rows:
        sources = [_image(folder, row[f"contributor_{s}"], row[f"identity_{s}"]) for s in ("a", "b")]
        morphs.append(MorphEntry(_image(folder, row["path"], ""), row["morph_type"] or UNSPECIFIED,
                                 tuple(_contributor(source, pool) for source in sources), line))
    everything = _by_key([*bonafide.values(), *(probe_list if probes is not None else [])])
    _by_key([*everything.values(), *(m.image for m in morphs), *(c.source for m in morphs for c in m.contributors)])
    if check_files:
        used = [m.image for m in morphs] + [p for m in morphs for c in m.contributors for p in c.probes]
        for image in [*used, *everything.values()]:
            if not image.path.is_file():
                raise SmadlrpError(f"{file}: image file not found: {image.path}")
    return MorphSet(folder, tuple(morphs), tuple(everything.values()),
                    str(probes) if probes is not None else "the manifest", tuple(single))
