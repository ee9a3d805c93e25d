"""Saving matplotlib figures: built on `Figure` with the Agg canvas (no pyplot state, no display), written
atomically in the format the file suffix names (.png, .pdf, .svg, ...)."""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from smadlrp.core.errors import UsageError
from smadlrp.core.fileio import write_atomic


def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: int = 150) -> Path:
    """Write `fig` atomically to `path` in the format its suffix names; UsageError for an unknown suffix."""
    canvas = FigureCanvasAgg(fig)
    fmt = Path(path).suffix.lower().lstrip(".")
    supported = canvas.get_supported_filetypes()
    if fmt not in supported:
        choices = ", ".join(f".{name}" for name in sorted(supported))
        raise UsageError(f"{path}: cannot write a figure with suffix {fmt!r}; use one of {choices}")
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi))
