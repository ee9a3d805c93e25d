"""compare-rules' CSV: one row per method with its timing, faithfulness, checks and localisation numbers."""

from __future__ import annotations

import io

from smadlrp.data.protocol import csv_writer
from smadlrp.explain.compare import Comparison, Localisation, MethodResult

CSV_METRICS: tuple[str, ...] = ("mass_accuracy", "rank_accuracy", "pointing_game", "n_images")
CHECK_COLUMNS: tuple[str, ...] = ("lerf_aopc", "abpc", "class_sensitivity", "mprt_spearman", "mprt_ssim", "emprt")


def comparison_csv(comparison: Comparison) -> str:
    """One row per method: timing, AOPC, LeRF AOPC, ABPC, class sensitivity, MPRT (Spearman and SSIM at full
    randomisation), eMPRT, localisation overall and per morph type (empty cells: not available)."""
    types = comparison.morph_types
    header = ["method", "kind", "ms_per_image", "aopc", "aopc_vs_random", *CHECK_COLUMNS, *CSV_METRICS,
              *(f"{t}.{metric}" for t in types for metric in CSV_METRICS)]
    buffer = io.StringIO()
    writer = csv_writer(buffer)
    writer.writerow(header)
    for m in comparison.methods:
        cells: list[object] = [m.name, m.kind, f"{m.ms_per_image:.4f}", f"{m.aopc:.6f}", f"{m.aopc_vs_random:.6f}",
                               *_check_cells(m), *_csv_cells(m.localisation)]
        for t in types:
            cells += _csv_cells(m.per_type.get(t))
        writer.writerow(cells)
    return buffer.getvalue()


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def _check_cells(m: MethodResult) -> list[str]:
    r = m.randomisation
    return [_number(m.lerf_aopc), _number(m.abpc), _number(m.class_sensitivity),
            *(_number(v) for v in ((None, None, None) if r is None else (r.spearman[-1], r.ssim[-1], r.emprt)))]


def _csv_cells(loc: Localisation | None) -> list[str]:
    if loc is None:
        return [""] * len(CSV_METRICS)
    values = (loc.mass_accuracy, loc.rank_accuracy, loc.pointing_game)
    return [*("" if v is None else f"{v:.6f}" for v in values), str(loc.n_images)]
