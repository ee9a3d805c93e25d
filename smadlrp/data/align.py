"""Face detection and alignment as a recorded preprocessing step (the optional `align` extra: dlib).

Detector: dlib's frontal face detector (HOG + linear SVM). Landmarks: dlib's 5-point shape predictor
(`shape_predictor_5_face_landmarks.dat`, CC0, shipped by the `face_recognition_models` package). The model file
is found through the package's spec, without importing the package (its `__init__` imports `pkg_resources`,
which recent setuptools no longer provides).

Policies (every crop is `size` x `size` px, RGB):
- `chip`: the 5 landmarks mapped by a similarity transform onto dlib's 5-point template (`dlib.get_face_chip`),
  with `margin` as dlib's padding (the template's unit square plus `margin` of its side on every side).
- `box`: the detector's box grown by `margin` of its side on every side, unaligned, resized (as SMDD crops).
With several faces the largest box is used (ties: the higher detector score). A face that is not found is a
failure to acquire (FtA); `center-crop` then takes the largest centred square instead.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from smadlrp.core.errors import SmadlrpError
from smadlrp.core.fileio import write_atomic
from smadlrp.data.loading import Prepare, load_rgb

INSTALL_HINT = "pip install 'smadlrp[align]'"
POLICIES = ("chip", "box")
ON_FAILURE = ("skip", "center-crop")
DEFAULT_MARGIN = {"chip": 0.25, "box": 0.05}
LANDMARK_MODEL = "shape_predictor_5_face_landmarks.dat"
# dlib's 5-point template in the unit square (x, y): right eye outer and inner corner, left eye outer and inner
# corner, nose base (dlib/image_transforms/interpolation.h, get_face_chip_details).
TEMPLATE_5 = ((0.8595674595992, 0.2134981538014), (0.6460604764104, 0.2289674387677),
              (0.1205750620789, 0.2137274526848), (0.3340850613712, 0.2290642403242),
              (0.4901123135679, 0.6277975316475))


class AlignExtraMissing(SmadlrpError):
    """dlib or the landmark model is not installed."""

    def __init__(self, what: str) -> None:
        super().__init__(f"face alignment needs {what}: install the align extra with {INSTALL_HINT}", exit_code=2)


@dataclass(frozen=True)
class AlignPolicy:
    """How faces are cropped; recorded in align.json and copied into checkpoints trained on the crops."""

    policy: str = "chip"
    size: int = 224  # output side, px
    margin: float = 0.25  # chip: dlib's padding; box: growth of the box per side, as a fraction of its side
    on_failure: str = "skip"
    upsample: int = 1  # detector image pyramid upsampling steps (finds faces down to about 40 px)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise SmadlrpError(f"--policy {self.policy!r}: choose {' or '.join(POLICIES)}", exit_code=2)
        if self.on_failure not in ON_FAILURE:
            raise SmadlrpError(f"--on-failure {self.on_failure!r}: choose {' or '.join(ON_FAILURE)}", exit_code=2)
        if self.size < 16 or not 0 <= self.margin <= 2 or not 0 <= self.upsample <= 3:
            raise SmadlrpError(f"alignment policy: size {self.size} (>= 16 px), margin {self.margin} (0 to 2) or "
                               f"upsample {self.upsample} (0 to 3) out of range", exit_code=2)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> AlignPolicy:
        return cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def template(self) -> np.ndarray:
        """(5, 2) where `chip` puts the 5 landmarks in the crop, px (x, y)."""
        unit = np.array(TEMPLATE_5)
        return (unit + self.margin) / (1 + 2 * self.margin) * self.size


@dataclass(frozen=True)
class Face:
    """One detection in source pixels: box (left, top, right, bottom), detector score, 5 landmarks (x, y)."""

    box: tuple[int, int, int, int]
    score: float
    landmarks: tuple[tuple[int, int], ...]

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


def model_file(name: str) -> Path:
    """A model file of `face_recognition_models` (e.g. LANDMARK_MODEL), located without importing the package."""
    spec = importlib.util.find_spec("face_recognition_models")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / "models" / name
        if path.is_file():
            return path
    raise AlignExtraMissing(f"the model file {name} (package face_recognition_models)")


def landmark_model_path() -> Path:
    """The 5-point landmark model file."""
    return model_file(LANDMARK_MODEL)


def _dlib() -> Any:
    try:
        import dlib  # type: ignore[import-not-found]
    except ImportError:
        raise AlignExtraMissing("dlib (package dlib-bin)") from None
    return dlib


def check_available() -> None:
    """Raise AlignExtraMissing (one line naming the install command) unless dlib and the model are installed."""
    _dlib()
    landmark_model_path()


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The largest centred square, resized to `size` (bicubic)."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)


class FaceAligner:
    """Detects the largest face of an RGB image and crops it by an AlignPolicy. Deterministic."""

    def __init__(self, policy: AlignPolicy) -> None:
        dlib = _dlib()
        self.policy, self.dlib = policy, dlib
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(landmark_model_path()))

    def describe(self) -> dict[str, str]:
        """What align.json records about the detector and the landmark model."""
        return {"detector": f"dlib {self.dlib.__version__} frontal face detector (HOG), upsample "
                            f"{self.policy.upsample}",
                "landmark_model": f"{LANDMARK_MODEL} (dlib 5-point shape predictor, CC0, from face_recognition_models)"}

    def detect(self, pixels: np.ndarray) -> tuple[Face, Any] | None:
        """The largest face of (H, W, 3) uint8 `pixels` and dlib's landmark object, or None."""
        boxes, scores, _ = self.detector.run(pixels, self.policy.upsample, 0.0)
        if not boxes:
            return None
        best = max(range(len(boxes)), key=lambda i: (boxes[i].area(), scores[i]))
        rect = boxes[best]
        shape = self.predictor(pixels, rect)
        face = Face((rect.left(), rect.top(), rect.right(), rect.bottom()), float(scores[best]),
                    tuple((shape.part(i).x, shape.part(i).y) for i in range(shape.num_parts)))
        return face, shape

    def crop(self, image: Image.Image, pixels: np.ndarray, face: Face, shape: Any) -> Image.Image:
        size, margin = self.policy.size, self.policy.margin
        if self.policy.policy == "chip":
            return Image.fromarray(self.dlib.get_face_chip(pixels, shape, size=size, padding=margin))
        left, top, right, bottom = face.box
        grow = margin * max(right - left, bottom - top)
        box = (round(left - grow), round(top - grow), round(right + grow), round(bottom + grow))
        return image.crop(box).resize((size, size), Image.Resampling.BICUBIC)  # outside the image: black

    def align(self, image: Image.Image) -> tuple[Image.Image | None, Face | None]:
        """(crop, face); on a failure to acquire (None, None) with `skip`, (centre crop, None) with
        `center-crop`."""
        pixels = np.asarray(image.convert("RGB"))
        found = self.detect(pixels)
        if found is None:
            return (center_crop(image, self.policy.size) if self.policy.on_failure == "center-crop" else None), None
        face, shape = found
        return self.crop(image, pixels, face, shape), face


