"""Read a data set's manifest.csv (written by `smadlrp synth`; optional for other data sets)."""

from __future__ import annotations

import csv
from pathlib import Path

from smadlrp.core.errors import SmadlrpError

MANIFEST = "manifest.csv"


def read_manifest(root: Path) -> list[dict[str, str]]:
    """Rows of `root/manifest.csv` (columns path, label, split, morph_type, ..., mask_path); [] when absent."""
    path = root / MANIFEST
    if not path.is_file():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SmadlrpError(f"{path}: unreadable manifest ({exc})") from None
    if rows and "path" not in rows[0]:
        raise SmadlrpError(f"{path}: a manifest needs a 'path' column")
    return rows

