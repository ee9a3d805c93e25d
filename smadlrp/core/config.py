"""Project configuration: a `[tool.smadlrp]` table in pyproject.toml or a `smadlrp.toml`, as ruff and pytest do it.

The file is the first found walking up from the working directory (in each folder `smadlrp.toml` first, then a
`pyproject.toml` that has a `[tool.smadlrp]` table), or the one given with `smadlrp --config FILE`. Paths in it
are relative to the folder of the file. Unknown keys and values of the wrong type are refused with one line
naming the key and the file; what a value means (a gate's metric, a threshold) is checked where it is used,
through `ProjectConfig.error`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smadlrp.core.errors import SmadlrpError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_FILE = "smadlrp.toml"
PYPROJECT = "pyproject.toml"
PATH_KEYS = ("checkpoint", "data")
TEXT_KEYS = ("split", "device")
GATE_KEYS = ("fail-above", "fail-below")
KEYS = (*PATH_KEYS, *TEXT_KEYS, "threshold", *GATE_KEYS)


@dataclass(frozen=True)
class ProjectConfig:
    """The settings of one configuration file (all None / empty without one).

    Gate tables map a metric name to its limit as written (a fraction, or a string such as "5%").
    """

    source: Path | None = None  # the file, and `[tool.smadlrp]` when it is a pyproject.toml
    checkpoint: Path | None = None
    data: Path | None = None
    split: str | None = None
    threshold: str | None = None
    device: str | None = None
    fail_above: dict[str, str] = field(default_factory=dict)
    fail_below: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        """Where the settings come from, for messages."""
        if self.source is None:
            return "no configuration file"
        return f"{self.source} [tool.smadlrp]" if self.source.name == PYPROJECT else str(self.source)

    def error(self, key: str, message: str) -> SmadlrpError:
        """An error about one key's value, naming the key and the file."""
        return SmadlrpError(f"{self.where}: {key}: {message}")


def find_config(start: Path) -> Path | None:
    """The configuration file that applies in `start`: the nearest folder upwards with a `smadlrp.toml`, or a
    `pyproject.toml` holding a `[tool.smadlrp]` table."""
    for folder in (start, *start.parents):
        if (folder / CONFIG_FILE).is_file():
            return folder / CONFIG_FILE
        pyproject = folder / PYPROJECT
        if pyproject.is_file() and "smadlrp" in _read_toml(pyproject).get("tool", {}):
            return pyproject
    return None


def load_config(path: Path | None = None, start: Path | None = None) -> ProjectConfig:
    """The settings of `path` (a smadlrp.toml, or a pyproject.toml read at `[tool.smadlrp]`), else of the file
    `find_config(start or cwd)` finds, else an empty configuration."""
    if path is None:
        path = find_config((start or Path.cwd()).resolve())
        if path is None:
            return ProjectConfig()
    elif not path.is_file():
        raise SmadlrpError(f"--config {path}: no such file")
    document = _read_toml(path)
    table = document.get("tool", {}).get("smadlrp", {}) if path.name == PYPROJECT else document
    return _parse(table, path)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise SmadlrpError(f"{path}: cannot read the configuration ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SmadlrpError(f"{path}: not valid TOML ({exc})") from None


def _parse(table: Mapping[str, Any], path: Path) -> ProjectConfig:
    empty = ProjectConfig(source=path)
    if not isinstance(table, Mapping):
        raise empty.error("tool.smadlrp", "must be a table")
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise empty.error(unknown[0], f"unknown key (known keys: {', '.join(KEYS)})")
    values: dict[str, Any] = {}
    for key in PATH_KEYS:
        if key in table:
            values[key] = path.parent / _text(table[key], key, empty)
    for key in TEXT_KEYS:
        if key in table:
            values[key] = _text(table[key], key, empty)
    if "threshold" in table:
        values["threshold"] = _text_or_number(table["threshold"], "threshold", empty)
    for key in GATE_KEYS:
        if key in table:
            gates = table[key]
            if not isinstance(gates, Mapping):
                raise empty.error(key, "must be a table of METRIC = LIMIT, e.g. {d-eer = 0.05}")
            values[key.replace("-", "_")] = {str(name): _text_or_number(limit, f"{key}.{name}", empty)
                                             for name, limit in gates.items()}
    return ProjectConfig(source=path, **values)


def _text(value: Any, key: str, config: ProjectConfig) -> str:
    if not isinstance(value, str) or not value.strip():
        raise config.error(key, f"must be a non-empty string, got {value!r}")
    return value.strip()


def _text_or_number(value: Any, key: str, config: ProjectConfig) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise config.error(key, f"must be a number or a string, got {value!r}")
    return str(value)
