"""Score files: smadlrp's own `path,label,score` CSV (written by `evaluate --scores`), and reading score files of
other tools."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

LABEL_NAMES = ("bonafide", "morph")  # label 0, label 1


def scores_csv(paths: Sequence[Path], labels: npt.ArrayLike, scores: npt.ArrayLike) -> str:
    """`path,label,score` CSV text: label `bonafide` or `morph`, score P(morph) at full float precision (repr),
    so that reading the file back reproduces every metric exactly."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "score"])
    for path, label, score in zip(paths, np.asarray(labels), np.asarray(scores, dtype=np.float64), strict=True):
        writer.writerow([str(path), LABEL_NAMES[int(label)], repr(float(score))])
    return buffer.getvalue()
