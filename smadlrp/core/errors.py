"""The one exception type for errors a user can cause (bad path, wrong file, bad option value)."""

from __future__ import annotations

import reprlib

SHOWN = 60  # characters of a value quoted in a message
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 2 * SHOWN  # only bounds the work on huge values: `shown` cuts the end


class SmadlrpError(Exception):
    """A user-facing error: the CLI prints its message as one red line and exits with `exit_code`.

    `exit_code` is 1 for a failure (unreadable file, mismatched checkpoint) and 2 for a usage error
    (an option value that cannot work).
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class UsageError(SmadlrpError):
    """An option or argument value that cannot work; exit code 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)


def shorten(text: str, width: int = 100) -> str:
    """`text`'s first line, cut at a word boundary to at most `width` characters with "..." when longer (for
    quoting a library's message or a user's value in a one-line error)."""
    line = text.splitlines()[0] if text else ""
    if len(line) <= width:
        return line
    cut = line[: width - 3]
    space = cut.rfind(" ")
    return (cut[:space] if space > width // 2 else cut).rstrip(" ,;:") + "..."


def shown(value: object, width: int = SHOWN) -> str:
    """`repr(value)` cut to about `width` characters (with "..."), however long or deeply nested the value is: a
    user's value quoted in a one-line error."""
    return shorten(_REPR.repr(value), width)
