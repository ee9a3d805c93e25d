"""The commands as people type them: checkpoint discovery, the default pattern file and its automatic fit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from smadlrp.cli import app
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


def test_commands_find_the_checkpoint_and_fit_patterns_once(trained_project: Path, tiny_data: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(trained_project)
    (best,) = Path("runs").glob("*/best.safetensors")
    image = str(tiny_data / "test" / "morph" / "test_morph_00.png")
    code, output = _invoke("explain", image, "--rule", "patternnet")
    assert code == 0, output
    assert f"checkpoint: {best}" in output and "fitting patterns" in output
    pattern_file = best.parent / "patterns.safetensors"
    sets, meta = load_patterns(pattern_file)
    assert meta["split"] == "train" and sets["positive"].images == 16  # the checkpoint's training split
    written = pattern_file.stat().st_mtime_ns
    code, output = _invoke("explain", image, "--rule", "patternnet")
    assert code == 0, output
    assert "fitting patterns" not in output and f"patterns: {pattern_file}" in output
    assert pattern_file.stat().st_mtime_ns == written  # reused, not refitted
    code, output = _invoke("evaluate")
    assert code == 0, output
    assert f"data: {tiny_data}" in output and "best.safetensors on test" in output


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


def test_without_any_checkpoint_one_line_says_to_finetune(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for command in (["evaluate"], ["explain", "x.png"], ["fit-patterns"], ["info"]):
        if command[0] == "explain":
            (tmp_path / "x.png").write_bytes(b"")
        code, output = _invoke(*command)
        assert code == 1, (command, output)
        lines = output.strip().splitlines()
        assert len(lines) == 1 and "run `smadlrp finetune` first" in lines[0], (command, output)
