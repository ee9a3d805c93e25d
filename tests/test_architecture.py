"""The import-layer contract of docs/architecture.md: imports inside smadlrp point down the layers, never up.

Every module of smadlrp/ is parsed with `ast` (nothing is imported), so the check is fast and also sees imports
inside functions and under `TYPE_CHECKING`.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "smadlrp"
TOP = 4  # smadlrp/__init__.py, smadlrp/__main__.py and cli/: nothing below imports them
LAYERS = {"cli": TOP, "report": 3, "explain": 3, "detector": 3, "evaluation": 3, "lrp": 2, "data": 2, "core": 1}
# Upward imports that exist today, as (importing module, imported module). This list may only shrink.
KNOWN_UPWARD = {
    ("smadlrp.detector.checkpoint", "smadlrp"),  # the package version, kept in smadlrp/__init__.py
}


def module_name(path: Path) -> str:
    """`smadlrp/lrp/rules.py` -> `smadlrp.lrp.rules`; a package's `__init__.py` is the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int | None:
    """The layer of a module of smadlrp (the package root and `__main__` are the top); None outside the folders."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return TOP
    return LAYERS.get(parts[1])


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, module) for every smadlrp module that `source`, a module of `package`, imports (relative imports are
    resolved against `package`); `from smadlrp.x import y` names `smadlrp.x.y` when that is a module, else
    `smadlrp.x`."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((node.lineno, full if full in MODULES else base))
    return [(line, module) for line, module in found if module.split(".")[0] == "smadlrp"]


@cache
def upward_imports() -> dict[tuple[str, str], int]:
    """Every import of a higher layer by a lower one: (importing module, imported module) -> first line."""
    upward: dict[tuple[str, str], int] = {}
    for name, path in MODULES.items():
        own = layer(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for line, target in imported_modules(path.read_text(encoding="utf-8"), package):
            target_layer = layer(target)
            if own is not None and target_layer is not None and target_layer > own:
                upward.setdefault((name, target), line)
    return upward


def test_every_module_lies_in_a_layer() -> None:
    unknown = sorted(name for name in MODULES if layer(name) is None)
    assert not unknown, f"modules outside the layers of docs/architecture.md (give their folder a layer): {unknown}"


def test_no_new_upward_import() -> None:
    new = {pair: line for pair, line in upward_imports().items() if pair not in KNOWN_UPWARD}
    assert not new, "upward imports (a lower layer importing a higher one; see docs/architecture.md):\n" + "\n".join(
        f"  {src} line {line} imports {dst}" for (src, dst), line in sorted(new.items()))


def test_known_exceptions_still_exist() -> None:
    """A fixed exception leaves the list, so it cannot come back unnoticed."""
    gone = KNOWN_UPWARD - upward_imports().keys()
    assert not gone, f"these upward imports are gone: remove them from KNOWN_UPWARD: {sorted(gone)}"


@pytest.mark.parametrize(("source", "expected"), [
    ("from smadlrp.cli import app\n", {"smadlrp.cli"}),
    ("from smadlrp import cli\n", {"smadlrp.cli"}),
    ("from .. import __version__\n", {"smadlrp"}),
    ("from . import errors\n", {"smadlrp.core.errors"}),
    ("def f():\n    import smadlrp.explain.run\n", {"smadlrp.explain.run"}),
    ("import torch\nfrom typing import Any\n", set()),
])
def test_the_parser_sees_every_import_form(source: str, expected: set[str]) -> None:
    """Absolute, package-level, relative and function-local imports all count."""
    assert {module for _, module in imported_modules(source, "smadlrp.core")} == expected


@pytest.mark.parametrize("folder", ["lrp", "evaluation", "data/synthetic"])
def test_modules_have_one_job_and_stay_small(folder: str) -> None:
    """Each module of the engine, the metrics and the synthetic set says its job in its docstring's first line and
    stays under 450 lines."""
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert ast.get_docstring(ast.parse(text)), f"{path.relative_to(PACKAGE)} has no docstring"
        assert len(text.splitlines()) < 450, f"{path.relative_to(PACKAGE)} has {len(text.splitlines())} lines"
