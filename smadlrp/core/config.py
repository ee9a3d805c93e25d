"""Project configuration: a `[tool.smadlrp]` table in pyproject.toml or a `smadlrp.toml`, as ruff and pytest do it.

The file is the first found walking up from the working directory (in each folder `smadlrp.toml` first, then a
`pyproject.toml` that has a `[tool.smadlrp]` table), or the one given with `smadlrp --config FILE`. Paths in it
are relative to the folder of the file. Unknown keys and values of the wrong type are refused with one line
naming the key and the file; what a value means (a gate's metric, a threshold) is checked where it is used,
through `ProjectConfig.error`. A file that is not UTF-8 TOML text (a byte-order mark, a binary file, nesting
too deep to read) is refused with one line, and values are echoed cut to `SHOWN` characters.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smadlrp.core.errors import SHOWN, SmadlrpError, shorten, shown

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
TEXT_LIMIT = 100  # characters of a split, device, threshold, gate metric or limit
NAME_MAX, PATH_MAX = 255, 4096  # bytes of one file or folder name, of a whole path (UTF-8)
BOM = b"\xef\xbb\xbf"


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
        if pyproject.is_file() and _tool_table(_read_toml(pyproject), pyproject) is not None:
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
    table = _tool_table(document, path) if path.name == PYPROJECT else document
    return _parse({} if table is None else table, path)


def _invalid(path: Path, why: str) -> SmadlrpError:
    return SmadlrpError(f"{path}: not a valid smadlrp configuration: {why}")


def _read_toml(path: Path) -> dict[str, Any]:
    """The TOML document of `path`; SmadlrpError naming the file when it cannot be read or is not UTF-8 TOML."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SmadlrpError(f"{path}: cannot read the configuration ({exc.strerror or exc})") from None
    if data.startswith(BOM):
        raise _invalid(path, "starts with a UTF-8 byte-order mark; save it without one")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise _invalid(path, f"not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SmadlrpError(f"{path}: not valid TOML ({exc})") from None
    except ValueError as exc:  # a number too long to convert
        raise _invalid(path, str(exc).split(";")[0]) from None
    except RecursionError:
        raise _invalid(path, "arrays or tables nested too deeply to read") from None


def _tool_table(document: Mapping[str, Any], path: Path) -> Any:
    """The `[tool.smadlrp]` value of a pyproject.toml document (None without one)."""
    tool = document.get("tool", {})
    if not isinstance(tool, Mapping):
        raise _invalid(path, f"tool must be a table, got {shown(tool)}")
    return tool.get("smadlrp")


def _parse(table: Mapping[str, Any], path: Path) -> ProjectConfig:
    empty = ProjectConfig(source=path)
    if not isinstance(table, Mapping):
        raise empty.error("tool.smadlrp", "must be a table")
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise empty.error(shorten(unknown[0], SHOWN), f"unknown key (known keys: {', '.join(KEYS)})")
    values: dict[str, Any] = {}
    for key in PATH_KEYS:
        if key in table:
            values[key] = path.parent / _path(table[key], key, empty)
    for key in TEXT_KEYS:
        if key in table:
            values[key] = _text(table[key], key, empty)
    if "threshold" in table:
        values["threshold"] = _text_or_number(table["threshold"], "threshold", empty)
    for key in GATE_KEYS:
        if key in table:
            values[key.replace("-", "_")] = _gates(table[key], key, empty)
    return ProjectConfig(source=path, **values)


def _gates(gates: Any, key: str, config: ProjectConfig) -> dict[str, str]:
    """A gate table's METRIC -> LIMIT (as text), each metric name and limit checked."""
    if not isinstance(gates, Mapping):
        raise config.error(key, "must be a table of METRIC = LIMIT, e.g. {d-eer = 0.05}")
    return {_bounded(name, f"{key} metric", config): _text_or_number(limit, f"{key}.{shorten(name, SHOWN)}", config)
            for name, limit in gates.items()}


def _bounded(value: str, key: str, config: ProjectConfig, limit: int = TEXT_LIMIT) -> str:
    """`value` when it has at most `limit` characters and no NUL (which no file name or option can hold)."""
    if "\0" in value:
        raise config.error(key, f"must not hold a NUL character, got {shown(value)}")
    if len(value) > limit:
        raise config.error(key, f"longer than {limit} characters ({len(value):,}): {shown(value)}")
    return value


def _text(value: Any, key: str, config: ProjectConfig, limit: int = TEXT_LIMIT) -> str:
    """A non-empty string of at most `limit` characters without NUL, stripped."""
    if not isinstance(value, str) or not value.strip():
        raise config.error(key, f"must be a non-empty string, got {shown(value)}")
    return _bounded(value, key, config, limit).strip()


def _path(value: Any, key: str, config: ProjectConfig) -> str:
    """A path string the operating system can take: at most PATH_MAX bytes, each name at most NAME_MAX."""
    text = _text(value, key, config, limit=PATH_MAX)
    if len(text.encode()) > PATH_MAX or any(len(name.encode()) > NAME_MAX for name in Path(text).parts):
        raise config.error(key, f"too long for a path (a name over {NAME_MAX} bytes or a path over {PATH_MAX}): "
                                f"{shown(text)}")
    return text


def _text_or_number(value: Any, key: str, config: ProjectConfig) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise config.error(key, f"must be a number or a string, got {shown(value)}")
    return _bounded(value, key, config) if isinstance(value, str) else str(value)
