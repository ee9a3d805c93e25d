"""Face landmarks per image for landmark morphs: dlib's 68-point model, or a CSV of landmarks per image.

Sources (`smadlrp morph --landmarks`):
- `dlib68`: the largest face found by dlib's frontal detector (the same choice as `smadlrp align`), then dlib's
  68-point shape predictor (`shape_predictor_68_face_landmarks.dat`, shipped by `face_recognition_models`; iBUG
  300-W layout). Its training data, the iBUG 300-W landmark set, is licensed for NON-COMMERCIAL use only, so it is
  never a default: the user names it, and the licence is recorded with every output.
- a CSV file: one row per image, columns `path,x0,y0,x1,y1,...` with the same number K >= 5 of points on every
  row, in the input image's pixels (x right, y down, the top-left pixel's centre at 0, 0). K = 68 is read as the
  iBUG 300-W layout, K = 5 as dlib's 5-point layout; any other K is used without knowing which point is which.
  A row names its image by the path relative to the input folder (or as the protocol lists it), by an absolute
  path or a path relative to the CSV's folder, or by its file name alone when that is unique.

A face without landmarks (none found, no CSV row) is a failure to acquire, returned as a reason, never raised.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from smadlrp.core.errors import SmadlrpError, shown
from smadlrp.data.align import AlignPolicy, FaceAligner, model_file

Points = NDArray[np.float64]
DLIB68 = "dlib68"
DLIB68_MODEL = "shape_predictor_68_face_landmarks.dat"
DLIB68_LICENCE = ("non-commercial use only: dlib's shape_predictor_68_face_landmarks.dat is trained on the iBUG "
                  "300-W landmark data set, whose licence excludes commercial use")
MIN_POINTS = 5
# the eyes of the known layouts, as point indices: (image-left eye, image-right eye) of a frontal face
EYE_POINTS: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    68: (tuple(range(36, 42)), tuple(range(42, 48))),  # iBUG 300-W: 36-41 and 42-47
    5: ((2, 3), (0, 1)),  # dlib 5-point: 0-1 one eye's corners, 2-3 the other's, 4 the nose base
}


def layout_name(k: int) -> str:
    """What K points are taken to be: `ibug68`, `dlib5`, or `K points` (unknown layout)."""
    return {68: "ibug68", 5: "dlib5"}.get(k, f"{k} points")


def eye_centres(points: Points) -> tuple[NDArray[np.float64], NDArray[np.float64]] | None:
    """(image-left, image-right) eye centres (x, y) of (K, 2) landmarks of a known layout, else None."""
    eyes = EYE_POINTS.get(len(points))
    if eyes is None:
        return None
    first, second = (points[list(index)].mean(axis=0) for index in eyes)
    return (first, second) if first[0] <= second[0] else (second, first)


class Dlib68Landmarks:
    """68 landmarks of the largest face of an image: dlib's frontal detector and 68-point shape predictor."""

    name = DLIB68

    def __init__(self, upsample: int = 1) -> None:
        self.aligner = FaceAligner(AlignPolicy(upsample=upsample))
        self.dlib = self.aligner.dlib
        self.predictor = self.dlib.shape_predictor(str(model_file(DLIB68_MODEL)))

    @property
    def points(self) -> int:
        return 68

    def describe(self) -> dict[str, Any]:
        """What morph.json records about the landmark source."""
        return {"source": DLIB68, "points": 68, "layout": "ibug68", "model": f"{DLIB68_MODEL} (dlib "
                f"{self.dlib.__version__}, from face_recognition_models)", "licence": DLIB68_LICENCE,
                "detector": self.aligner.describe()["detector"]}

    def locate(self, image: Image.Image, name: str, path: Path) -> tuple[Points | None, str]:
        """(68 landmarks (x, y) in `image`'s pixels, "") or (None, reason)."""
        pixels = np.asarray(image.convert("RGB"))
        found = self.aligner.detect(pixels)
        if found is None:
            return None, "no face found"
        left, top, right, bottom = found[0].box
        shape = self.predictor(pixels, self.dlib.rectangle(left, top, right, bottom))
        return np.array([(shape.part(i).x, shape.part(i).y) for i in range(68)], dtype=np.float64), ""


