"""Find and read what the commands wrote in a run folder: JSON files recognised by their keys, figures, score files.

A run folder is any folder a user pointed the commands' outputs at (`make demo`'s demo/, a finetune --out folder).
Its files and those of its subfolders (one level down) are looked at; a file that is missing leaves its section out
of the report. Only a checkpoint's metadata is read, never its weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smadlrp.core.errors import SmadlrpError, shorten
from smadlrp.detector.checkpoint import CheckpointMeta, load_meta

DEPTH = 2  # the run folder and its direct subfolders
SCORES_HEADER = ("path", "label", "score")  # the first columns of `evaluate --scores` and `metrics` score files
REGION_FIGURES = ("shares", "means", "clusters", "embedding")  # the keys of a regions JSON's "files" that are PNGs
MAX_GRIDS = 4  # explain rule grids shown per run (the page stays small enough to email)


@dataclass
class RunFiles:
    """What one run folder holds that a report can show (None or empty: not found)."""

    folder: Path
    name: str
    checkpoint: Path | None = None
    meta: CheckpointMeta | None = None
    history: dict[str, Any] | None = None
    training_curves: Path | None = None
    evaluate: dict[str, Any] | None = None
    scores: Path | None = None
    det: Path | None = None
    compare: dict[str, Any] | None = None
    compare_figure: Path | None = None
    regions: dict[str, Any] | None = None
    region_figures: dict[str, Path] = field(default_factory=dict)
    explain: list[dict[str, Any]] = field(default_factory=list)
    grids: list[Path] = field(default_factory=list)
    read: dict[str, Path] = field(default_factory=dict)  # what -> the file it came from

    @property
    def empty(self) -> bool:
        """Nothing a report can show."""
        return not self.read

    def found(self) -> dict[str, str]:
        """What was read, by what it is (for `report --json`)."""
        return {what: str(path) for what, path in self.read.items()}


def _files(folder: Path, depth: int = DEPTH) -> Iterator[Path]:
    """The files of `folder` and of its subfolders down to `depth` levels in all, shallow first, sorted by name."""
    level = [folder]
    for _ in range(depth):
        below = []
        for current in level:
            entries = sorted(current.iterdir(), key=lambda p: p.name)
            yield from (p for p in entries if p.is_file() and not p.name.startswith("."))
            below += [p for p in entries if p.is_dir() and not p.name.startswith(".")]
        level = below


def read_json(path: Path) -> Any:
    """A JSON file's content; SmadlrpError naming the file and the place of the first problem."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SmadlrpError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SmadlrpError(f"{path}: unreadable ({shorten(str(exc))})") from None


def json_kind(doc: Any) -> str | None:
    """Which command wrote a JSON document, from its keys: evaluate, compare-rules, regions, explain or the
    finetune history; None for any other."""
    if not isinstance(doc, dict):
        return None
    metrics = doc.get("metrics")
    if "split" in doc and (isinstance(metrics, dict) and "threshold_source" in metrics or "test_sets" in doc):
        return "evaluate"
    methods = doc.get("methods")
    if isinstance(methods, list) and methods and all(isinstance(m, dict) and "aopc" in m for m in methods):
        return "compare-rules"
    if isinstance(doc.get("rows"), list) and isinstance(doc.get("spray"), dict):
        return "regions"
    if isinstance(doc.get("images"), list) and "rules" in doc and "sum_split" in doc:
        return "explain"
    if isinstance(doc.get("epochs"), list) and isinstance(doc.get("config"), dict):
        return "history"
    return None


def is_score_file(path: Path) -> bool:
    """A CSV whose header starts path,label,score (what `evaluate --scores` writes)."""
    try:
        with path.open(encoding="utf-8") as handle:
            header = handle.readline().strip().split(",")
    except (OSError, UnicodeDecodeError):
        return False
    return tuple(header[:3]) == SCORES_HEADER


def _checkpoint_meta(path: Path) -> CheckpointMeta | None:
    """The metadata of a smadlrp checkpoint; None for another safetensors file (patterns, traces)."""
    try:
        return load_meta(path)
    except SmadlrpError:
        return None


