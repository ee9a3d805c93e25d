"""The work behind `smadlrp evaluate`: score test sets at one threshold, summarise, break down, gate and write.

`evaluate_sets` is what the command does, as one call; no printing here (the CLI renders what it returns).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from smadlrp.core.distributed import Ranks, current
from smadlrp.core.errors import UsageError
from smadlrp.data.loading import DataSource, ImageDataset, SplitIndex
from smadlrp.data.perturb import Perturbation
from smadlrp.detector.checkpoint import CheckpointMeta
from smadlrp.detector.inference import Predictions, predict_dataset
from smadlrp.evaluation.metrics import (
    Breakdown,
    Gate,
    GateResult,
    IntervalOptions,
    MetricsSummary,
    det_points,
    gate_results,
    group_breakdown,
    summarize,
)
from smadlrp.evaluation.plots import plot_conditions, plot_det
from smadlrp.evaluation.report import breakdown_markdown, gates_markdown, junit_xml, summary_markdown, to_jsonable
from smadlrp.evaluation.scores import scores_csv
from smadlrp.evaluation.thresholds import LabelledScores, Threshold, resolve_threshold

CLEAN = "clean"  # the condition of the unperturbed images


class Progress(Protocol):
    """Where scoring reports how far it got: a split (under a perturbation spec, or None) starts with this
    process's share of its images, then batches advance."""

    def start(self, split: str, condition: str | None, share: int, total: int) -> None: ...

    def advance(self, n: int) -> None: ...


