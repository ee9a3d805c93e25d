"""Run folders held by one process at a time: an exclusive lock file, and the clean-up of killed writes.

The lock is a file created with O_CREAT | O_EXCL that holds the owner's PID and host. A second process gets one
line naming the holder; a lock whose process is gone (a SIGKILL, a power cut) is taken over with a notice.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from smadlrp.core.errors import SmadlrpError

LOCK_FILE = ".smadlrp.lock"


def process_alive(pid: int) -> bool:
    """Whether a process of this PID exists on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _holder(lock: Path) -> tuple[int | None, str]:
    """The PID and host written in a lock file (None when unreadable or half written)."""
    try:
        pid_text, _, host = lock.read_text(encoding="utf-8").partition(" ")
        return int(pid_text), host.strip()
    except (OSError, ValueError, UnicodeDecodeError):
        return None, ""


def _create(lock: Path) -> bool:
    """Create `lock` holding this process's PID and host; False when it exists."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(f"{os.getpid()} {socket.gethostname()}\n")
    return True


@contextmanager
def locked_folder(folder: Path, notify: Callable[[str], None] = lambda message: None) -> Iterator[Path]:
    """Create `folder` if needed and hold it for the duration of the block; SmadlrpError when another live process
    holds it, or when it cannot be created. A stale lock (its PID gone on this host) is taken over with a notice."""
    lock = folder / LOCK_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        taken = _create(lock)
        if not taken:
            pid, host = _holder(lock)
            here = host in ("", socket.gethostname())
            if pid is None or (here and not process_alive(pid)):
                notice = f"process {pid}, which is gone" if pid is not None else "an unreadable lock"
                notify(f"{folder} was locked by {notice}; taking it over")
                lock.unlink(missing_ok=True)
                taken = _create(lock)
            if not taken:
                where = f" on {host}" if not here else ""
                raise SmadlrpError(f"{folder} is in use by smadlrp process {pid}{where} (lock file {lock}); wait "
                                   "for it to finish, or choose another folder")
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise SmadlrpError(f"{folder} exists and is not a folder") from None
        raise SmadlrpError(f"cannot write {folder}: {exc.strerror or exc}") from None
    try:
        yield folder
    finally:
        lock.unlink(missing_ok=True)


def is_write_leftover(name: str) -> bool:
    """Whether a file name is a temporary file of an atomic write that never finished: `.NAME.XXXX.tmp`
    (core/fileio.py) or safetensors' own `.tmpXXXXXX`."""
    return name.startswith(".") and (name.endswith(".tmp") or (name.startswith(".tmp") and len(name) == 10))


def remove_write_leftovers(folder: Path) -> list[Path]:
    """Delete the temporary files of killed writes directly in `folder` (hold its lock first); returns them."""
    removed = [path for path in folder.iterdir() if path.is_file() and is_write_leftover(path.name)]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed
