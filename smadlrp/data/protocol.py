"""Protocol files: CSV lists of `path,label,split` rows, with any further columns as groups.

A protocol describes a data set the way MorDeephy, SMDD or FRLL-Morphs users share them: one row per image.
Paths are relative to `base` (the `--data` folder when given, else the protocol file's folder) unless absolute.
Labels are matched against the bona fide and attack label values (default `bonafide` and `morph`; MorDeephy's
convention is `--bonafide-label 1 --attack-label 0`). Split names: `train`, `val` (also `validation`, `dev`) and
`test` (also `eval`). Every other column is a group column (`morph_method`, `source`, `subjects`, ...).
"""

from __future__ import annotations

import csv
import io
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from smadlrp.core.errors import SmadlrpError, shown

if TYPE_CHECKING:
    from _csv import Writer

REQUIRED_COLUMNS = ("path", "label", "split")
SPLIT_ALIASES: Mapping[str, str] = {"train": "train", "val": "val", "validation": "val", "dev": "val",
                                    "test": "test", "eval": "test"}
# Columns naming the subjects an image shows (a morph: every contributor); values may list several ids.
SUBJECT_COLUMNS = ("subjects", "subject", "contributors", "identity_a", "identity_b")
_SUBJECT_SEPARATORS = re.compile(r"[;+|\s]+")
BONAFIDE, MORPH = 0, 1


@dataclass(frozen=True)
class ProtocolRow:
    """One image: resolved path, label (1 = attack/morph, 0 = bona fide), canonical split, group values."""

    path: Path
    label: int
    split: str
    groups: Mapping[str, str]
    line: int  # line number in the file (the header is line 1)


@dataclass(frozen=True)
class Protocol:
    """The validated rows of a protocol file; `group_columns` in file order."""

    file: Path
    base: Path  # the folder relative paths (of images and of path-valued groups such as mask_path) start from
    rows: tuple[ProtocolRow, ...]
    group_columns: tuple[str, ...]

    @property
    def splits(self) -> list[str]:
        return sorted({row.split for row in self.rows})

    def rows_of(self, split: str) -> list[ProtocolRow]:
        """The rows of one split (`val`, `validation` and `dev` name the same split); SmadlrpError when absent."""
        name = SPLIT_ALIASES.get(split, split)
        rows = [row for row in self.rows if row.split == name]
        if not rows:
            raise SmadlrpError(f"{self.file}: no rows of split {split!r} (the file has: {', '.join(self.splits)})")
        return rows


def subjects_of(groups: Mapping[str, str]) -> tuple[str, ...]:
    """The subject ids of one image from its SUBJECT_COLUMNS values (`001;002` lists two), in order, unique."""
    ids: list[str] = []
    for column in SUBJECT_COLUMNS:
        ids += [part for part in _SUBJECT_SEPARATORS.split(groups.get(column, "")) if part]
    return tuple(dict.fromkeys(ids))


def subject_leaks(rows: Iterable[tuple[str, Mapping[str, str]]]) -> dict[str, list[str]]:
    """Subjects that appear in more than one split, from (split, group values) per image: subject id -> its
    splits (sorted). Empty without subject columns."""
    where: dict[str, set[str]] = defaultdict(set)
    for split, groups in rows:
        for subject in subjects_of(groups):
            where[subject].add(split)
    return {subject: sorted(splits) for subject, splits in sorted(where.items()) if len(splits) > 1}


def leak_message(leaks: Mapping[str, Sequence[str]], source: str) -> str | None:
    """A one-line warning for subjects in several splits (None when there are none)."""
    if not leaks:
        return None
    pairs: dict[str, int] = defaultdict(int)
    for splits in leaks.values():
        pairs[" and ".join(splits)] += 1
    counts = ", ".join(f"{n} in {where}" for where, n in sorted(pairs.items()))
    subject, splits = next(iter(leaks.items()))
    return (f"{source}: {len(leaks)} subject(s) appear in more than one split ({counts}; e.g. {subject!r} in "
            f"{' and '.join(splits)}): the splits are not subject-disjoint, so the metrics are optimistic")