class _Silent:
    def start(self, split: str, condition: str | None, share: int, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


@dataclass(frozen=True)
class SetResult:
    """One test set's scores and metrics, clean and under each perturbation (by its spec)."""

    name: str
    source: DataSource
    preds: Predictions
    index: SplitIndex
    summary: MetricsSummary
    breakdowns: list[Breakdown]
    perturbed: dict[str, tuple[Predictions, MetricsSummary]] = field(default_factory=dict)

    def conditions(self) -> dict[str, tuple[Predictions, MetricsSummary]]:
        """The clean scores and those under each perturbation, clean first."""
        return {CLEAN: (self.preds, self.summary), **self.perturbed}

    def counts(self, meta: CheckpointMeta) -> str:
        """E.g. "156 bonafide, 156 morph"."""
        return f"{self.summary.n_bonafide} {meta.class_names[1 - meta.attack_index]}, " \
               f"{self.summary.n_morph} {meta.attack_class}"


@dataclass(frozen=True)
class Evaluation:
    """Every test set of one checkpoint at one threshold (`sets` in the order given)."""

    checkpoint: Path
    split: str
    threshold: Threshold
    sets: list[SetResult]
    perturbations: tuple[str, ...] = ()  # the specs, in the order given

    @property
    def title(self) -> str:
        return f"{self.checkpoint.name} on {self.split}"

    def set_title(self, result: SetResult, meta: CheckpointMeta) -> str:
        """The heading of one test set's report: its name with several sets, its counts with one."""
        return f"{self.title} of {result.name}" if len(self.sets) > 1 else \
            f"{self.title} ({result.counts(meta)})"

    def across(self) -> Breakdown:
        """The test sets side by side (one row each)."""
        return Breakdown("test set", tuple((r.name, r.summary) for r in self.sets), species=False)

    def named(self) -> dict[str, tuple[Predictions, MetricsSummary]]:
        """One entry per test set and image condition, named by what distinguishes them (the checkpoint's stem
        when there is one of each)."""
        several = len(self.sets) > 1
        return {" ".join(part for part in (r.name if several else "", condition if self.perturbations else "")
                         if part) or self.checkpoint.stem: scored
                for r in self.sets for condition, scored in r.conditions().items()}

    def gates(self, above: Sequence[Gate], below: Sequence[Gate]) -> dict[str, list[GateResult]]:
        """The gates checked on each test set (by name); a failure names its set when there are several."""
        several = len(self.sets) > 1
        return {r.name: [_named_gate(g, r.name if several else None) for g in gate_results(r.summary, above, below)]
                for r in self.sets}

    def markdown(self, meta: CheckpointMeta, gates: Mapping[str, list[GateResult]]) -> str:
        """The Markdown report: each set's summary and breakdowns, the sets side by side, the gates."""
        report = "".join(summary_markdown(r.summary, r.breakdowns, self.set_title(r, meta)) for r in self.sets)
        if len(self.sets) > 1:
            report += "\n".join(["", "## Test sets", "", *breakdown_markdown(self.across(), None)]) + "\n"
        checked = [g for results in gates.values() for g in results]
        return report + (f"\n{gates_markdown(checked)}" if checked else "")

    def junit(self, gates: Mapping[str, list[GateResult]]) -> str:
        """The gates as JUnit XML, one testsuite per test set (testcase names are unique within each)."""
        several = len(self.sets) > 1
        return junit_xml({f"{self.title} of {name}" if several else self.title: checked
                          for name, checked in gates.items()})

    def scores_csv(self) -> str:
        """The scores of every test set as one CSV: path,label,score, the group columns, test_set with several."""
        columns = list(dict.fromkeys(c for r in self.sets for c in r.index.groups))
        paths, labels, scores = [], [], []
        groups: dict[str, list[str]] = {c: [] for c in columns}
        if len(self.sets) > 1:
            groups["test_set"] = []
        for r in self.sets:
            paths += [r.index.samples[i].path for i in r.preds.indices]
            labels += r.preds.labels.tolist()
            scores += r.preds.scores.tolist()
            for column in columns:
                values = r.index.groups.get(column)
                groups[column] += [values[i] if values is not None else "" for i in r.preds.indices]
            if len(self.sets) > 1:
                groups["test_set"] += [r.name] * len(r.preds.indices)
        return scores_csv(paths, labels, scores, groups)

    def plot_det(self, path: Path) -> None:
        """The DET curve of every set and condition as a PNG."""
        named = self.named()
        plot_det({name: det_points(p.labels, p.scores) for name, (p, _) in named.items()}, path,
                 eer={name: s.eer.value for name, (_, s) in named.items() if s.eer.value is not None})

    def plot_robustness(self, path: Path) -> None:
        """D-EER and APCER@BPCER10 per set and condition as a PNG bar chart."""
        plot_conditions({name: {"D-EER": s.eer.value, "APCER@BPCER10": s.value("apcer@bpcer10")}
                         for name, (_, s) in self.named().items()}, path,
                        title=f"{self.checkpoint.stem} on {self.split}: error per image condition")

    def as_json(self, gates: Mapping[str, list[GateResult]]) -> dict[str, Any]:
        """What `evaluate --json` writes (without the number of processes)."""
        failures = [g.failure for results in gates.values() for g in results if g.failure is not None]
        sets = [{"data": r.source.name, "metrics": r.summary, "groups": {b.label: b for b in r.breakdowns},
                 **({"perturbed": {spec: s for spec, (_, s) in r.perturbed.items()}} if self.perturbations else {})}
                for r in self.sets]
        head = {"checkpoint": str(self.checkpoint), "split": self.split}
        payload = {**head, **sets[0]} if len(sets) == 1 else \
            {**head, "test_sets": sets, "across_sets": self.across()}
        return to_jsonable({**payload, "gates": {"failed": failures}})


def evaluate_sets(model: nn.Module, meta: CheckpointMeta, checkpoint: Path, sources: Mapping[str, DataSource], *,
                  split: str = "test", threshold: str = "stored", by: Sequence[str] | None = None,
                  worst_species: str | None = None, perturbations: Sequence[Perturbation] = (),
                  intervals: Callable[[SplitIndex, Predictions], IntervalOptions | None] = lambda index, preds: None,
                  batch_size: int = 64, workers: int = 0, seed: int = 0, device: torch.device | None = None,
                  ranks: Ranks | None = None, progress: Progress | None = None,
                  notify: Callable[[str], None] = lambda message: None,
                  on_index: Callable[[SplitIndex], None] = lambda index: None) -> Evaluation | None:
    """Score `split` of every test set in `sources` (name -> data) with `model` and summarise each at one
    threshold: `threshold` as `resolve_threshold` reads it (a `val-` criterion is chosen on the validation split of
    the first set; with `worst_species`, a group column, for the worst group). `by`: group columns to break the
    metrics down by (default: morph_type when the data has it). Each perturbation scores the split once more at
    the same threshold. `on_index` sees each split's images before they are scored.

    Under torchrun every rank scores a share; rank 0 gets the Evaluation, the others None."""
    ranks = ranks or current()
    device = device or torch.device("cpu")
    progress = progress or _Silent()

    def score(source: DataSource, name: str, perturbation: Perturbation | None = None) -> tuple[Predictions,
                                                                                                SplitIndex]:
        index = source.split(name, meta.class_names, meta.attack_class, warn=notify)
        on_index(index)
        dataset = ImageDataset(index.samples, meta.input_size, meta.mean, meta.std, perturb=perturbation,
                               perturb_seed=seed)
        condition = perturbation.spec if perturbation else None
        preds = predict_dataset(model, dataset, batch_size, device, meta.attack_index, workers=workers, ranks=ranks,
                                on_start=lambda share: progress.start(name, condition, share, len(dataset)),
                                on_batch=progress.advance)
        return preds, index

    def validation() -> LabelledScores:
        preds, index = score(next(iter(sources.values())), "val")
        groups = group_values(index, preds, worst_species) if worst_species is not None else None
        return LabelledScores(preds.labels, preds.scores, "the validation split", groups)

    chosen = resolve_threshold(threshold, stored=meta.operating_points, stored_in=str(checkpoint),
                               labelled=validation, notify=notify)
    results = []
    for name, source in sources.items():
        preds, index = score(source, split)
        perturbed = {p.spec: score(source, split, p)[0] for p in perturbations}
        if ranks.is_main:
            result = _summarise(name, source, preds, index, chosen, by, intervals(index, preds))
            result.perturbed.update({spec: (p, summarize(p.labels, p.scores, chosen.value,
                                                         threshold_source=chosen.source,
                                                         intervals=intervals(index, p)))
                                     for spec, p in perturbed.items()})
            results.append(result)
    if not ranks.is_main:
        return None
    return Evaluation(checkpoint, split, chosen, results, tuple(p.spec for p in perturbations))


def group_values(index: SplitIndex, preds: Predictions, column: str) -> list[str]:
    """The `column` value of each scored image (in score order); UsageError naming the columns the data has."""
    if column not in index.groups:
        have = ", ".join(index.groups) or "none (folders without a manifest.csv, or a protocol without extra columns)"
        raise UsageError(f"--by {column}: the data has no such column (group columns: {have})")
    values = index.groups[column]
    return [values[i] for i in preds.indices]


def _summarise(name: str, source: DataSource, preds: Predictions, index: SplitIndex, threshold: Threshold,
               by: Sequence[str] | None, options: IntervalOptions | None) -> SetResult:
    """The metrics of one test set at the shared threshold, with its group breakdowns."""
    t, where = threshold.value, threshold.source
    summary = summarize(preds.labels, preds.scores, t, threshold_source=where, intervals=options)
    columns = list(by or (["morph_type"] if "morph_type" in index.groups else []))
    breakdowns = [group_breakdown(preds.labels, preds.scores, group_values(index, preds, column), t, column=column,
                                  threshold_source=where, intervals=options) for column in columns]
    return SetResult(name, source, preds, index, summary, breakdowns)


def _named_gate(gate: GateResult, test_set: str | None) -> GateResult:
    """A gate result whose failure names its test set (when there are several)."""
    if test_set is None or gate.failure is None:
        return gate
    return replace(gate, failure=f"{test_set}: {gate.failure}")


def interval_options(ci: float, bootstrap: int, seed: int) -> Callable[[SplitIndex, Predictions],
                                                                      IntervalOptions | None]:
    """--ci/--bootstrap/--seed as the IntervalOptions of each scored split: the bootstrap resamples subjects (each
    image's first subject id) when the data names them, else images. None with ci 0."""
    def options(index: SplitIndex, preds: Predictions) -> IntervalOptions | None:
        subjects = index.subjects()
        first = [subjects[i][0] if subjects[i] else "" for i in preds.indices]
        return IntervalOptions.over_subjects(ci, bootstrap, seed, first)
    return options
