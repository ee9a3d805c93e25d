"""`smadlrp predict`: scores equal evaluate's, an unreadable image is reported while the others are scored."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from smadlrp.cli import app

runner = CliRunner()


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as handle:
        return {str(Path(row["path"]).resolve()): row for row in csv.DictReader(handle)}


def test_predict_scores_equal_evaluate_scores(tiny_checkpoint: Path, tiny_data: Path, tmp_path: Path) -> None:
    common = ["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--batch-size", "5"]
    result = runner.invoke(app, ["evaluate", "--data", str(tiny_data), "--threshold", "0.5", "--scores",
                                 str(tmp_path / "evaluate.csv"), *common])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["predict", str(tiny_data / "test"), "--threshold", "0.5", "--csv",
                                 str(tmp_path / "predict.csv"), "--json", str(tmp_path / "predict.json"), *common])
    assert result.exit_code == 0, result.output
    evaluated, predicted = _rows(tmp_path / "evaluate.csv"), _rows(tmp_path / "predict.csv")
    assert evaluated.keys() == predicted.keys() and len(predicted) == 16
    for path, row in predicted.items():
        assert float(row["score"]) == float(evaluated[path]["score"]), path
        assert row["decision"] == ("morph" if float(row["score"]) >= 0.5 else "bona fide")
    report = json.loads((tmp_path / "predict.json").read_text())
    assert (report["scored"], report["failed"], report["threshold"]) == (16, 0, 0.5)


def test_an_unreadable_image_is_reported_and_the_others_scored(tiny_checkpoint: Path, tiny_data: Path,
                                                               tmp_path: Path) -> None:
    folder = tmp_path / "in"
    shutil.copytree(tiny_data / "test" / "morph", folder)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = runner.invoke(app, ["predict", str(folder), str(tmp_path / "missing.png"), "--checkpoint",
                                 str(tiny_checkpoint), "--device", "cpu", "--batch-size", "4", "--csv",
                                 str(tmp_path / "p.csv")])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 2
    assert errors[0].startswith(f"error: {folder / 'corrupt.png'}: not a readable image")
    assert errors[1] == f"error: no such file or folder: {tmp_path / 'missing.png'}"
    rows = _rows(tmp_path / "p.csv")
    scored = [row for row in rows.values() if row["score"]]
    assert len(rows) == 10 and len(scored) == 8
    assert all(0.0 <= float(row["score"]) <= 1.0 for row in scored)
    assert "stores no operating points" in " ".join(result.output.split())  # it predates them: decided at 0.5


def test_help_says_when_predict_exits_1() -> None:
    result = runner.invoke(app, ["predict", "--help"])
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 0 and "Exit code 0 when every image was scored, 1 when any could not be" in text
