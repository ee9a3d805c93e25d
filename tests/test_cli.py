"""The shared CLI core: help, version, error lines and exit codes, the committed CLI reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from smadlrp import __version__
from smadlrp.cli import app
from smadlrp.cli.reference import cli_reference
from smadlrp.core.device import resolve_device
from smadlrp.core.errors import SmadlrpError, UsageError

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_real_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("synth", "info", "finetune", "evaluate", "import-model"):
        assert command in result.output


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    for bad in ("tpu", "cuda:x"):
        try:
            resolve_device(bad)
        except UsageError as exc:
            assert exc.exit_code == 2
        else:
            raise AssertionError(f"{bad} was accepted")


def test_user_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    result = runner.invoke(app, ["info", str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"error: file not found: {tmp_path / 'missing.safetensors'}"]


def test_cli_reference_is_up_to_date() -> None:
    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert committed == cli_reference(), "docs/cli.md is stale: run `make docs`"


def test_missing_split_lists_only_split_folders(tmp_path: Path) -> None:
    from smadlrp.data.loading import find_split
    from smadlrp.data.synthetic.generator import SynthConfig, generate_dataset

    generate_dataset(tmp_path / "set", SynthConfig(identities=6, image_size=32, captures_per_identity=1))
    with pytest.raises(SmadlrpError, match=r"\(splits found: test, train, val\); choose one of those with --split"):
        find_split(tmp_path / "set", "dev")


def test_every_command_writes_json_and_those_that_run_a_model_take_device() -> None:
    """What README promises: --json FILE on every command, --device on the ones with --checkpoint and finetune."""
    import typer

    for name, command in typer.main.get_command(app).commands.items():  # type: ignore[attr-defined]
        options = {opt for param in command.params for opt in param.opts}
        assert "--json" in options, f"{name} has no --json"
        runs_a_model = "--checkpoint" in options or name == "finetune"
        assert ("--device" in options) == runs_a_model, f"{name}: --device {'missing' if runs_a_model else 'given'}"


@pytest.mark.slow
def test_help_pages_use_plain_metavars_and_list_commands_in_work_order() -> None:
    from smadlrp.cli.help_style import COMMAND_ORDER

    result = runner.invoke(app, ["--help"])
    commands = result.output.split("Commands")[1]
    listed = [line[2:].split()[0] for line in commands.splitlines() if line.startswith("│ ") and line[2] != " "]
    assert set(listed) == set(COMMAND_ORDER) & set(listed) and {"synth", "predict", "import-model"} <= set(listed)
    assert listed == [name for name in COMMAND_ORDER if name in listed]  # the order of the work
    for command in ["", *listed]:
        page = runner.invoke(app, [command, "--help"] if command else ["--help"], terminal_width=200).output
        for typer_style in ("<bool>", "<list[", "<int range>", "<float range>", "<str>", "<file>", "<path>"):
            assert typer_style not in page, (command, typer_style)
    explain = runner.invoke(app, ["explain", "--help"], terminal_width=200).output
    assert "explain [OPTIONS] PATH..." in explain and "INTEGER RANGE" in explain and "FILE" in explain
