"""The commands as people type them: checkpoint discovery, the default pattern file and its automatic fit, the
stored operating points."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from smadlrp.cli import app
from smadlrp.detector.checkpoint import load_meta
from smadlrp.evaluation.thresholds import operating_points
from smadlrp.lrp.patterns import load_patterns

runner = CliRunner()


def _invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def trained_project(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder in which `smadlrp finetune --full --epochs 2` ran (into ./runs/)."""
    project = tmp_path_factory.mktemp("project")
    old = Path.cwd()
    os.chdir(project)
    try:
        code, output = _invoke("finetune", "--full", "--epochs", "2", "--data", str(tiny_data), "--image-size", "32",
                               "--batch-size", "8", "--weights", "none")
    finally:
        os.chdir(old)
    assert code == 0, output
    return project


@pytest.mark.slow
def test_commands_find_the_checkpoint_and_fit_patterns_once(trained_project: Path, tiny_data: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(trained_project)
    (best,) = Path("runs").glob("*/best.safetensors")
    image = str(tiny_data / "test" / "morph" / "test_morph_00.png")
    code, output = _invoke("explain", image, "--rule", "patternnet")
    assert code == 0, output
    assert f"checkpoint: {best}" in output and "fitting patterns" in output
    (row,) = [line for line in output.splitlines() if " patternnet " in line]  # the table row of the image
    assert row.split()[-2:] == ["patternnet", "signal"]  # a signal estimate: no relevance sum shown
    pattern_file = best.parent / "patterns.safetensors"
    sets, meta = load_patterns(pattern_file)
    assert meta["split"] == "train" and sets["positive"].images == 16  # the checkpoint's training split
    written = pattern_file.stat().st_mtime_ns
    code, output = _invoke("explain", image, "--rule", "patternnet")
    assert code == 0, output
    assert "fitting patterns" not in output and f"patterns: {pattern_file}" in output
    assert pattern_file.stat().st_mtime_ns == written  # reused, not refitted
    code, output = _invoke("explain", image, "--rule", "patternnet", "--pattern-kind", "all")
    assert code == 0, output
    assert "fitting patterns" in output  # the file lacked the linear estimator: refitted with both
    assert set(load_patterns(pattern_file)[0]) == {"positive", "all"}
    code, output = _invoke("evaluate")
    assert code == 0, output
    assert f"data: {tiny_data}" in output and "best.safetensors on test" in output


@pytest.mark.slow
def test_fit_patterns_writes_beside_the_checkpoint_by_default(trained_project: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(trained_project)
    (best,) = Path("runs").glob("*/best.safetensors")
    code, output = _invoke("fit-patterns", "--kind", "all", "--max-images", "4")
    assert code == 0, output
    assert f"wrote {best.parent / 'patterns.safetensors'}" in output
    assert list(load_patterns(best.parent / "patterns.safetensors")[0]) == ["all"]


def test_newest_checkpoint_wins(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for i, name in enumerate(("b-old", "a-new")):
        (tmp_path / "runs" / name).mkdir(parents=True)
        target = tmp_path / "runs" / name / "best.safetensors"
        target.write_bytes(tiny_checkpoint.read_bytes())
        os.utime(target, ns=(10**18 + i, 10**18 + i))
    code, output = _invoke("info")
    assert code == 0, output
    assert "checkpoint: runs/a-new/best.safetensors" in output


@pytest.mark.slow
def test_a_random_backbone_trains_every_layer_unless_head_only_is_asked(tiny_data: Path, tmp_path: Path) -> None:
    common = ["finetune", "--data", str(tiny_data), "--epochs", "1", "--image-size", "32", "--weights", "none",
              "--batch-size", "16"]
    code, output = _invoke(*common, "--out", str(tmp_path / "default"))
    assert code == 0, output
    assert "so every layer is trained" in output and "vgg_compact (all layers)" in output
    assert load_meta(tmp_path / "default" / "best.safetensors").training["full"] is True
    code, output = _invoke(*common, "--head-only", "--out", str(tmp_path / "head"))
    assert code == 0, output
    assert "a linear probe of random features), as --head-only asks" in " ".join(output.split())
    assert load_meta(tmp_path / "head" / "best.safetensors").training["full"] is False


def test_without_any_checkpoint_one_line_says_to_finetune(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for command in (["evaluate"], ["explain", "x.png"], ["fit-patterns"], ["info"]):
        if command[0] == "explain":
            (tmp_path / "x.png").write_bytes(b"")
        code, output = _invoke(*command)
        assert code == 1, (command, output)
        lines = output.strip().splitlines()
        assert len(lines) == 1 and "run `smadlrp finetune` first" in lines[0], (command, output)


def test_operating_points_match_hand_computation() -> None:
    morph = [0.1 * i for i in range(1, 11)]  # 0.1 ... 1.0
    bona = [0.05 * i for i in range(10)]  # 0.0 ... 0.45
    stored = operating_points([1] * 10 + [0] * 10, morph + bona)
    assert (stored["n_morph"], stored["n_bonafide"]) == (10, 10)
    apcer10 = stored["points"]["max-apcer10"]  # k = floor(0.1 * 10) = 1: t = second-lowest morph score
    assert apcer10["threshold"] == pytest.approx(0.2) and apcer10["apcer"] == 0.1 and apcer10["bpcer"] == 0.6
    bpcer10 = stored["points"]["max-bpcer10"]  # just above the second-highest bona fide score, 0.4
    assert 0.4 < bpcer10["threshold"] < 0.4 + 1e-12 and bpcer10["bpcer"] == 0.1 and bpcer10["apcer"] == 0.4
    assert stored["points"]["max-apcer5"] == {"threshold": None, "reason": stored["points"]["max-apcer5"]["reason"]}
    assert "needs >= 20 morphs, split has 10" in stored["points"]["max-apcer5"]["reason"]
    eer = stored["points"]["eer"]
    # at t = 0.35 three morphs (0.1, 0.2, 0.3) are below and three bona fide (0.35, 0.4, 0.45) at or above it
    assert eer["threshold"] == pytest.approx(0.35) and eer["apcer"] == eer["bpcer"] == pytest.approx(0.3)


@pytest.mark.slow
def test_finetune_stores_operating_points_that_evaluate_uses(trained_project: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(trained_project)
    (best,) = Path("runs").glob("*/best.safetensors")
    meta = load_meta(best)
    assert meta.operating_points["split"] == "val" and meta.operating_points["epoch"] == meta.metrics["epoch"]
    assert (meta.operating_points["n_bonafide"], meta.operating_points["n_morph"]) == (8, 8)
    code, output = _invoke("info")
    assert code == 0 and "Stored operating points (val split" in output and "APCER <= 10 %" in output
    runs = {}
    for name, extra in (("stored", []), ("val-eer", ["--threshold", "val-eer"])):
        code, output = _invoke("evaluate", "--json", str(tmp_path / f"{name}.json"), *extra)
        assert code == 0, output
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())["metrics"]
    assert runs["stored"]["threshold_source"].startswith("stored val D-EER")
    assert runs["val-eer"]["threshold_source"] == "validation D-EER"
    assert runs["stored"]["threshold"] == pytest.approx(runs["val-eer"]["threshold"], abs=1e-6)
    for rate in ("apcer", "bpcer", "tp", "fp"):
        assert runs["stored"][rate] == runs["val-eer"][rate], rate
    code, output = _invoke("evaluate", "--threshold", "apcer10")  # 8 validation morphs cannot support it
    assert code == 1 and "the stored operating point max-apcer10 was not estimable" in output


def test_checkpoints_without_stored_points_fall_back_to_val_eer(tiny_checkpoint: Path, tiny_data: Path) -> None:
    args = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_data)]
    code, output = _invoke(*args)
    assert code == 0, output
    flat = " ".join(output.split())  # rich wraps lines at the terminal width
    assert "stores no operating points" in flat and "validation D-EER" in flat
    code, output = _invoke(*args, "--threshold", "bpcer1")
    assert code == 1 and "use --threshold val-max-bpcer1 or a number" in output
    code, output = _invoke(*args, "--threshold", "middle")
    assert code == 2 and "use a number in [0, 1], stored, a stored operating point (eer, max-apcer10" in output