def _beside(recorded: str, json_path: Path) -> Path | None:
    """A file a JSON document names: as recorded (absolute, or relative to the working folder), else by its name
    in the JSON's folder or in the recorded folder's namesake next to it."""
    given = Path(recorded)
    for candidate in (given, json_path.parent / given.name, json_path.parent / given.parent.name / given.name):
        if candidate.is_file():
            return candidate
    return None


def _add_json(run: RunFiles, path: Path, doc: dict[str, Any], kind: str) -> None:
    """Keep the first document of each kind (the explain documents all), with the figures it names."""
    if kind == "evaluate" and run.evaluate is None:
        run.evaluate, run.read["evaluate"] = doc, path
    elif kind == "compare-rules" and run.compare is None:
        run.compare, run.read["compare-rules"] = doc, path
    elif kind == "regions" and run.regions is None:
        run.regions, run.read["regions"] = doc, path
        recorded = doc.get("files")
        files: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
        for key in REGION_FIGURES:
            figure = _beside(str(files.get(key, "")), path) if files.get(key) else None
            if figure is not None:
                run.region_figures[key] = figure
    elif kind == "history" and run.history is None:
        run.history, run.read["history"] = doc, path
    elif kind == "explain":
        run.explain.append(doc)
        run.read[f"explain {len(run.explain)}"] = path
        for image in doc["images"]:
            for name in image.get("files", []) if isinstance(image, dict) else []:
                grid = _beside(str(Path(str(doc.get("out", ""))) / name), path) if name.endswith(".grid.png") else None
                if grid is not None and grid not in run.grids:
                    run.grids.append(grid)


def collect_run(folder: Path, name: str | None = None) -> RunFiles:
    """Read what the commands wrote in `folder` (see the module docstring). SmadlrpError for a missing folder, a
    corrupt JSON file or a folder with nothing a report can show."""
    if not folder.is_dir():
        raise SmadlrpError(f"{folder}: no such folder" if not folder.exists() else f"{folder}: not a folder")
    run = RunFiles(folder, name or folder.resolve().name)
    files = list(_files(folder))
    checkpoints = [p for p in files if p.suffix == ".safetensors"]
    checkpoints.sort(key=lambda p: p.name != "best.safetensors")  # best first, then the others in folder order
    for path in files:
        if path.suffix == ".json":
            doc = read_json(path)
            kind = json_kind(doc)
            if kind is not None:
                _add_json(run, path, doc, kind)
        elif path.suffix == ".csv" and run.scores is None and is_score_file(path):
            run.scores, run.read["scores"] = path, path
    named = {p.name: p for p in reversed(files)}  # the shallowest file of each name
    for what, attribute, file_name in (("DET", "det", "det.png"), ("training curves", "training_curves",
                                                                   "training-curves.png"),
                                       ("compare-rules figure", "compare_figure", "perturbation-curves.png")):
        if file_name in named:
            setattr(run, attribute, named[file_name])
            run.read[what] = named[file_name]
    if not run.grids:
        grids = [p for p in files if p.name.endswith(".grid.png")]
        run.grids = grids[:MAX_GRIDS]
    run.grids = run.grids[:MAX_GRIDS]
    run.read.update({f"explain grid {i + 1}": grid for i, grid in enumerate(run.grids)})
    recorded = [Path(str(doc["checkpoint"])) for doc in (run.evaluate, run.compare, run.regions)
                if doc is not None and doc.get("checkpoint")]
    for path in [*checkpoints, *recorded]:
        meta = _checkpoint_meta(path) if path.is_file() else None
        if meta is not None:
            run.checkpoint, run.meta, run.read["checkpoint"] = path, meta, path
            break
    if run.empty:
        raise SmadlrpError(f"{folder}: nothing a report can show (no checkpoint, history.json, evaluate, "
                           "compare-rules, regions or explain output in it or its subfolders)")
    return run


def collect_runs(folders: list[Path]) -> list[RunFiles]:
    """Every run folder read; runs of the same folder name are told apart by their paths."""
    runs = [collect_run(folder) for folder in folders]
    names = [run.name for run in runs]
    if len(set(names)) < len(names):
        for run in runs:
            run.name = str(run.folder)
    return runs
