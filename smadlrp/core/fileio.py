"""Atomic file writes: every output goes to a temporary file beside its target, then is renamed into place."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from smadlrp.core.errors import SmadlrpError, shorten

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it onto `target`.

    On any exception the temporary file is removed and `target` is left as it was; an OSError or a safetensors
    write error (a full disk, a read-only or vanished folder) becomes a SmadlrpError naming the target.
    """
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise SmadlrpError(f"cannot write {target}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError | SafetensorError):
            raise SmadlrpError(f"cannot write {target}: {_reason(exc)}") from exc
        raise


def _reason(exc: BaseException) -> str:
    """An OSError's own words ("No space left on device"), or safetensors' message without its prefixes."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    reason = text.rsplit("I/O error: ", 1)[-1] if "I/O error: " in text else text
    return shorten(re.sub(r" \(os error \d+\)$", "", reason), 120)


def write_atomic(target: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call `write(tmp_path)` and move the result onto `target` atomically. Returns `target` as a Path."""
    with atomic_path(target) as tmp:
        write(tmp)
    return Path(target)


def write_text_atomic(target: str | os.PathLike[str], text: str) -> Path:
    """Write `text` (UTF-8) to `target` atomically."""
    return write_atomic(target, lambda p: p.write_text(text, encoding="utf-8"))
