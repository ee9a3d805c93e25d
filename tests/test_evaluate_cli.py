"""evaluate on real files: group breakdowns, validation-chosen thresholds."""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from smadlrp.cli import app
from smadlrp.evaluation.thresholds import criterion_threshold

runner = CliRunner()


def _evaluate(checkpoint: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["evaluate", "-c", str(checkpoint), "--device", "cpu", *args])
    return result.exit_code, result.output


def _scores(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_by_morph_type_matches_counting_by_hand(tiny_synth: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    code, output = _evaluate(tiny_checkpoint, "--data", str(tiny_synth), "--split", "train", "--by", "morph_type",
                             "--threshold", "0.5", "--scores", str(tmp_path / "s.csv"), "--json",
                             str(tmp_path / "r.json"))
    assert code == 0, output
    with (tiny_synth / "manifest.csv").open(newline="") as fh:
        types = {str((tiny_synth / r["path"]).resolve()): r["morph_type"] for r in csv.DictReader(fh)}
    missed: dict[str, list[bool]] = defaultdict(list)
    for row in _scores(tmp_path / "s.csv"):
        if types[str(Path(row["path"]).resolve())]:
            missed[types[row["path"]]].append(float(row["score"]) < 0.5)
    report = json.loads((tmp_path / "r.json").read_text())["groups"]["morph_type"]
    by_name = {part["name"]: part for part in report["parts"]}
    assert sorted(by_name) == sorted(missed) == ["complete", "partial", "splicing"]
    for name, flags in missed.items():
        assert by_name[name]["n_morph"] == len(flags) and by_name[name]["fn"] == sum(flags)
        assert by_name[name]["apcer"] == sum(flags) / len(flags)
        assert by_name[name]["n_bonafide"] == 32  # every type against all the split's bona fide images
    assert report["apcer_ap"] == max(sum(f) / len(f) for f in missed.values())
    assert report["average"]["apcer"]["value"] == pytest.approx(sum(sum(f) / len(f) for f in missed.values()) / 3)
    assert "APCER_AP (worst morph_type)" in " ".join(output.split())


@pytest.mark.slow
def test_morph_type_breakdown_is_the_default_and_unknown_columns_are_named(tiny_synth: Path,
                                                                           tiny_checkpoint: Path) -> None:
    code, output = _evaluate(tiny_checkpoint, "--data", str(tiny_synth))
    assert code == 0 and "By morph_type" in output
    code, output = _evaluate(tiny_checkpoint, "--data", str(tiny_synth), "--by", "method")
    assert code == 2 and "--by method: the data has no such column (group columns: morph_type, morph_region" in \
        " ".join(output.split())


@pytest.mark.slow
def test_validation_criteria_pick_the_validation_threshold(tiny_synth: Path, tiny_checkpoint: Path,
                                                           tmp_path: Path) -> None:
    code, output = _evaluate(tiny_checkpoint, "--data", str(tiny_synth), "--split", "val", "--scores",
                             str(tmp_path / "val.csv"))
    assert code == 0, output
    rows = _scores(tmp_path / "val.csv")
    labels = [int(r["label"] == "morph") for r in rows]
    scores = [float(r["score"]) for r in rows]
    code, output = _evaluate(tiny_checkpoint, "--data", str(tiny_synth), "--threshold", "val-eer", "--json",
                             str(tmp_path / "r.json"))
    assert code == 0, output
    metrics = json.loads((tmp_path / "r.json").read_text())["metrics"]
    assert metrics["threshold"] == criterion_threshold(labels, scores, "eer")
    assert metrics["threshold_source"] == "validation D-EER"
    # the tiny validation split has 4 morphs: an APCER 10 % threshold needs 10, so it is refused in one line
    code, output = _evaluate(tiny_checkpoint, "--data", str(tiny_synth), "--threshold", "val-apcer10", "--by",
                             "morph_type", "--worst-species")
    assert code == 1
    assert "error: the validation split, species 'splicing': no threshold for APCER <= 10 % (needs >= 10 morphs, " \
           "split has 4)" in " ".join(output.split())
    code, output = _evaluate(tiny_checkpoint, "--data", str(tiny_synth), "--worst-species")
    assert code == 2 and "--worst-species needs an APCER criterion" in output


def test_several_test_sets_give_one_block_each_and_average_worst_rows(tiny_data: Path, tiny_synth: Path,
                                                                     tiny_checkpoint: Path, tmp_path: Path) -> None:
    common = ["--threshold", "0.5", "--bootstrap", "0"]
    code, output = _evaluate(tiny_checkpoint, "--data", str(tiny_data), "--data", str(tiny_synth), *common,
                             "--json", str(tmp_path / "both.json"), "--scores", str(tmp_path / "both.csv"))
    assert code == 0, output
    report = json.loads((tmp_path / "both.json").read_text())
    names = [Path(s["data"]).name for s in report["test_sets"]]
    assert names == [tiny_data.name, tiny_synth.name]
    for test_set in (tiny_data, tiny_synth):  # each block equals evaluating that set alone
        code, alone = _evaluate(tiny_checkpoint, "--data", str(test_set), *common, "--json", str(tmp_path / "a.json"))
        assert code == 0, alone
        single = json.loads((tmp_path / "a.json").read_text())
        (block,) = [s for s in report["test_sets"] if s["data"] == single["data"]]
        assert block["metrics"] == single["metrics"] and block["groups"] == single["groups"]
    across = report["across_sets"]
    apcers = [s["metrics"]["apcer"] for s in report["test_sets"]]
    eers = [s["metrics"]["d-eer"] for s in report["test_sets"]]
    assert across["average"]["apcer"]["value"] == pytest.approx(sum(apcers) / 2)
    assert across["worst"]["apcer"]["value"] == max(apcers)
    assert across["worst"]["d-eer"]["part"] == names[eers.index(max(eers))]
    flat = " ".join(output.split())
    assert f"on test of {tiny_data.name}" in flat and f"on test of {tiny_synth.name}" in flat and "2 test sets" in flat
    assert {row["test_set"] for row in _scores(tmp_path / "both.csv")} == set(names)
    # several protocols with one --data as their base
    code, output = _evaluate(tiny_checkpoint, "--protocol", str(tiny_synth / "manifest.csv"), "--data", str(tiny_data),
                             "--data", str(tiny_synth), *common)
    assert code == 2 and "give at most one --data" in output


def test_junit_has_one_testsuite_per_test_set(tiny_data: Path, tiny_synth: Path, tiny_checkpoint: Path,
                                              tmp_path: Path) -> None:
    code, output = _evaluate(tiny_checkpoint, "--data", str(tiny_data), "--data", str(tiny_synth), "--threshold",
                             "0.5", "--bootstrap", "0", "--fail-above", "d-eer=1e-6", "--fail-below", "auc=0",
                             "--junit", str(tmp_path / "gates.xml"))
    assert code == 1, output
    root = ET.parse(tmp_path / "gates.xml").getroot()
    suites = root.findall("testsuite")
    assert [s.get("name", "").rsplit(" of ", 1)[-1] for s in suites] == [tiny_data.name, tiny_synth.name]
    for suite in suites:  # within a suite every testcase name is unique
        names = [c.get("name") for c in suite.findall("testcase")]
        assert names == ["d-eer <= 1e-06", "auc >= 0"]
    assert root.get("tests") == "4" and int(root.get("failures", "0")) == sum(
        int(s.get("failures", "0")) for s in suites)
