"""smadlrp metrics: score files of smadlrp and other tools, without a model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from smadlrp.cli import app

runner = CliRunner()


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def _json(path: Path) -> dict[str, object]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def test_metrics_on_evaluate_scores_reproduces_evaluate(tiny_synth: Path, tiny_checkpoint: Path,
                                                        tmp_path: Path) -> None:
    common = ["--bootstrap", "100", "--seed", "3"]
    for split in ("val", "train"):
        code, output = _run("evaluate", "-c", str(tiny_checkpoint), "--data", str(tiny_synth), "--split", split,
                            "--device", "cpu", "--scores", str(tmp_path / f"{split}.csv"), "--threshold", "0.4",
                            "--json", str(tmp_path / f"{split}.json"), *common)
        assert code == 0, output
    code, output = _run("metrics", str(tmp_path / "train.csv"), "--threshold", "0.4", "--by", "morph_type",
                        "--json", str(tmp_path / "m.json"), *common)
    assert code == 0, output
    evaluated = _json(tmp_path / "train.json")
    (system,) = _json(tmp_path / "m.json")["systems"]  # type: ignore[misc]
    assert system["metrics"] == evaluated["metrics"]  # every number, interval and threshold
    assert system["groups"] == evaluated["groups"]
    # a criterion on the dev file: the same threshold as evaluate's val-eer on the validation split
    code, output = _run("evaluate", "-c", str(tiny_checkpoint), "--data", str(tiny_synth), "--split", "train",
                        "--device", "cpu", "--threshold", "val-eer", "--json", str(tmp_path / "e.json"), *common)
    assert code == 0, output
    code, output = _run("metrics", str(tmp_path / "train.csv"), "--dev", str(tmp_path / "val.csv"), "--threshold",
                        "val-eer", "--json", str(tmp_path / "d.json"), *common)
    assert code == 0, output
    expected = _json(tmp_path / "e.json")["metrics"]
    (got,) = _json(tmp_path / "d.json")["systems"]  # type: ignore[misc]
    assert got["metrics"]["threshold_source"] == "dev D-EER"
    assert {k: v for k, v in got["metrics"].items() if k != "threshold_source"} == \
        {k: v for k, v in expected.items() if k != "threshold_source"}  # type: ignore[union-attr]


def _bob_file(path: Path) -> Path:
    # Bob PAD: higher = bona fide. Bona fide 0.9, 0.8, 0.7, 0.6; print attacks 0.1, 0.2, 0.65; replay 0.3, 0.75
    rows = [("s1", "bf", "True", "", 0.9), ("s2", "bf", "True", "", 0.8), ("s3", "bf", "True", "", 0.7),
            ("s4", "bf", "True", "", 0.6), ("s1", "a", "False", "print", 0.1), ("s2", "a", "False", "print", 0.2),
            ("s3", "a", "False", "print", 0.65), ("s4", "a", "False", "replay", 0.3),
            ("s1", "a", "False", "replay", 0.75)]
    lines = ["claimed_id,test_label,is_bonafide,attack_type,sample_n,score"]
    lines += [f"{c},{t},{b},{a},{i},{s}" for i, (c, t, b, a, s) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bob_file_gives_per_attack_type_rows_by_hand(tmp_path: Path) -> None:
    bob = _bob_file(tmp_path / "bob.csv")
    code, output = _run("metrics", str(bob), "--threshold", "0.5", "--json", str(tmp_path / "b.json"))
    assert code == 0, output
    (system,) = _json(tmp_path / "b.json")["systems"]  # type: ignore[misc]
    assert system["format"] == "bob" and system["negated"] is True
    # bona fide when score >= 0.5: print 0.65 and replay 0.75 are accepted -> APCER print 1/3, replay 1/2
    metrics = system["metrics"]
    assert (metrics["n_bonafide"], metrics["n_morph"], metrics["fn"], metrics["fp"]) == (4, 5, 2, 0)
    assert metrics["threshold"] == -0.5
    parts = {p["name"]: p for p in system["groups"]["attack_type"]["parts"]}
    assert sorted(parts) == ["print", "replay"]
    assert parts["print"]["apcer"] == 1 / 3 and parts["replay"]["apcer"] == 0.5
    assert parts["print"]["n_bonafide"] == parts["replay"]["n_bonafide"] == 4
    assert system["groups"]["attack_type"]["apcer_ap"] == 0.5
    assert "By attack_type" in output and "scores negated" in output


def test_two_systems_give_one_comparison_and_one_det_with_two_curves(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    files = []
    for name, gap in (("strong", 0.4), ("weak", 0.1)):
        lines = ["path,label,score"]
        for i in range(200):
            morph = i % 2
            lines.append(f"img{i}.png,{'morph' if morph else 'bonafide'},{rng.normal(0.3 + gap * morph, 0.15)!r}")
        files.append(tmp_path / f"{name}.csv")
        files[-1].write_text("\n".join(lines) + "\n")
    det = tmp_path / "det.png"
    code, output = _run("metrics", *map(str, files), "--det", str(det), "--markdown", str(tmp_path / "m.md"),
                        "--bootstrap", "50")
    assert code == 0, output
    assert "Systems" in output and "## Systems" in (tmp_path / "m.md").read_text()
    pixels = np.asarray(Image.open(det).convert("RGB")).reshape(-1, 3).astype(int)
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):  # matplotlib's first two line colours
        assert (np.abs(pixels - colour).sum(axis=1) < 30).sum() > 200, colour
    assert (np.abs(pixels - (0x2C, 0xA0, 0x2C)).sum(axis=1) < 30).sum() < 20  # no third curve


def test_bad_score_files_are_one_line(tmp_path: Path) -> None:
    no_score = tmp_path / "noscore.csv"
    no_score.write_text("path,label,prob\na.png,morph,0.3\n")
    single = tmp_path / "dev.csv"
    single.write_text("path,label,score\na.png,morph,0.3\nb.png,morph,0.4\n")
    good = tmp_path / "good.csv"
    good.write_text("path,label,score\na.png,morph,0.7\nb.png,bonafide,0.2\n")
    bad_label = tmp_path / "label.csv"
    bad_label.write_text("path,label,score\na.png,attack,0.7\n")
    cases = [
        ([str(no_score)], f"error: {no_score}: no score column (header: path,label,prob)"),
        ([str(good), "--dev", str(single), "--threshold", "val-eer"],
         f"error: --dev {single}: no bona fide rows; choosing a threshold needs both classes"),
        ([str(bad_label)], f"error: {bad_label}, line 2: label 'attack' is neither the bona fide label 'bonafide' "
                           "nor the attack label 'morph'"),
        ([str(good), "--threshold", "val-eer"], "error: --threshold val-eer needs the system's development scores"),
    ]
    for args, message in cases:
        code, output = _run("metrics", *args)
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert code != 0 and len(errors) == 1 and errors[0].startswith(message), output
