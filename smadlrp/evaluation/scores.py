"""Score files: smadlrp's own `path,label,score` CSV (written by `evaluate --scores`), and reading score files of
other tools."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.data.protocol import csv_writer, subjects_of

LABEL_NAMES = ("bonafide", "morph")  # label 0, label 1


def scores_csv(paths: Sequence[Path], labels: npt.ArrayLike, scores: npt.ArrayLike,
               groups: Mapping[str, Sequence[str]] | None = None) -> str:
    """`path,label,score[,group columns]` CSV text: label `bonafide` or `morph`, score P(morph) at full float
    precision (repr), so that reading the file back reproduces every metric exactly; `groups` (column -> one
    value per row) keep the data's group and subject columns."""
    groups = groups or {}
    buffer = io.StringIO()
    writer = csv_writer(buffer)
    writer.writerow(["path", "label", "score", *groups])
    rows = zip(paths, np.asarray(labels), np.asarray(scores, dtype=np.float64), strict=True)
    for i, (path, label, score) in enumerate(rows):
        writer.writerow([str(path), LABEL_NAMES[int(label)], repr(float(score)), *(v[i] for v in groups.values())])
    return buffer.getvalue()


BOB_COLUMNS = ("claimed_id", "test_label", "is_bonafide", "attack_type", "sample_n", "score")
DIRECTIONS = ("auto", "higher-is-morph", "higher-is-bonafide")
_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


@dataclass(frozen=True)
class ScoreSet:
    """One system's labelled scores read from a file.

    labels (N,) int64 with 1 = morph; scores (N,) float64 oriented so that higher means morph (a file whose
    scores rise for bona fide is negated, `negated` says so); groups: column -> value per row; subjects: the
    subject id of each row ("" when unknown), from Bob's claimed_id or a subject column.
    """

    file: Path
    format: str  # "bob" or "path,label,score"
    labels: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float64]
    negated: bool
    groups: Mapping[str, tuple[str, ...]]
    subjects: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.file.stem

    def threshold(self, value: float) -> float:
        """A threshold given in the file's own score units, on the oriented scores."""
        return -value if self.negated else value


def _read_rows(file: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with file.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [name.strip() for name in reader.fieldnames or []]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except FileNotFoundError:
        raise SmadlrpError(f"score file not found: {file}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SmadlrpError(f"{file}: unreadable score file ({exc})") from None
    if not rows:
        raise SmadlrpError(f"{file}: no score rows")
    return header, rows


def read_scores(file: str | Path, *, direction: str = "auto", bonafide_label: str = "bonafide",
                attack_label: str = "morph") -> ScoreSet:
    """Read a score file: Bob PAD's CSV (claimed_id,test_label,is_bonafide,attack_type,sample_n,score; higher is
    bona fide, attack_type a group) or a `path,label,score` CSV (smadlrp's own --scores file or another tool's;
    higher is morph; labels `bonafide`/`morph` or the given values; further columns are groups).

    `direction` overrides the format's score direction. SmadlrpError naming the file (and line) for a missing
    score or label column, an unknown label, a score that is not a finite number, or a file with no rows.
    """
    file = Path(file)
    if direction not in DIRECTIONS:
        raise UsageError(f"--score-direction {direction!r}: choose {', '.join(DIRECTIONS[1:])}")
    header, rows = _read_rows(file)
    if "score" not in header:
        raise SmadlrpError(f"{file}: no score column (header: {','.join(header)})")
    bob = all(column in header for column in BOB_COLUMNS)
    if not bob and "label" not in header:
        raise SmadlrpError(f"{file}: no label column: expected path,label,score or Bob PAD's "
                           f"{','.join(BOB_COLUMNS)} (header: {','.join(header)})")
    labels, scores = [], []
    for line, row in enumerate(rows, start=2):
        labels.append(_bob_label(row, file, line) if bob else _label(row, file, line, bonafide_label, attack_label))
        try:
            score = float(row["score"])
        except ValueError:
            raise SmadlrpError(f"{file}, line {line}: score {row['score']!r} is not a number") from None
        if not np.isfinite(score):
            raise SmadlrpError(f"{file}, line {line}: score {row['score']} is not finite")
        scores.append(score)
    negated = direction == "higher-is-bonafide" or (direction == "auto" and bob)
    if bob:
        groups = {"attack_type": tuple("" if y == 0 else row["attack_type"] for y, row in zip(labels, rows,
                                                                                              strict=True))}
        subjects = tuple(row["claimed_id"] for row in rows)
    else:
        columns = [c for c in header if c not in ("path", "label", "score")]
        groups = {c: tuple(row.get(c, "") for row in rows) for c in columns}
        subjects = tuple((subjects_of(row) or ("",))[0] for row in rows)
    values = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    return ScoreSet(file, "bob" if bob else "path,label,score", y, -values if negated else values, negated,
                    groups, subjects)


def score_paths(file: str | Path) -> list[str]:
    """The path column of a `path,label,score` file, one per row in the order `read_scores` reads them ("" where a
    row has none)."""
    return [row.get("path", "") for row in _read_rows(Path(file))[1]]


def _label(row: Mapping[str, str], file: Path, line: int, bonafide_label: str, attack_label: str) -> int:
    value = row["label"]
    if value == attack_label:
        return 1
    if value == bonafide_label:
        return 0
    raise SmadlrpError(f"{file}, line {line}: label {value!r} is neither the bona fide label {bonafide_label!r} nor "
                       f"the attack label {attack_label!r} (set --bonafide-label/--attack-label)")


def _bob_label(row: Mapping[str, str], file: Path, line: int) -> int:
    value = row["is_bonafide"].lower()
    if value in _TRUE:
        return 0
    if value in _FALSE:
        return 1
    raise SmadlrpError(f"{file}, line {line}: is_bonafide {row['is_bonafide']!r} is neither True nor False")
