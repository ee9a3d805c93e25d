"""The output folder of a fine-tuning run: the files it holds, and holding it (locked) for the run's lifetime."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.core.locks import LOCK_FILE, locked_folder, remove_write_leftovers

RESUME_FILE = "resume.safetensors"
RUN_OUTPUTS = frozenset({"best.safetensors", "last.safetensors", "history.json", "training-curves.png"})  # and resume


@contextmanager
def held_run_folder(out: Path, resume: bool, notify: Callable[[str], None] = lambda message: None
                    ) -> Iterator[Path]:
    """Lock the run folder `out` for the block and remove the temporary files of killed writes first.

    A new run (`resume=False`) needs a folder that is absent, empty, or holds only the files of a run stopped before
    its first epoch was saved (no resume state: nothing was done); a resumed run needs the folder's resume state.
    UsageError or SmadlrpError, naming what to do, otherwise."""
    if resume and not out.is_dir():
        raise SmadlrpError(f"--resume {out}: no such folder")
    with locked_folder(out, notify):
        removed = remove_write_leftovers(out)
        if removed:
            notify(f"removed {len(removed)} temporary file(s) of interrupted writes in {out}")
        others = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
        has_state = (out / RESUME_FILE).exists()
        if resume and not has_state and set(others) <= RUN_OUTPUTS:
            raise SmadlrpError(f"{out} holds no resume state, so there is nothing to resume (a run stopped before its "
                               f"first epoch was saved leaves none): start it again with --out {out}")
        if not resume and has_state:
            raise UsageError(f"{out} is not empty: it holds a run; continue it with --resume {out}, or choose "
                             "another --out")
        if not resume and others and not set(others) <= RUN_OUTPUTS:
            raise UsageError(f"{out} is not empty ({len(others)} entries, e.g. {others[0]}): choose another --out")
        if not resume and others:
            notify(f"{out} holds a run stopped before its first epoch was saved; starting it anew")
        yield out