def recorded_aligner(policy_doc: dict[str, Any], checkpoint: str) -> Prepare:
    """PIL image -> aligned crop by a checkpoint's recorded policy (predict and explain --align); a face that is
    not found is a SmadlrpError naming the failure to acquire, unless the policy falls back to a centre crop."""
    if not policy_doc:
        raise SmadlrpError(f"--align: {checkpoint} records no alignment (its training data was not made by "
                           "`smadlrp align`); drop --align, or align the images yourself", exit_code=2)
    aligner = FaceAligner(AlignPolicy.from_dict(policy_doc))

    def align(image: Image.Image) -> Image.Image:
        crop, _ = aligner.align(image)
        if crop is None:
            raise SmadlrpError("no face found (failure to acquire)")
        return crop

    return align


def fta_rate(failures: int, attempts: int) -> float | None:
    """Failure-to-acquire rate: failures / attempts (None without attempts)."""
    return failures / attempts if attempts else None


# ---- aligning a folder tree or a protocol --------------------------------------------------------------------
ALIGN_FILE = "align.json"
ALIGN_SCHEMA = "smadlrp.align/1"


@dataclass(frozen=True)
class AlignJob:
    """One input image and where its crop goes (relative to the output folder, always PNG)."""

    source: Path
    output: Path
    name: str  # the input's path as the report shows it (relative to the input folder or protocol)


