"""The output policy: a command's output paths are checked against every file it reads before any work starts.

A command declares its outputs (option -> path) and its inputs (what -> paths) on one `FilePlan`. An output that is
one of the inputs (the same file by any path: through a symlink, `..` or a hard link) or that two options share is
refused in one line with exit 2, naming both. An output file that is not an input is replaced atomically
(core/fileio.py), as each command documents.

Inputs are compared by name first and by file identity only where the names match, so declaring the 100,000
images of a split costs a set lookup per image, not a system call.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from smadlrp.core.errors import UsageError


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


class FilePlan:
    """The files one command reads and writes; every `reads`/`writes` call checks the new paths at once."""

    def __init__(self) -> None:
        self._outputs: list[tuple[str, Path]] = []  # (option, path as given)
        self._by_name: dict[str, list[tuple[str, Path]]] = {}  # basename (given or resolved) of an existing output
        self._inputs: list[tuple[str, Path]] = []  # (what, path) of small inputs, checked against later outputs

    def writes(self, option: str, path: Path | None) -> Path | None:  # one option may write several files
        """Declare that `option` writes `path` (None: not asked for); returns `path`. UsageError when another
        output option or an input declared so far is the same file."""
        if path is None:
            return None
        resolved = path.resolve()
        for other, taken in self._outputs:
            if taken.resolve() == resolved or _same_file(taken, path):
                raise UsageError(f"{option} {path} and {other} {taken} name the same file; give each its own path")
        self._outputs.append((option, path))
        if path.exists():
            for name in {path.name, resolved.name}:
                self._by_name.setdefault(name, []).append((option, path))
        for what, source in self._inputs:
            self._refuse(option, path, what, source)
        return path

    def reads(self, what: str, paths: Path | Iterable[Path] | None, keep: bool = True) -> None:
        """Declare inputs (`what` says what they are: "the checkpoint", "an image of the test split"). UsageError
        when an output declared so far is one of them. `keep=False` for large sets declared after every output
        (images): they are not kept for later `writes` calls."""
        if paths is None:
            return
        for path in [paths] if isinstance(paths, Path) else paths:
            path = Path(path)
            for option, output in self._by_name.get(path.name, ()):
                self._refuse(option, output, what, path)
            if keep:
                self._inputs.append((what, path))
            if self._by_name and path.is_symlink():  # an input linked from another name: compare its target too
                for option, output in self._by_name.get(path.resolve().name, ()):
                    self._refuse(option, output, what, path)

    def reads_images_under(self, what: str, root: Path | None, suffixes: Iterable[str]) -> None:
        """Declare that the command reads image files (with one of `suffixes`, lower case with the dot) anywhere
        below the folder `root`, without listing them: an output declared so far that is such an existing file is
        refused. For commands that index the images later (an index costs a pass over the folder)."""
        if root is None:
            return
        top, wanted = root.resolve(), set(suffixes)
        for option, path in self._outputs:
            target = path.resolve()
            if target.is_file() and target.suffix.lower() in wanted and target.is_relative_to(top):
                raise UsageError(f"{option} {path} would overwrite {what} ({target}); choose another path")

    @staticmethod
    def _refuse(option: str, output: Path, what: str, source: Path) -> None:
        if output.resolve() == source.resolve() or _same_file(output, source):
            same = "" if output == source else f" ({source})"
            raise UsageError(f"{option} {output} would overwrite {what}{same}; choose another path")
