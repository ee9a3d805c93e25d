"""The CLI's C heap setting: memory a relevance pass frees is reused within the pass, not faulted in afresh."""

from __future__ import annotations

import ctypes

import pytest
from typer.testing import CliRunner

import smadlrp.cli as cli
from smadlrp.core.memory import reuse_freed_memory


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallopt"), reason="needs glibc's mallopt")
def test_glibc_takes_the_setting() -> None:
    assert reuse_freed_memory()


def test_every_command_runs_with_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """The top-level callback sets it before any command runs (here the help of `explain`)."""
    calls: list[bool] = []
    monkeypatch.setattr(cli, "reuse_freed_memory", lambda: calls.append(True) or True)
    result = CliRunner().invoke(cli.app, ["explain", "--help"])
    assert result.exit_code == 0 and calls == [True]
