"""PDF copies of the pages through headless Chromium (`predict --sheet DIR --pdf`), printed on A4.

The page's own print stylesheet (`@media print`, `@page { size: A4 }`) lays it out; Chromium only prints. The page
runs no script and fetches nothing (its Content-Security-Policy forbids both), so Chromium runs without its sandbox,
which fails in most containers, and with a throw-away profile.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from smadlrp.core.errors import SmadlrpError, shorten
from smadlrp.core.fileio import atomic_path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")  # the names headless Chromium goes by, in this order
PRINT_SECONDS = 120  # one page


def find_browser() -> str:
    """The headless Chromium on PATH; SmadlrpError (one line, exit code 2) naming what to install without one."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found is not None:
            return found
    raise SmadlrpError("--pdf prints the sheets with headless Chromium, which is not installed (none of "
                       f"{', '.join(BROWSERS)} on PATH): install it (Debian: apt-get install chromium) or drop --pdf",
                       exit_code=2)


def print_pdf(page: Path, target: Path, browser: str) -> Path:
    """Print the HTML file `page` to the PDF `target` (atomically); SmadlrpError naming the page when Chromium
    fails, times out or writes no PDF."""
    with tempfile.TemporaryDirectory(prefix="smadlrp-chromium-") as profile, atomic_path(target) as tmp:
        command = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--no-pdf-header-footer",
                   f"--user-data-dir={profile}", f"--print-to-pdf={tmp}", page.resolve().as_uri()]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=PRINT_SECONDS, check=False)
        except subprocess.TimeoutExpired:
            raise SmadlrpError(f"{browser} did not print {page.name} within {PRINT_SECONDS} s") from None
        except OSError as exc:
            raise SmadlrpError(f"cannot run {browser}: {exc.strerror or exc}") from None
        with tmp.open("rb") as written:
            head = written.read(5)
        if done.returncode != 0 or head != b"%PDF-":
            last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), "no message")
            raise SmadlrpError(f"{browser} could not print {page.name} to PDF (exit code {done.returncode}: "
                               f"{shorten(last, 120)})")
    return target
