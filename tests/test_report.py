"""Rich tables, Markdown, JSON values and figures rendered from hand-checked metrics."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from rich.table import Table

from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.evaluation.metrics import ConfusionMatrix, bpcer_at_apcer, d_eer, det_points, group_breakdown, summarize
from smadlrp.evaluation.plots import plot_det, plot_training_curves, probit
from smadlrp.evaluation.report import (
    breakdown_table,
    confusion_table,
    epoch_table,
    metrics_table,
    summary_markdown,
    to_jsonable,
)

# bona fide {0.2, 0.5}, morph {0.5, 0.8}: D-EER 25 % at t = 0.65 (see test_metrics); at t = 0.5:
# TP 2 (0.5, 0.8), FN 0, FP 1 (0.5), TN 1 (0.2).
LABELS = np.array([0, 0, 1, 1])
SCORES = np.array([0.2, 0.5, 0.5, 0.8])
GROUPS = ["", "", "complete", "splicing"]


def _text(table: Table) -> list[str]:
    console = Console(width=160, record=True, color_system=None)
    console.print(table)
    return console.export_text().splitlines()


def _line_with(lines: list[str], needle: str) -> str:
    (line,) = [line for line in lines if needle in line]
    return line


def test_confusion_table_rows_are_true_classes_with_named_cells() -> None:
    lines = _text(confusion_table(ConfusionMatrix(tp=7, tn=11, fp=3, fn=2)))
    morph_row, bona_row = _line_with(lines, "TP 7"), _line_with(lines, "TN 11")
    assert morph_row.index("morph (attack)") < morph_row.index("TP 7") < morph_row.index("FN 2")
    assert bona_row.index("bona fide") < bona_row.index("FP 3") < bona_row.index("TN 11")
    assert "APCER 22.22 %" in morph_row and "BPCER 21.43 %" in bona_row  # 2 / 9 and 3 / 14


def test_metrics_table_shows_percentages_thresholds_and_not_estimable_reasons() -> None:
    lines = _text(metrics_table(summarize(LABELS, SCORES, 0.5, threshold_source="fixed")))
    assert "25.00 %" in _line_with(lines, "d-eer") and "t = 0.6500" in _line_with(lines, "d-eer")
    assert "50.00 %" in _line_with(lines, "│ bpcer  ")  # BPCER at t = 0.5 counts the bona fide 0.5
    assert "n/a │ needs >= 100 morphs, split has 2 " in _line_with(lines, "bpcer100")
    assert "d-eer *" in _line_with(lines, "d-eer") and "bpcer *" not in _line_with(lines, "│ bpcer  ")
    assert any("oracle" in line for line in lines)


def _by_type(threshold: float) -> object:
    return group_breakdown(LABELS, SCORES, GROUPS, threshold, column="morph_type", threshold_source="fixed")


def test_breakdown_table_rows_average_worst_and_apcer_ap() -> None:
    pooled = summarize(LABELS, SCORES, 0.6, threshold_source="fixed")
    lines = _text(breakdown_table(_by_type(0.6), pooled, title="By morph_type"))  # type: ignore[arg-type]
    assert "100.00 % (1 missed)" in _line_with(lines, "│ complete")
    assert "0.00 % (0 missed)" in _line_with(lines, "│ splicing")
    assert "50.00 %" in _line_with(lines, "Average") and "n/a" in _line_with(lines, "Average")
    assert "100.00 % (complete)" in _line_with(lines, "Worst")
    caption = " ".join(" ".join(lines).split())
    assert "APCER_AP (worst morph_type) 100.00 % (complete), pooled APCER 50.00 %" in caption
    assert "BPCER10 *" in " ".join(lines) and " BPCER " not in " ".join(lines)  # the shared BPCER is not repeated


def test_epoch_table_renders_values_and_gaps() -> None:
    history: list[dict[str, float | None]] = [
        {"epoch": 1, "train_loss": 0.6931, "train_acc": 0.5, "val_loss": 0.7, "val_acc": 0.45,
         "apcer": 0.5, "bpcer": 0.6, "d_eer": None},
        {"epoch": 2, "train_loss": 0.25, "train_acc": 0.9, "val_loss": 0.3, "val_acc": 0.875,
         "apcer": 0.125, "bpcer": 0.1, "d_eer": 0.1125},
    ]  # fmt: skip
    lines = _text(epoch_table(history))
    first, second = _line_with(lines, "0.6931"), _line_with(lines, "0.2500")
    assert "n/a" in first and "45.00 %" in first
    assert "87.50 %" in second and "11.25 %" in second and "12.50 %" in second


def test_summary_markdown_contains_the_numbers() -> None:
    summary = summarize(LABELS, SCORES, 0.5, threshold_source="validation D-EER")
    text = summary_markdown(summary, [_by_type(0.6)], "Test split")  # type: ignore[list-item]
    assert text.startswith("## Test split\n")
    assert "| `d-eer` \\* | APCER = BPCER | 25.00 % | t = 0.6500 |" in text
    assert "| `bpcer10` \\* | BPCER @ APCER 10 % | n/a | needs >= 10 morphs, split has 2 |" in text
    assert "| morph (attack) | TP 2 | FN 0 | APCER 0.00 % |" in text
    assert "| bona fide | FP 1 | TN 1 | BPCER 50.00 % |" in text
    assert "| complete | 1 | 2 | 100.00 % (1 missed) |" in text
    assert "| **Worst** |  |  | **100.00 % (complete)** |" in text
    assert "threshold t = 0.5000 (validation D-EER)" in text


@dataclass(frozen=True)
class _Record:
    name: str
    values: np.ndarray
    limit: float


def test_to_jsonable_gives_strict_json() -> None:
    summary = summarize(LABELS, SCORES, 0.5, threshold_source="fixed")
    loaded = json.loads(json.dumps(to_jsonable(summary.as_dict()), allow_nan=False))
    assert loaded["d-eer"] == pytest.approx(0.25) and loaded["bpcer100"] is None and loaded["tp"] == 2
    record = _Record("r", np.array([np.float32(0.5), math.nan]), math.inf)
    assert to_jsonable({"r": record, "n": np.int64(3), "p": Path("a/b")}) == {
        "r": {"name": "r", "values": [0.5, None], "limit": "inf"},
        "n": 3,
        "p": "a/b",
    }
    assert to_jsonable(bpcer_at_apcer(LABELS, SCORES, 1.0))["threshold"] == "inf"
    assert to_jsonable(summary) == loaded  # rendered through as_dict()
    by_type = json.loads(json.dumps(to_jsonable(_by_type(0.6)), allow_nan=False))
    assert (by_type["apcer_ap"], by_type["apcer_ap_part"]) == (1.0, "complete")
    assert by_type["worst"]["apcer"] == {"value": 1.0, "part": "complete", "reason": None}
    assert [part["name"] for part in by_type["parts"]] == ["complete", "splicing"]
    assert by_type["parts"][0]["d-eer"] == d_eer([0, 0, 1], [0.2, 0.5, 0.5]).value
    assert by_type["average"]["bpcer10"]["value"] is None
    with pytest.raises(TypeError, match="object"):
        to_jsonable(object())


def test_probit_known_values_and_clipping() -> None:
    assert probit([0.5, 0.975, 0.025]) == pytest.approx([0.0, 1.959964, -1.959964], abs=1e-6)
    ends = probit([0.0, 1.0])
    assert np.all(np.isfinite(ends)) and ends[0] == pytest.approx(-ends[1]) and ends[0] < -4.0


def _assert_png(path: Path, width: int, height: int) -> None:
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG" and image.size == (width, height)
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_plot_det_writes_a_decodable_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = rng.normal(labels * 1.5, 1.0)
    curves = {"model": det_points(labels, scores), "perfect": det_points(labels, labels + 0.1 * scores)}
    eer = {"model": d_eer(labels, scores).value or 0.0}
    out = plot_det(curves, tmp_path / "det.png", eer=eer)
    _assert_png(out, 900, 900)  # 6 x 6 inches at 150 dpi


def test_plot_det_rejects_bad_requests(tmp_path: Path) -> None:
    curve = det_points(LABELS, SCORES)
    with pytest.raises(UsageError, match="suffix 'txt'"):
        plot_det({"a": curve}, tmp_path / "det.txt")
    with pytest.raises(SmadlrpError, match="no DET curve"):
        plot_det({}, tmp_path / "det.png")
    with pytest.raises(ValueError, match="not plotted: b"):
        plot_det({"a": curve}, tmp_path / "det.png", eer={"b": 0.1})
    assert list(tmp_path.iterdir()) == []


def test_plot_training_curves_writes_a_decodable_png(tmp_path: Path) -> None:
    history = [
        {"epoch": e, "train_loss": 1 / e, "train_acc": 1 - 0.4 / e, "val_loss": 1.1 / e, "val_acc": 1 - 0.5 / e,
         "apcer": 0.3 / e, "bpcer": 0.2 / e, "d_eer": None if e == 2 else 0.25 / e}
        for e in range(1, 4)
    ]  # fmt: skip
    out = plot_training_curves(history, tmp_path / "curves.png")
    _assert_png(out, 1950, 570)  # 13 x 3.8 inches at 150 dpi
    with pytest.raises(SmadlrpError, match="history is empty"):
        plot_training_curves([], tmp_path / "empty.png")
