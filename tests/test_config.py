"""Project configuration and the CI job a bare `smadlrp evaluate` runs: gates, JUnit, GitHub Actions output."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from smadlrp.cli import app
from smadlrp.core.config import ProjectConfig, load_config
from smadlrp.core.errors import SmadlrpError

runner = CliRunner()


def _project(root: Path, text: str, name: str = "smadlrp.toml") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text, encoding="utf-8")
    return root


def _invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env=env)
    return result.exit_code, result.output


def test_the_nearest_file_upwards_applies_with_paths_relative_to_it(tmp_path: Path) -> None:
    _project(tmp_path, 'checkpoint = "runs/best.safetensors"\nsplit = "val"\n')
    _project(tmp_path / "sub", '[project]\nname = "x"\n', name="pyproject.toml")  # no [tool.smadlrp]: skipped
    deep = tmp_path / "sub" / "deeper"
    deep.mkdir()
    config = load_config(start=deep)
    assert config.source == tmp_path / "smadlrp.toml"
    assert config.checkpoint == tmp_path / "runs" / "best.safetensors" and config.split == "val"
    _project(tmp_path / "sub", '[tool.smadlrp]\ndevice = "cpu"\nfail-below = {accuracy = "90%"}\n',
             name="pyproject.toml")
    config = load_config(start=deep)
    assert config.source == tmp_path / "sub" / "pyproject.toml" and config.device == "cpu"
    assert config.fail_below == {"accuracy": "90%"} and config.checkpoint is None
    assert ProjectConfig().where == "no configuration file"


@pytest.mark.parametrize(("text", "message"), [
    ('chekpoint = "x.safetensors"\n', "smadlrp.toml: chekpoint: unknown key"),
    ("threshold = [1]\n", "smadlrp.toml: threshold: must be a number or a string"),
    ('fail-above = "d-eer=0.1"\n', "smadlrp.toml: fail-above: must be a table"),
    ("checkpoint = = 1\n", "smadlrp.toml: not valid TOML"),
])
def test_bad_configuration_is_refused_naming_key_and_file(tmp_path: Path, text: str, message: str) -> None:
    _project(tmp_path, text)
    with pytest.raises(SmadlrpError, match=message):
        load_config(start=tmp_path)


@pytest.fixture()
def ci_project(tmp_path: Path, tiny_checkpoint: Path, tiny_data: Path) -> Path:
    return _project(tmp_path / "project", f'checkpoint = "{tiny_checkpoint}"\ndata = "{tiny_data}"\n'
                                          'device = "cpu"\nfail-above = {d-eer = 0.0001}\n'
                                          'fail-below = {auc = 0.0}\n')


def test_bare_evaluate_runs_the_configured_job_for_ci(ci_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ci_project)
    summary = ci_project / "summary.md"
    summary.write_text("earlier step\n")
    code, output = _invoke("evaluate", "--junit", "gates.xml",
                           env={"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)})
    assert code == 1, output
    assert "error: gate failed: d-eer = " in output and "is above the limit 0.0001" in output
    assert "::error title=smadlrp gate failed::d-eer = " in output
    assert "auc" not in output.split("gate failed")[-1]  # the passing gate is not reported as failed
    text = summary.read_text()
    assert text.startswith("earlier step\n## tiny.safetensors on test") and "**FAIL**" in text
    suite = ET.parse(ci_project / "gates.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = suite.findall("testcase")
    failed = [c for c in cases if c.find("failure") is not None]
    assert [c.get("name") for c in failed] == ["d-eer <= 0.0001"]
    failure = failed[0].find("failure")
    assert failure is not None and "measured" in (failure.text or "")


def test_command_line_overrides_the_configuration(ci_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ci_project)
    code, output = _invoke("evaluate", "--fail-above", "d-eer=1", "--split", "val")
    assert code == 0, output
    assert "tiny.safetensors on val" in output


@pytest.mark.parametrize(("text", "args", "message"), [
    ("fail-above = {eer = 0.1}\n", ["evaluate"], "smadlrp.toml: fail-above.eer: gate 'eer=0.1': unknown metric"),
    ('threshold = "middle"\n', ["evaluate"], "smadlrp.toml: threshold:"),
    ('device = "tpu"\n', ["evaluate"], "smadlrp.toml: device: --device 'tpu'"),
    ('chekpoint = "a"\n', ["evaluate"], "smadlrp.toml: chekpoint: unknown key"),
])
def test_configuration_errors_are_one_red_line(tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
                                               text: str, args: list[str], message: str) -> None:
    monkeypatch.chdir(_project(tmp_path, text))
    code, output = _invoke(*args, "--checkpoint", str(tiny_checkpoint))
    assert code in (1, 2), output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], output


def test_config_option_chooses_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, output = _invoke("--config", "missing.toml", "evaluate")
    assert code == 1 and output.strip() == "error: --config missing.toml: no such file"
    _project(tmp_path / "ci", "unknown-key = 1\n")
    code, output = _invoke("--config", "ci/smadlrp.toml", "evaluate")
    assert code == 1 and "ci/smadlrp.toml: unknown-key: unknown key" in output


def test_a_configured_split_that_does_not_exist_names_the_key(tmp_path: Path, tiny_checkpoint: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(_project(tmp_path, 'split = "dev"\n'))
    code, output = _invoke("evaluate", "--checkpoint", str(tiny_checkpoint), "--bootstrap", "0")
    assert code == 1 and "Traceback" not in output
    last = output.strip().splitlines()[-1]
    assert "smadlrp.toml: split: " in last and "no 'dev' split folder" in last, output
