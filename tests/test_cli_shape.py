"""The command line stays thin: commands parse, make one call into the package and render.

A command module imports no other command module (shared options and rendering live in cli/common.py, the
project defaults in cli/defaults.py), and no function of smadlrp/cli/ has a body over 60 lines (the typer
signature, which declares the options, and the docstring do not count).
"""

from __future__ import annotations

import ast
from pathlib import Path

CLI = Path(__file__).resolve().parents[1] / "smadlrp" / "cli"
SHARED = {"smadlrp.cli", "smadlrp.cli.common", "smadlrp.cli.defaults", "smadlrp.cli.help_style"}  # not commands
MAX_BODY_LINES = 60


def _trees() -> dict[str, ast.Module]:
    return {path.name: ast.parse(path.read_text(encoding="utf-8")) for path in sorted(CLI.glob("*.py"))}


def test_no_command_module_imports_another() -> None:
    found = [(name, node.module) for name, tree in _trees().items() for node in ast.walk(tree)
             if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("smadlrp.cli")
             and node.module not in SHARED]
    assert found == []


def test_no_cli_function_body_is_over_60_lines() -> None:
    long = []
    for name, tree in _trees().items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            body = node.body[1:] if isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value,
                                                                                       ast.Constant) else node.body
            lines = (node.end_lineno or 0) - body[0].lineno + 1 if body else 0
            if lines > MAX_BODY_LINES:
                long.append(f"{name}:{node.name} ({lines} lines)")
    assert long == []
