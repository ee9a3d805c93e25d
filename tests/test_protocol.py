"""Protocol files: reading, validation errors naming the row, equivalence with the folder layout, leaks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from smadlrp.cli import app
from smadlrp.core.errors import SmadlrpError
from smadlrp.data.loading import DataSource, scan_split
from smadlrp.data.protocol import read_protocol, subject_leaks

runner = CliRunner()


def _folder_rows(root: Path, bonafide: str = "bonafide", attack: str = "morph") -> list[dict[str, str]]:
    """path,label,split rows for every image of a tiny folder set, paths relative to `root`."""
    rows = []
    for split in ("train", "val", "test"):
        for name, label in (("bonafide", bonafide), ("morph", attack)):
            for path in sorted((root / split / name).glob("*.png")):
                rows.append({"path": str(path.relative_to(root)), "label": label, "split": split})
    return rows


def _write(path: Path, rows: list[dict[str, str]], columns: list[str] | None = None) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _evaluate_json(tmp_path: Path, name: str, args: list[str], checkpoint: Path) -> dict[str, object]:
    out = tmp_path / f"{name}.json"
    result = runner.invoke(app, ["evaluate", "-c", str(checkpoint), *args, "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def test_mordeephy_protocol_gives_the_folder_numbers(tiny_data: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    # MorDeephy's convention: 0 = morph, 1 = bona fide; paths relative to --data
    protocol = _write(tmp_path / "mordeephy.csv", _folder_rows(tiny_data, bonafide="1", attack="0"))
    folders = _evaluate_json(tmp_path, "folders", ["--data", str(tiny_data), "--threshold", "val-eer"],
                             tiny_checkpoint)
    listed = _evaluate_json(tmp_path, "protocol", ["--protocol", str(protocol), "--data", str(tiny_data),
                                                   "--bonafide-label", "1", "--attack-label", "0",
                                                   "--threshold", "val-eer"], tiny_checkpoint)
    assert listed["metrics"] == folders["metrics"]
    assert listed["metrics"]["n_morph"] == 8 and listed["metrics"]["n_bonafide"] == 8  # type: ignore[index]


def test_paths_relative_to_the_protocol_file(tiny_data: Path) -> None:
    protocol = _write(tiny_data / "protocol.csv", _folder_rows(tiny_data))
    try:
        index = DataSource(tiny_data, read_protocol(protocol)).split("test")
        folder = scan_split(tiny_data, "test")
        assert index.class_names == folder.class_names == ["bonafide", "morph"]
        assert [(s.path, s.label) for s in index.samples] == [(s.path.resolve(), s.label) for s in folder.samples]
    finally:
        protocol.unlink()


def test_synthetic_manifest_is_a_protocol(tiny_synth: Path) -> None:
    protocol = read_protocol(tiny_synth / "manifest.csv")
    assert protocol.splits == ["test", "train", "val"]
    assert "morph_type" in protocol.group_columns and "mask_path" in protocol.group_columns
    index = DataSource(tiny_synth, protocol).split("test")
    folder = scan_split(tiny_synth, "test")
    assert sorted(s.path for s in index.samples) == sorted(s.path.resolve() for s in folder.samples)
    assert set(index.groups["morph_type"]) == set(folder.groups["morph_type"])
    assert subject_leaks((row.split, row.groups) for row in protocol.rows) == {}  # subject-disjoint by design


@pytest.mark.parametrize(("change", "message"), [
    (lambda rows: rows[3].update(path="train/bonafide/gone.png"), "line 5: image file not found"),
    (lambda rows: rows[4].update(path=rows[2]["path"]), "line 6: train/bonafide/train_bonafide_02.png is listed "
                                                        "twice (first on line 4)"),
    (lambda rows: rows[5].update(label="attack"), "line 7: label 'attack' is neither the bona fide label"),
    (lambda rows: rows[6].update(split="holdout"), "line 8: unknown split 'holdout'"),
    (lambda rows: [row.update(label="bonafide") for row in rows if row["split"] == "val"],
     "split 'val' has no attack rows"),
])
def test_bad_protocols_give_one_line_naming_the_row(tiny_data: Path, tiny_checkpoint: Path, tmp_path: Path,
                                                    change: object, message: str) -> None:
    rows = _folder_rows(tiny_data)
    change(rows)  # type: ignore[operator]
    protocol = _write(tmp_path / "bad.csv", rows)
    result = runner.invoke(app, ["evaluate", "-c", str(tiny_checkpoint), "--protocol", str(protocol), "--data",
                                 str(tiny_data), "--device", "cpu"])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.output, result.output


def test_missing_columns_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SmadlrpError, match="protocol file not found"):
        read_protocol(tmp_path / "none.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\na.png,morph\n")
    with pytest.raises(SmadlrpError, match="needs the columns path,label,split; missing path, label, split"):
        read_protocol(bad)


def test_subject_in_two_splits_is_warned_with_counts(tiny_data: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    rows = _folder_rows(tiny_data)
    for i, row in enumerate(rows):
        row["subjects"] = f"s{i}"
    rows[0]["subjects"] = "shared"  # train bona fide
    rows[-1]["subjects"] = "shared;s999"  # a test morph made from a training subject
    rows[-2]["subjects"] = "s0;s1"  # s1 is a train image too
    protocol = _write(tmp_path / "leaky.csv", rows)
    rows = [(row.split, row.groups) for row in read_protocol(protocol, base=tiny_data).rows]
    assert subject_leaks(rows) == {"s1": ["test", "train"],
                                                                           "shared": ["test", "train"]}
    result = runner.invoke(app, ["evaluate", "-c", str(tiny_checkpoint), "--protocol", str(protocol), "--data",
                                 str(tiny_data), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "2 subject(s) appear in more than one split (2 in test and train" in " ".join(result.output.split())


@pytest.mark.slow
def test_finetune_and_fit_patterns_read_a_protocol(tiny_data: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    protocol = _write(tmp_path / "p.csv", _folder_rows(tiny_data))
    result = runner.invoke(app, ["finetune", "--protocol", str(protocol), "--data", str(tiny_data), "--epochs", "1",
                                 "--batch-size", "8", "--image-size", "32", "--weights", "none",
                                 "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "best.safetensors").is_file()
    fit = runner.invoke(app, ["fit-patterns", "-c", str(tiny_checkpoint), "--protocol", str(protocol), "--data",
                              str(tiny_data), "--out", str(tmp_path / "p.safetensors"), "--max-images", "4",
                              "--device", "cpu"])
    assert fit.exit_code == 0, fit.output
