"""The figures the docs quote from `make demo`, as the docs print them: `python scripts/demo_figures.py DEMO OUT.json`.

Reads what scripts/demo.sh wrote below DEMO (evaluate.json, compare.json, the captured example outputs) and
writes OUT.json: {"figures": {key: text}}. tests/test_docs.py checks that every figure a page names with a
`<!-- docs-test: figures KEY -->` marker is quoted there exactly so (docs/contributing-docs.md).

Whole-block figures are refreshed in place: a table, paragraph or console output right below a marker that
names one figure alone (`<!-- docs-test: figure compare.table -->`) is replaced by the figure's text (a console
block keeps its `$` command lines). Figures quoted inside prose are left to the writer: the docs test lists them.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smadlrp.core.fileio import write_text_atomic

RATES = ("accuracy", "apcer", "bpcer", "d-eer", "bpcer10", "bpcer20", "bpcer100", "apcer@bpcer10", "apcer@bpcer1")
# Times per image depend on the machine and its load, so they are no figure: the table leaves them out.
COMPARE_COLUMNS: tuple[tuple[str, str, Callable[[float], str]], ...] = (  # header, key, format
    ("AOPC", "aopc", lambda v: f"{v:.2f}"),
    ("AOPC - random", "aopc_vs_random", lambda v: f"{v:.2f}"),
    ("mass acc.", "mass_accuracy", lambda v: f"{v:.3f}"),
    ("rank acc.", "rank_accuracy", lambda v: f"{v:.3f}"),
    ("pointing", "pointing_game", lambda v: f"{v:.2f}"),
)
MORPH_TYPES = ("complete", "splicing", "partial")


def percent(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100 * rate:.2f} %"


def evaluate_figures(report: dict[str, Any]) -> dict[str, str]:
    """`evaluate.RATE` (in %), counts, AUC, and `evaluate.TYPE.apcer` / `.n_morph` per morph type."""
    metrics = report["metrics"]
    figures = {f"evaluate.{rate}": percent(metrics.get(rate)) for rate in RATES}
    figures |= {"evaluate.n_bonafide": str(metrics["n_bonafide"]), "evaluate.n_morph": str(metrics["n_morph"]),
                "evaluate.auc": f"{metrics['auc']:.4f}", "evaluate.threshold": f"{metrics['threshold']:.4f}"}
    for part in report.get("groups", {}).get("morph_type", {}).get("parts", []):
        figures[f"evaluate.{part['name']}.apcer"] = percent(part["apcer"])
        figures[f"evaluate.{part['name']}.n_morph"] = str(part["n_morph"])
    return figures


def _value(method: dict[str, Any], key: str) -> float | None:
    if key in ("mass_accuracy", "rank_accuracy", "pointing_game"):
        return None if method["localisation"] is None else method["localisation"][key]
    return method[key]


def compare_figures(report: dict[str, Any]) -> dict[str, str]:
    """`compare.table` (the docs' Markdown table, best values but the random map's in bold), `compare.METHOD.KEY`
    for each cell,
    `compare.METHOD.TYPE.KEY` per morph type, `compare.mass_by_type` (a table) and the subset description."""
    methods = report["methods"]
    figures: dict[str, str] = {}
    header = "| method | " + " | ".join(h for h, _, _ in COMPARE_COLUMNS) + " |"
    rows = [header, "|---|" + "---:|" * len(COMPARE_COLUMNS)]
    bests = {}
    for _, key, fmt in COMPARE_COLUMNS:
        values = [v for m in methods if m["name"] != "random" and (v := _value(m, key)) is not None]
        bests[key] = fmt(max(values)) if values else None
    for m in methods:
        cells = []
        for _, key, fmt in COMPARE_COLUMNS:
            value = _value(m, key)
            text = "n/a" if value is None else fmt(value)
            figures[f"compare.{m['name']}.{key}"] = text
            cells.append(f"**{text}**" if text == bests[key] and m["name"] != "random" else text)
        label = f"{m['name']} (baseline)" if m["kind"] == "baseline" else m["name"]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
        for kind, loc in m["per_type"].items():
            for key in ("mass_accuracy", "rank_accuracy"):
                figures[f"compare.{m['name']}.{kind}.{key}"] = "n/a" if loc[key] is None else f"{loc[key]:.3f}"
    figures["compare.table"] = "\n".join(rows)
    found = {t for m in methods for t in m["per_type"]}
    types = [t for t in MORPH_TYPES if t in found] + sorted(found - set(MORPH_TYPES))
    counts = {t: next(m["per_type"][t]["n_images"] for m in methods if t in m["per_type"]) for t in types}
    by_type = ["| method | " + " | ".join(f"{t} (n={counts[t]})" for t in types) + " |", "|---|" + "---:|" * len(types)]
    for m in methods:
        by_type.append(f"| {m['name']} | " + " | ".join(figures[f"compare.{m['name']}.{t}.mass_accuracy"]
                                                        for t in types) + " |")
    figures["compare.mass_by_type"] = "\n".join(by_type)
    masked = methods[0]["localisation"]["n_images"] if methods[0]["localisation"] else 0
    figures["compare.images"] = (f"{report['n_images']} {report['split']} images ({masked} morphs with masks: "
                                 + ", ".join(f"{counts[t]} {t}" for t in types) + ")")
    figures["compare.patches"] = f"{report['patch_size']}x{report['patch_size']}-pixel patches, {report['steps']} steps"
    return figures


WHOLE_BLOCK = re.compile(r"^<!-- docs-test: figure (?P<key>[^\s;,]+) -->$")


def refresh_blocks(text: str, figures: dict[str, str]) -> str:
    """`text` (a Markdown page) with every whole-block figure replaced by its current text."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        out.append(lines[i])
        marker = WHOLE_BLOCK.match(lines[i].strip())
        i += 1
        if marker is None or marker["key"] not in figures or i == len(lines):
            continue
        new = figures[marker["key"]].splitlines()
        if lines[i].startswith("```"):  # a console block: its commands stay, the output is replaced
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            k, continuing = i + 1, False
            while k < end and (continuing or lines[k].startswith("$ ")):
                continuing = lines[k].rstrip().endswith("\\")
                k += 1
            out += [*lines[i:k], *new, lines[end]]
            i = end + 1
        else:  # a table or paragraph, up to the next blank line
            end = next((j for j in range(i, len(lines)) if not lines[j].strip()), len(lines))
            out += new
            i = end
    return "\n".join(out) + "\n"


def main(demo: Path, out: Path) -> None:
    read = lambda name: json.loads((demo / name).read_text(encoding="utf-8"))  # noqa: E731
    figures = evaluate_figures(read("evaluate.json")) | compare_figures(read("compare.json"))
    for name in ("explain-example", "trace-example"):
        lines = (demo / f"{name}.txt").read_text(encoding="utf-8").splitlines()  # rich pads lines to 80 columns
        figures[name.replace("-", ".")] = "\n".join(line.rstrip() for line in lines).strip("\n")
    payload = {"note": "written by `make demo` (scripts/demo_figures.py); quoted by README.md and docs/*.md, "
                       "checked by tests/test_docs.py", "figures": dict(sorted(figures.items()))}
    write_text_atomic(out, json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    root = out.resolve().parents[1]
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        if (new := refresh_blocks(text, figures)) != text:
            write_text_atomic(page, new)
            print(f"updated the figure blocks of {page.relative_to(root)}")
    print(f"wrote {len(figures)} figures to {out}; `pytest tests/test_docs.py` lists the prose that quotes old ones")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python scripts/demo_figures.py DEMO_FOLDER OUT.json")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
