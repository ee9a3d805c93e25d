"""The figures the docs quote from `make demo`, as the docs print them.

`python scripts/demo_figures.py DEMO` (the last step of scripts/demo.sh) reads what the demo wrote below DEMO
(evaluate.json, compare.json, sanity.json, the captured example outputs), writes DEMO/demo-figures.json
({"figures": {key: text}}) and prints the headline figures beside the committed docs/demo-figures.json. It writes
nothing else.

`python scripts/demo_figures.py DEMO --publish` (`make docs-figures`, for maintainers) also copies them into the
docs: docs/demo-figures.json, DEMO/docs-images/* into docs/images/, and every whole-block figure in README.md and
docs/*.md. tests/test_docs.py checks that every figure a page names with a `<!-- docs-test: figures KEY -->`
marker is quoted there exactly so (docs/contributing-docs.md).

Whole-block figures are refreshed in place: a table, paragraph or console output right below a marker that
names one figure alone (`<!-- docs-test: figure compare.table -->`) is replaced by the figure's text (a console
block keeps its `$` command lines). Figures quoted inside prose are left to the writer: the docs test lists them.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
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
# The sanity run's table: header, value of a method's JSON record (None: n/a), format.
SANITY_COLUMNS: tuple[tuple[str, str, Callable[[dict[str, Any]], float | None], Callable[[float], str]], ...] = (
    ("AOPC", "aopc", lambda m: m["aopc"], lambda v: f"{v:.2f}"),
    ("AOPC LeRF", "lerf_aopc", lambda m: m["lerf_aopc"], lambda v: f"{v:.2f}"),
    ("ABPC", "abpc", lambda m: m["abpc"], lambda v: f"{v:.2f}"),
    ("class ρ", "class_sensitivity", lambda m: m["class_sensitivity"], lambda v: f"{v:.2f}"),
    ("MPRT ρ", "mprt_spearman", lambda m: m["randomisation"] and m["randomisation"]["spearman"][-1],
     lambda v: f"{v:.2f}"),
    ("MPRT ρ, first layer trained", "mprt_spearman_first_kept",
     lambda m: m["randomisation"] and m["randomisation"]["spearman"][-2], lambda v: f"{v:.2f}"),
    ("MPRT SSIM", "mprt_ssim", lambda m: m["randomisation"] and m["randomisation"]["ssim"][-1], lambda v: f"{v:.2f}"),
    ("eMPRT", "emprt", lambda m: m["randomisation"] and m["randomisation"]["emprt"], lambda v: f"{v:+.2f}"),
)


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


def sanity_figures(report: dict[str, Any]) -> dict[str, str]:
    """`sanity.table` (ABPC, class sensitivity, MPRT and eMPRT of every method, and the checks passed),
    `sanity.METHOD.KEY` for each cell and `sanity.images`, from `compare-rules --sanity --json`."""
    figures: dict[str, str] = {}
    rows = ["| method | " + " | ".join(h for h, _, _, _ in SANITY_COLUMNS) + " | checks passed |",
            "|---|" + "---:|" * (len(SANITY_COLUMNS) + 1)]
    for m in report["methods"]:
        cells = []
        for _, key, value, fmt in SANITY_COLUMNS:
            v = value(m)
            figures[f"sanity.{m['name']}.{key}"] = text = "n/a" if v is None else fmt(v)
            cells.append(text)
        ran = [v for v in m["checks"].values() if v is not None]
        figures[f"sanity.{m['name']}.passed"] = passed = f"{sum(ran)}/{len(ran)}"
        label = f"{m['name']} (baseline)" if m["kind"] == "baseline" else m["name"]
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {passed} |")
    figures["sanity.table"] = "\n".join(rows)
    figures["sanity.images"] = f"{report['n_images']} {report['split']} images"
    figures["sanity.layers"] = str(len(report["randomised_layers"] or []))
    figures["sanity.imputation"] = report["imputation"]
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


ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "docs" / "demo-figures.json"
HEADLINE = (("D-EER", "evaluate.d-eer"), ("APCER", "evaluate.apcer"), ("BPCER", "evaluate.bpcer"))


def demo_figures(demo: Path) -> dict[str, str]:
    """Every figure of the demo below `demo`, by key."""
    read = lambda name: json.loads((demo / name).read_text(encoding="utf-8"))  # noqa: E731
    figures = evaluate_figures(read("evaluate.json")) | compare_figures(read("compare.json"))
    if (demo / "sanity.json").is_file():
        figures |= sanity_figures(read("sanity.json"))
    for name in ("explain-example", "trace-example"):
        lines = (demo / f"{name}.txt").read_text(encoding="utf-8").splitlines()  # rich pads lines to 80 columns
        figures[name.replace("-", ".")] = "\n".join(line.rstrip() for line in lines).strip("\n")
    return dict(sorted(figures.items()))


def headline(figures: dict[str, str], committed: dict[str, str]) -> str:
    """The test split's D-EER, APCER and BPCER of this run beside the committed ones, and how far they may differ."""
    rows = [f"  {'':7}{'this run':>10}{'README':>10}"]
    rows += [f"  {name:7}{figures.get(key, 'n/a'):>10}{committed.get(key, 'n/a'):>10}" for name, key in HEADLINE]
    same = all(figures.get(key) == committed.get(key) for _, key in HEADLINE)
    rows.append("  The same figures as the README's." if same else
                "  The figures vary across machines: CPU kernels (chosen by processor and torch version) and thread\n"
                "  counts round floats differently, and 20 epochs of training amplify it. Two machines with the same\n"
                "  software differed by about 6 points of D-EER, 10 of APCER and 2 of BPCER (more per morph type).")
    return "\n".join(rows)


def publish(demo: Path, figures: dict[str, str]) -> None:
    """Copy the demo's figures into the docs: docs/demo-figures.json, docs/images/, the pages' figure blocks."""
    write_text_atomic(COMMITTED, (demo / COMMITTED.name).read_text(encoding="utf-8"))
    for image in sorted((demo / "docs-images").glob("*.png")):
        shutil.copyfile(image, ROOT / "docs" / "images" / image.name)
        print(f"copied {image.name} to docs/images/")
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        if (new := refresh_blocks(text, figures)) != text:
            write_text_atomic(page, new)
            print(f"updated the figure blocks of {page.relative_to(ROOT)}")
    print(f"wrote {len(figures)} figures to {COMMITTED.relative_to(ROOT)}; `pytest tests/test_docs.py` lists the "
          "prose that quotes old ones")


def main(demo: Path, publish_docs: bool = False) -> None:
    """Write DEMO/demo-figures.json and print the headline figures; with `publish_docs` also update the docs."""
    figures = demo_figures(demo)
    payload = {"note": "written by `make docs-figures` (scripts/demo_figures.py); quoted by README.md and "
                       "docs/*.md, checked by tests/test_docs.py", "figures": figures}
    write_text_atomic(demo / COMMITTED.name, json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    if publish_docs:
        publish(demo, figures)
        return
    committed = json.loads(COMMITTED.read_text(encoding="utf-8"))["figures"]
    print(f"wrote {len(figures)} figures to {demo / COMMITTED.name}\n"
          f"== headline figures of the test split (APCER and BPCER at the validation split's D-EER threshold)\n"
          + headline(figures, committed))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The figures the docs quote, from a `make demo` folder.")
    parser.add_argument("demo", type=Path, help="the folder scripts/demo.sh wrote")
    parser.add_argument("--publish", action="store_true",
                        help="also rewrite docs/demo-figures.json, docs/images/ and the docs' figure blocks")
    args = parser.parse_args()
    main(args.demo, args.publish)