def read_protocol(file: str | Path, *, base: str | Path | None = None, bonafide_label: str = "bonafide",
                  attack_label: str = "morph", check_files: bool = True, both_classes: bool = True) -> Protocol:
    """Read and validate a protocol file.

    Refused with one line naming the row: a missing column, an image file that does not exist (`check_files`),
    a path listed twice, a label that matches neither class, an unknown split; and, with `both_classes` (the
    default; a list of probe images has only bona fide rows), a split without one of the two classes.
    """
    file = Path(file)
    if bonafide_label == attack_label:
        raise SmadlrpError(f"--bonafide-label and --attack-label are both {attack_label!r}", exit_code=2)
    base_dir = Path(base) if base is not None else file.parent
    try:
        with file.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [name.strip() for name in reader.fieldnames or []]
            records = list(reader)
    except FileNotFoundError:
        raise SmadlrpError(f"protocol file not found: {file}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SmadlrpError(f"{file}: unreadable protocol ({exc})") from None
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise SmadlrpError(f"{file}: a protocol needs the columns path,label,split; missing {', '.join(missing)} "
                           f"(header: {','.join(header) or 'empty'})")
    group_columns = tuple(name for name in header if name not in REQUIRED_COLUMNS)
    labels = {bonafide_label.strip(): BONAFIDE, attack_label.strip(): MORPH}
    rows: list[ProtocolRow] = []
    seen: dict[Path, int] = {}
    for line, record in enumerate(records, start=2):
        values = {key.strip(): (value or "").strip() for key, value in record.items() if key is not None}
        where = f"{file}, line {line}"
        label = labels.get(values["label"])
        if label is None:
            raise SmadlrpError(f"{where}: label {values['label']!r} is neither the bona fide label "
                               f"{bonafide_label!r} nor the attack label {attack_label!r} "
                               "(set --bonafide-label/--attack-label)")
        split = SPLIT_ALIASES.get(values["split"].lower())
        if split is None:
            raise SmadlrpError(f"{where}: unknown split {values['split']!r} (use train, val or test)")
        if not values["path"]:
            raise SmadlrpError(f"{where}: empty path")
        path = _row_path(values["path"], base_dir, where, check_files)
        if path in seen:
            raise SmadlrpError(f"{where}: {values['path']} is listed twice (first on line {seen[path]})")
        seen[path] = line
        rows.append(ProtocolRow(path, label, split, {c: values.get(c, "") for c in group_columns}, line))
    if not rows:
        raise SmadlrpError(f"{file}: the protocol lists no images")
    for split in sorted({row.split for row in rows}) if both_classes else ():
        present = {row.label for row in rows if row.split == split}
        for label, name in ((BONAFIDE, "bona fide"), (MORPH, "attack")):
            if label not in present:
                raise SmadlrpError(f"{file}: split {split!r} has no {name} rows (every split needs both classes)")
    return Protocol(file, base_dir, tuple(rows), group_columns)


def _row_path(text: str, base: Path, where: str, check_file: bool) -> Path:
    """The resolved path of a row's image (relative to `base` unless absolute); SmadlrpError naming the row when
    the operating system refuses the path (a NUL byte, a name too long) or, with `check_file`, finds no file."""
    try:
        path = Path(text)
        path = (path if path.is_absolute() else base / path).resolve()
        missing = check_file and not path.is_file()
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        why = "it holds a NUL byte" if "\0" in text else reason
        raise SmadlrpError(f"{where}: unusable image path {shown(text)}: {why}") from None
    if missing:
        raise SmadlrpError(f"{where}: image file not found: {path}")
    return path


class _LineFeedRows:
    """The text stream under an output csv writer: the writer ends rows with "\r\n", so that it quotes every field
    holding a "\r" or "\n" (csv quotes only the characters of its line terminator: with "\n" ends a bare "\r" in a
    file name splits the row for every reader); each row is stored with a "\n" end."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def write(self, row: str) -> int:
        return self._out.write(row[:-2] + "\n")


def csv_writer(out: TextIO) -> Writer:
    """A csv writer for smadlrp's output CSV files (scores, predictions, protocols, tables): "\n" line ends, and any
    field holding a comma, quote, "\r" or "\n" quoted, so that every CSV reader reads each row back whole."""
    return csv.writer(_LineFeedRows(out), lineterminator="\r\n")


def csv_dict_writer(out: TextIO, fieldnames: Sequence[str], **options: Any) -> csv.DictWriter[str]:
    """`csv_writer`'s dict form (`options` as for csv.DictWriter, e.g. extrasaction)."""
    return csv.DictWriter(_LineFeedRows(out), fieldnames=list(fieldnames), lineterminator="\r\n", **options)


def protocol_csv(rows: Iterable[Mapping[str, str]], columns: Sequence[str]) -> str:
    """CSV text of protocol rows (dicts with at least path, label, split) in `columns` order."""
    buffer = io.StringIO()
    writer = csv_dict_writer(buffer, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
