"""Atomic writes: the target appears whole or not at all, with the permissions open() would give."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from smadlrp.core.errors import SmadlrpError
from smadlrp.core.fileio import write_atomic, write_text_atomic


def test_a_write_replaces_the_target_whole_with_default_permissions(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "notes.txt"
    write_text_atomic(target, "first")
    write_text_atomic(target, "second")
    assert target.read_text() == "second"
    assert list(target.parent.iterdir()) == [target]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_a_failed_write_leaves_the_old_file_and_says_why_in_one_line(tmp_path: Path) -> None:
    target = tmp_path / "map.png"
    target.write_bytes(b"old")

    def disk_full(path: Path) -> None:
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(SmadlrpError, match=r"cannot write .*map\.png: No space left on device"):
        write_atomic(target, disk_full)
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


def test_other_errors_pass_through_and_clean_up(tmp_path: Path) -> None:
    def broken(path: Path) -> None:
        path.write_bytes(b"partial")
        raise ValueError("encoder bug")

    with pytest.raises(ValueError, match="encoder bug"):
        write_atomic(tmp_path / "x.png", broken)
    assert list(tmp_path.iterdir()) == []
