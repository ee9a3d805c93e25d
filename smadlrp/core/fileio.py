"""Writing files whole: atomic file writes, folders staged beside their target and swapped in, PNG encoding.

Every output goes to a temporary file (or a hidden staging folder) beside its target, then is renamed into place.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from safetensors import SafetensorError

from smadlrp.core.errors import SmadlrpError, shorten
from smadlrp.core.locks import process_alive

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


# whole folders ------------------------------------------------------------------------------------


def make_staging(out: Path, folders: Iterable[str | Path]) -> Path:
    """A fresh hidden sibling `.OUT.partial-PID` of `out` holding the (nested) subfolders `folders`."""
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
        for folder in folders:
            (staging / folder).mkdir(parents=True)
    except OSError as exc:
        raise SmadlrpError(f"cannot write to {out.parent}: {exc.strerror or exc}") from exc
    return staging


def replace_folder(out: Path, staging: Path, what: str) -> None:
    """Move the finished `staging` folder onto `out`; a previous `out` is set aside (`.OUT.old-PID`), put back
    if the move fails, and removed after it. `what` names the contents in the error message."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        if out.is_dir():
            out.rename(old)
        staging.rename(out)
    except OSError as exc:
        if old.exists() and not out.exists():
            old.rename(out)
        raise SmadlrpError(f"cannot move {what} into {out}: {exc.strerror or exc}") from exc
    shutil.rmtree(old, ignore_errors=True)


def remove_abandoned(out: Path) -> None:
    """Remove the hidden staging folders (`.OUT.partial-PID`, `.OUT.old-PID`) of runs that were killed: their
    process no longer exists. (An interrupted or failed run removes its own.)"""
    if os.name != "posix" or not out.parent.is_dir():
        return
    for folder in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        kind, _, pid = folder.name.rpartition("-")
        if kind in (f".{out.name}.partial", f".{out.name}.old") and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)



# PNG ----------------------------------------------------------------------------------------------


def encode_png(pixels: NDArray[np.uint8]) -> bytes:
    """A PNG file of an 8-bit grayscale (H, W) or RGB (H, W, 3) image: every row "Up"-filtered, zlib level 1.

    Deterministic, and several times faster than an adaptive-filter encoder on noisy pictures."""
    height, width = pixels.shape[:2]
    color_type = 2 if pixels.ndim == 3 else 0
    rows = pixels.reshape(height, -1)
    up = np.diff(rows, axis=0, prepend=np.zeros((1, rows.shape[1]), dtype=np.uint8))  # wraps modulo 256
    raw = np.concatenate([np.full((height, 1), 2, dtype=np.uint8), up], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 1))
            + chunk(b"IEND", b""))


def cache_home() -> Path:
    """smadlrp's folder in the user's cache, ~/.cache/smadlrp (the synthetic set, cached features)."""
    return Path.home() / ".cache" / "smadlrp"
