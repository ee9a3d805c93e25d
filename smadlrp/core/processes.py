"""Worker processes that fail once and clearly instead of restarting forever.

Workers are spawned (a fresh interpreter per worker: nothing of the parent's threads or torch state is
inherited, and the results do not depend on the platform's default start method). A spawned worker imports the
parent's main script again. A script that calls into smadlrp at its top level, without the
`if __name__ == "__main__":` guard, would then start workers from inside every worker; `multiprocessing.Pool`
replaces each dying worker with a new one, endlessly. Here a worker that finds itself inside such a re-import
exits at once (`leave_if_reimported`), and the pool reports that once, with what to change.

Ctrl-C is remembered while a command runs (`noting_interrupts`): a KeyboardInterrupt that lands where a library
swallows it ("Exception ignored in ..."), and the errors that follow it (a DataLoader worker that the same SIGINT
ended, a peer rank gone), still end the command as an interruption (`is_interrupt`).
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from types import FrameType
from typing import Any, TypeVar

from smadlrp.core.errors import SmadlrpError

J = TypeVar("J")
R = TypeVar("R")

UNGUARDED = ("worker processes stopped while starting. A script that calls {what} must do so under "
             "`if __name__ == \"__main__\":` (each worker imports the script again), or pass workers=1")


def in_reimported_main() -> bool:
    """True while a spawned worker is importing its parent's main script (before it runs any job)."""
    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))  # what multiprocessing checks


def leave_if_reimported() -> None:
    """Called where work would start workers: inside a worker's re-import of the main script, exit quietly.
    The parent then sees its pool broken and says what to change, once."""
    if in_reimported_main():
        raise SystemExit(1)


class _Interrupts:
    """Whether SIGINT arrived since the running command began."""

    seen = False


def _note_interrupt(signum: int, frame: FrameType | None) -> None:
    """The SIGINT handler while a command runs: remember it, then raise KeyboardInterrupt as Python does."""
    _Interrupts.seen = True
    signal.default_int_handler(signum, frame)


@contextmanager
def noting_interrupts() -> Iterator[None]:
    """Remember Ctrl-C for `is_interrupt` while the block runs (in the main thread, where Python's own handler is
    installed; elsewhere, or when SIGINT is ignored, nothing changes), and keep quiet about a KeyboardInterrupt
    that Python could only report as "Exception ignored in ..." (it is remembered). Restored after the block."""
    _Interrupts.seen = False
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    report = sys.unraisablehook

    def quiet(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            report(unraisable)

    signal.signal(signal.SIGINT, _note_interrupt)
    sys.unraisablehook = quiet
    try:
        yield
    finally:
        sys.unraisablehook = report
        signal.signal(signal.SIGINT, signal.default_int_handler)


def interrupted() -> bool:
    """Whether Ctrl-C (SIGINT) arrived since the running command began (see `noting_interrupts`)."""
    return _Interrupts.seen


def is_interrupt(exc: BaseException) -> bool:
    """Whether `exc` means Ctrl-C: a KeyboardInterrupt, or a RuntimeError raised after a SIGINT (torch's
    "DataLoader worker (pid(s) ...) exited unexpectedly" when the same SIGINT ended the workers)."""
    return isinstance(exc, KeyboardInterrupt) or (isinstance(exc, RuntimeError) and interrupted())


def _leave_ctrl_c() -> None:
    """Workers ignore Ctrl-C: the parent alone handles it, cancels what is left and waits for them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def map_in_processes(function: Callable[[J], R], jobs: Iterable[J], workers: int, what: str,
                     chunksize: int = 8) -> Iterator[R]:
    """`map(function, jobs)` over `workers` spawned processes, results in job order.

    A worker that dies stops the whole map with one SmadlrpError (before any result: the unguarded script, naming
    `what` the user called); an exception raised by `function` is re-raised once, as it is. On any exit, Ctrl-C
    included, the remaining jobs are cancelled and the workers have ended when this returns.
    """
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_leave_ctrl_c)
    done = 0
    try:
        for result in pool.map(function, jobs, chunksize=chunksize):
            done += 1
            yield result
    except BrokenProcessPool:
        if done == 0:
            raise SmadlrpError(UNGUARDED.format(what=what)) from None
        raise SmadlrpError(f"a worker process of {what} died (out of memory?); try fewer workers") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
