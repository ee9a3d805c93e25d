"""The report's Errors section (`report --explain-errors N`): per run, the N most confident false accepts and false
rejects at the threshold of its evaluate JSON, read from its `evaluate --scores` file, each with the LRP heatmap of
the attack class. It is the only part of the report that loads a model (the run's checkpoint), and only when asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from smadlrp.detector import checkpoint
from smadlrp.evaluation.scores import read_scores, score_paths
from smadlrp.report.build import Section
from smadlrp.report.collect import RunFiles
from smadlrp.report.sheet import BONA_FIDE, SHEET_RULE, colour_scale_text, heatmap_figures, heatmaps

ERRORS_RULE = SHEET_RULE
FALSE_ACCEPT, FALSE_REJECT = "false accept", "false reject"


@dataclass(frozen=True)
class ErrorCase:
    """One misclassified image: what kind of error, its file, its score (and the score's text in the file), how the
    score stands to the threshold, and its heatmap figures (sheet.heatmap_figures)."""

    what: str
    name: str
    score: float
    text: str
    relation: str
    figures: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class ErrorGroup:
    """A run's false accepts or false rejects, most confident first (rendered by the macro error_group)."""

    title: str
    attack: str
    threshold: float
    cases: list[ErrorCase]
    kind: str = "errors"


def confident_errors(labels: npt.ArrayLike, scores: npt.ArrayLike, threshold: float,
                     n: int) -> tuple[list[int], list[int]]:
    """Row positions of the `n` most confident false accepts (label 1 scored below `threshold`, lowest score first)
    and false rejects (label 0 scored at or above it, highest first); ties keep the file's order."""
    y, s = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    accepts = sorted((i for i in range(len(y)) if y[i] == 1 and s[i] < threshold), key=lambda i: s[i])
    rejects = sorted((i for i in range(len(y)) if y[i] == 0 and s[i] >= threshold), key=lambda i: -s[i])
    return accepts[:n], rejects[:n]


def _image(recorded: str, scores_file: Path) -> Path:
    """A score file's path: as recorded (absolute, or relative to the working folder), else beside the file."""
    given = Path(recorded)
    return given if given.is_file() or given.is_absolute() else scores_file.parent / given


def _missing(run: RunFiles) -> str | None:
    if run.scores is None:
        return (f"{run.name}: no score file: evaluate --scores FILE (with --json, into the run folder) adds its "
                "most confident errors.")
    if run.evaluate is None:
        return f"{run.name}: no evaluate --json output found (its threshold decides what is an error)."
    if run.checkpoint is None:
        return f"{run.name}: no checkpoint (run/best.safetensors, written by finetune) to explain the errors with."
    return None


def run_errors(run: RunFiles, n: int, rule: str, *, device: torch.device,
               batch_size: int = 16) -> tuple[list[ErrorGroup], list[str]]:
    """A run's two groups of errors with their heatmaps, and lines for images that could not be found."""
    assert run.scores is not None and run.evaluate is not None and run.checkpoint is not None
    threshold = float(run.evaluate.get("test_sets", [run.evaluate])[0]["metrics"]["threshold"])
    found = read_scores(run.scores)
    paths = [_image(p, run.scores) for p in score_paths(run.scores)]
    accepts, rejects = confident_errors(found.labels, found.scores, threshold, n)
    absent = [str(paths[i]) for i in accepts + rejects if not paths[i].is_file()]
    chosen = [i for i in accepts + rejects if paths[i].is_file()]
    model, meta = checkpoint.load_checkpoint(run.checkpoint, device)
    maps = dict(zip(chosen, heatmaps(model, meta, [paths[i] for i in chosen], rule, batch_size=batch_size,
                                     device=device, prepare=None) if chosen else [], strict=True))
    attack, below = meta.attack_class, found.scores < threshold
    groups = []
    for what, rows, total, relation, order in (
            (FALSE_ACCEPT, accepts, np.sum(below & (found.labels == 1)), "<",
             f"{attack} images scored below the threshold, lowest P({attack}) first"),
            (FALSE_REJECT, rejects, np.sum(~below & (found.labels == 0)), "≥",
             f"{BONA_FIDE} images scored at or above it, highest P({attack}) first")):
        cases = [ErrorCase(what, paths[i].name, float(found.scores[i]), repr(float(found.scores[i])), relation,
                           heatmap_figures(*maps[i], attack, of=f"{paths[i].name} ({what})"))
                 for i in rows if i in maps]
        groups.append(ErrorGroup(f"{run.name}: {what}s ({order}): {len(cases)} of {total} shown", attack,
                                 threshold, cases))
    return groups, [f"{run.name}: image not found: {path}" for path in absent]


def errors_section(runs: Sequence[RunFiles], n: int, rule: str = ERRORS_RULE, *,
                   device: torch.device | None = None) -> Section:
    """The Errors section of the report: each run's `n` most confident false accepts and false rejects, explained
    under `rule` (checked by sheet.check_rule), or a line naming what the run lacks."""
    attack = next((r.meta.attack_class for r in runs if r.meta is not None), "morph")
    section = Section("errors", "Errors", f"The {n} most confident errors of each run at the threshold its evaluate "
                      f"--json used, from its evaluate --scores file. Each image shows the Layer-wise Relevance "
                      f"Propagation of the {attack} output (rule {rule}) over a grey copy of the image the detector "
                      f"saw, and alone, enlarged pixel for pixel. " + colour_scale_text(attack))
    for run in runs:
        lacking = _missing(run)
        if lacking is not None:
            section.missing.append(lacking)
            continue
        groups, absent = run_errors(run, n, rule, device=device or torch.device("cpu"))
        section.items += groups
        section.missing += absent
    return section