def folder_jobs(folder: Path, images: Sequence[Path]) -> list[AlignJob]:
    """Mirror `folder`'s tree: `a/b/x.jpg` -> `a/b/x.png`."""
    jobs = [AlignJob(p, p.relative_to(folder).with_suffix(".png"), p.relative_to(folder).as_posix()) for p in images]
    _check_distinct(jobs)
    return jobs


def protocol_jobs(file: Path) -> tuple[list[AlignJob], list[dict[str, str]], list[str]]:
    """The images of a protocol CSV (paths relative to its folder) with its rows and columns; crops mirror the
    relative paths (an absolute path keeps only its file name)."""
    try:
        with file.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SmadlrpError(f"{file}: not a readable protocol file ({exc})") from None
    if "path" not in columns:
        raise SmadlrpError(f"{file}: a protocol needs a path column (found: {', '.join(columns) or 'none'})")
    jobs = []
    for row in rows:
        relative = Path(row["path"])
        output = Path(relative.name) if relative.is_absolute() else relative
        jobs.append(AlignJob(file.parent / relative, output.with_suffix(".png"), row["path"]))
    _check_distinct(jobs)
    return jobs, rows, columns


def _check_distinct(jobs: Sequence[AlignJob]) -> None:
    seen: dict[Path, str] = {}
    for job in jobs:
        if job.output in seen:
            raise SmadlrpError(f"{seen[job.output]} and {job.name} would both be written as {job.output}; "
                               "rename one of them")
        seen[job.output] = job.name


@dataclass
class AlignReport:
    """What `align_images` did: per aligned image its face, per failure its reason."""

    aligned: list[dict[str, Any]]
    failures: list[dict[str, str]]

    @property
    def attempts(self) -> int:
        return len(self.aligned) + len(self.failures)


def align_images(jobs: Sequence[AlignJob], out: Path, aligner: FaceAligner,
                 on_image: Callable[[AlignJob, str | None], None] = lambda job, failure: None) -> AlignReport:
    """Align every job's image into `out` (atomic PNG writes); a file that cannot be read or holds no face is a
    failure to acquire, reported through `on_image(job, reason)` and recorded, and the others go on."""
    aligned: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    for job in jobs:
        try:
            image = load_rgb(job.source)
        except SmadlrpError as exc:
            failures.append({"image": job.name, "reason": exc.message, "output": ""})
            on_image(job, exc.message)
            continue
        crop, face = aligner.align(image)
        if crop is not None:
            write_atomic(out / job.output, functools.partial(_save_png, crop))
        if face is None:
            reason = "no face found"
            failures.append({"image": job.name, "reason": reason, "output": "" if crop is None else
                             job.output.as_posix()})
            on_image(job, reason)
            continue
        aligned.append({"image": job.name, "output": job.output.as_posix(), "size": list(image.size),
                        "box": list(face.box), "score": face.score, "landmarks": [list(p) for p in face.landmarks]})
        on_image(job, None)
    return AlignReport(aligned, failures)


def _save_png(image: Image.Image, path: Path) -> None:
    image.save(path, format="PNG")


def align_document(report: AlignReport, aligner: FaceAligner, source: str) -> dict[str, Any]:
    """align.json: the policy, detector and landmark model, counts and FtA rate, every face and failure."""
    attempts = report.attempts
    return {"schema": ALIGN_SCHEMA, "source": source, "policy": aligner.policy.as_dict(), **aligner.describe(),
            "template_px": aligner.policy.template().round(2).tolist() if aligner.policy.policy == "chip" else None,
            "counts": {"images": attempts, "aligned": len(report.aligned), "fta": len(report.failures),
                       "fta_rate": fta_rate(len(report.failures), attempts)},
            "images": report.aligned, "failures": report.failures}


def recorded_policy(root: Path) -> dict[str, Any] | None:
    """The policy of `root/align.json` when the data was made by `smadlrp align` (None otherwise)."""
    path = root / ALIGN_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SmadlrpError(f"{path}: not a readable align.json ({exc})") from None
    if doc.get("schema") != ALIGN_SCHEMA:
        raise SmadlrpError(f"{path}: not written by smadlrp align")
    return dict(doc["policy"])
