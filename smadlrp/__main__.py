"""`python -m smadlrp` and the `smadlrp` console script: Ctrl-C while the command line is still loading (torch and
the commands take seconds to import) ends as "error: interrupted", exit 130, without a traceback."""

from __future__ import annotations

import sys

INTERRUPTED_EXIT = 130


def main() -> None:
    """Load the command line and run it."""
    try:
        from smadlrp.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        raise SystemExit(INTERRUPTED_EXIT) from None
    run()


if __name__ == "__main__":
    main()