class CsvLandmarks:
    """Landmarks per image read from a CSV file (see the module docstring for the layout)."""

    name = "csv"

    def __init__(self, file: Path) -> None:
        self.file = file
        self.rows = read_landmark_csv(file)
        self.by_name = Counter(Path(key).name for key in self.rows)
        self._resolved = {_resolve(file.parent, key): key for key in self.rows}

    @property
    def points(self) -> int:
        return len(next(iter(self.rows.values())))

    def describe(self) -> dict[str, Any]:
        return {"source": str(self.file), "points": self.points, "layout": layout_name(self.points),
                "model": "", "licence": "the landmark file's own (given by the user)", "detector": ""}

    def locate(self, image: Image.Image, name: str, path: Path) -> tuple[Points | None, str]:
        """The landmarks of the image shown as `name` (at `path`): (points, "") or (None, reason)."""
        return self.lookup(name, path)

    def lookup(self, name: str, path: Path) -> tuple[Points | None, str]:
        """`locate` without the image."""
        key = name if name in self.rows else self._resolved.get(_resolve(Path.cwd(), str(path)))
        if key is None and self.by_name[Path(name).name] == 1:
            key = next(k for k in self.rows if Path(k).name == Path(name).name)
        if key is None:
            return None, f"no landmarks for it in {self.file.name}"
        return self.rows[key].copy(), ""


def _resolve(base: Path, text: str) -> str:
    try:
        path = Path(text)
        return str((path if path.is_absolute() else base / path).resolve())
    except (OSError, ValueError):
        return text


def read_landmark_csv(file: Path) -> dict[str, Points]:
    """path -> (K, 2) landmarks of a landmark CSV; SmadlrpError (one line naming the file and line) when the file
    cannot be read, has no path column or fewer than 5 points, or a row is short, long, not numeric or repeated."""
    try:
        with file.open(newline="", encoding="utf-8-sig") as fh:
            records = list(csv.reader(fh))
    except FileNotFoundError:
        raise SmadlrpError(f"landmark file not found: {file}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SmadlrpError(f"{file}: not a readable landmark CSV ({exc})") from None
    if not records or not records[0]:
        raise SmadlrpError(f"{file}: an empty landmark CSV (expected the header path,x0,y0,x1,y1,...)")
    header = [name.strip() for name in records[0]]
    values = len(header) - 1
    if header[0] != "path" or values < 2 * MIN_POINTS or values % 2:
        raise SmadlrpError(f"{file}: a landmark CSV has the header path,x0,y0,...,xK-1,yK-1 with K >= {MIN_POINTS} "
                           f"points (found {shown(','.join(header))})")
    rows: dict[str, Points] = {}
    for line, record in enumerate(records[1:], start=2):
        if not any(cell.strip() for cell in record):
            continue
        if len(record) != len(header):
            raise SmadlrpError(f"{file}, line {line}: {len(record)} values, the header has {len(header)}")
        key = record[0].strip()
        try:
            numbers = [float(cell) for cell in record[1:]]
        except ValueError:
            raise SmadlrpError(f"{file}, line {line}: a landmark coordinate is not a number") from None
        if not key or not all(math.isfinite(v) for v in numbers):
            raise SmadlrpError(f"{file}, line {line}: an empty path or a coordinate that is not finite")
        if key in rows:
            raise SmadlrpError(f"{file}, line {line}: {shown(key)} is listed twice")
        rows[key] = np.array(numbers, dtype=np.float64).reshape(-1, 2)
    if not rows:
        raise SmadlrpError(f"{file}: the landmark CSV lists no images")
    return rows


def landmark_source(spec: str) -> Dlib68Landmarks | CsvLandmarks:
    """`dlib68` (needs the align extra and the 68-point model) or the path of a landmark CSV."""
    if spec == DLIB68:
        return Dlib68Landmarks()
    path = Path(spec)
    if path.suffix.lower() != ".csv" and not path.is_file():
        raise SmadlrpError(f"--landmarks {shown(spec)}: choose dlib68 (non-commercial licence) or a landmark CSV "
                           "file (path,x0,y0,...)", exit_code=2)
    return CsvLandmarks(path)
