"""`smadlrp report`: the page built from made-up run folders shows the JSON's numbers with the terminal's rounding,
one column per run, nothing external, no model run; bad input is one line; Chromium renders it cleanly."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import render_in_chromium
from typer.testing import CliRunner

from smadlrp.cli import app
from smadlrp.data.loading import IMAGENET_MEAN, IMAGENET_STD
from smadlrp.detector import checkpoint as checkpoint_module
from smadlrp.detector.checkpoint import CheckpointMeta, save_checkpoint
from smadlrp.detector.models import build_model
from smadlrp.evaluation.breakdown import group_breakdown
from smadlrp.evaluation.registry import GATE_METRICS
from smadlrp.evaluation.report import percent, threshold_text, to_jsonable
from smadlrp.evaluation.scores import scores_csv
from smadlrp.evaluation.summary import IntervalOptions, summarize
from smadlrp.report.build import build_report

runner = CliRunner()


def _history(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    epochs = [{"epoch": e, "train_loss": float(rng.random()), "train_acc": float(rng.random()),
               "val_loss": float(rng.random()), "val_acc": float(rng.random()), "apcer": 0.1, "bpcer": 0.2,
               "d_eer": 0.15} for e in (1, 2, 3)]
    return {"config": {"arch": "vgg_compact", "epochs": 3, "lr": 0.001 * (seed + 1), "seed": seed},
            "best_epoch": 2, "epochs": epochs}


def make_run(folder: Path, seed: int) -> Path:
    """A run folder as the commands leave it: checkpoint, history, evaluate JSON and scores, compare-rules and
    regions JSON (the JSON written with the package's own writers)."""
    rng = np.random.default_rng(seed)
    (folder / "run").mkdir(parents=True)
    torch.manual_seed(seed)
    model, source = build_model("vgg_compact", 2, "none")
    points = {"eer": {"threshold": 0.4 + seed / 100, "apcer": 0.0512, "bpcer": 0.0625},
              "max-apcer10": {"threshold": None, "reason": "too few morphs"}}
    meta = CheckpointMeta("vgg_compact", ["bonafide", "morph"], "morph", 32, IMAGENET_MEAN, IMAGENET_STD, source,
                          operating_points={"split": "val", "epoch": 2, "n_bonafide": 40, "n_morph": 40,
                                            "points": points})
    save_checkpoint(folder / "run" / "best.safetensors", model, meta)
    (folder / "run" / "history.json").write_text(json.dumps(_history(seed)))
    labels = np.repeat([0, 1], 60)
    scores = np.clip(rng.normal(0.3 + 0.4 * labels, 0.2), 0, 1)
    groups = ["" if y == 0 else ("complete" if i % 2 else "partial") for i, y in enumerate(labels)]
    options = IntervalOptions(0.95, 50, 0)
    summary = summarize(labels, scores, 0.5, threshold_source="validation D-EER", intervals=options)
    breakdown = group_breakdown(labels, scores, groups, 0.5, column="morph_type", threshold_source="validation D-EER",
                                intervals=options)
    jpeg = summarize(labels, np.clip(scores + 0.05, 0, 1), 0.5, threshold_source="validation D-EER")
    doc = to_jsonable({"checkpoint": str(folder / "run" / "best.safetensors"), "split": "test", "data": "tiny",
                       "metrics": summary, "groups": {"morph_type": breakdown}, "perturbed": {"jpeg:50": jpeg},
                       "gates": {"failed": []}})
    (folder / "evaluate.json").write_text(json.dumps(doc, indent=2))
    paths = [Path(f"img{i}.png") for i in range(len(labels))]
    (folder / "scores.csv").write_text(scores_csv(paths, labels, scores, {"morph_type": groups}))
    methods = [{"name": name, "kind": kind, "ms_per_image": float(rng.random() * 10), "aopc": float(rng.random()),
                "aopc_vs_random": float(rng.random()), "curve": [0.0],
                "localisation": {"n_images": 10, "mass_accuracy": float(rng.random()), "rank_accuracy": 0.5,
                                 "pointing_game": None, "n_without_positive": 0}, "per_type": {}}
               for name, kind in (("epsilon", "rule"), ("gradient", "baseline"), ("random", "baseline"))]
    (folder / "compare").mkdir()
    (folder / "compare.json").write_text(json.dumps({"checkpoint": "x", "score": "target logit", "steps": 5,
                                                     "patch_size": 4, "n_images": 10, "methods": methods}))
    regions = ["left_eye", "nose", "background"]
    rows = [{"class": name, "group": None, "images": 5, "used": 5,
             "positive": dict(zip(regions, rng.dirichlet([1, 1, 1]).tolist(), strict=True)),
             "absolute": dict(zip(regions, [0.2, 0.3, 0.5], strict=True)),
             "area": dict(zip(regions, [0.1, 0.2, 0.7], strict=True))} for name in ("bonafide", "morph")]
    (folder / "regions.json").write_text(json.dumps({
        "rule": "epsilon-plus", "target": "morph", "split": "test", "images": 10, "regions": regions, "rows": rows,
        "spray": {"clusters": 2, "chosen_by": "eigengap", "per_cluster": [
            {"cluster": c, "images": 5, "classes": {"morph": 3, "bonafide": 2}, "groups": {}, "mean_p_attack": 0.25 + c}
            for c in (0, 1)]},
        "files": {}}))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("report")
    return [make_run(root / "alpha", 0), make_run(root / "beta", 1)]


class Tables(HTMLParser):
    """Every <table>: its caption, header cells and body rows (row header, the main text of each cell, without
    the smaller note under it); and every src/href value and script tag."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict[str, Any]] = []
        self.links: list[str] = []
        self.scripts = 0
        self._cell: list[str] | None = None
        self._in_note = 0
        self._caption = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [value or "" for name, value in attrs if name in ("src", "href")]
        self.scripts += tag == "script"
        if tag == "table":
            self.tables.append({"caption": "", "head": [], "rows": []})
        elif tag == "caption":
            self._caption = True
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append([])
        elif tag in ("th", "td"):
            self._cell = []
        elif tag == "span" and self._cell is not None:
            self._in_note += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "caption":
            self._caption = False
        elif tag == "span" and self._in_note:
            self._in_note -= 1
        elif tag in ("th", "td") and self._cell is not None:
            self.tables[-1]["rows"][-1].append((tag, "".join(self._cell).strip()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._caption:
            self.tables[-1]["caption"] += data
        elif self._cell is not None and not self._in_note:
            self._cell.append(data)


def parse(html: str) -> Tables:
    parser = Tables()
    parser.feed(html)
    return parser


def table(parsed: Tables, caption: str) -> dict[str, list[str]]:
    """A table's body rows by row header: the cells after it."""
    (found,) = [t for t in parsed.tables if t["caption"].startswith(caption)]
    return {row[0][1]: [text for _, text in row[1:]] for row in found["rows"] if row and row[-1][0] == "td"}


def test_the_numbers_are_those_of_the_json_with_the_terminal_rounding(runs: list[Path]) -> None:
    parsed = parse(build_report(runs[:1]).html)
    doc = json.loads((runs[0] / "evaluate.json").read_text())
    metrics = doc["metrics"]
    rates = table(parsed, "ISO/IEC 30107-3 rates")
    shown_rates = 0
    for name in GATE_METRICS:
        key = next(k for k in rates if k.split(" ")[0] == name)
        value, interval = metrics[name], metrics[f"{name}_ci"]
        if value is None:
            assert rates[key] == ["n/a"], name
            continue
        low, high = interval
        shown = f"{value:.4f} [{low:.3f}, {high:.3f}]" if name == "auc" else \
            f"{percent(value)} [{100 * low:.1f}, {100 * high:.1f}]"
        assert rates[key] == [shown], name
        shown_rates += 1
    assert shown_rates >= 8
    confusion = table(parsed, "Confusion matrix")
    assert confusion["TP: morph called morph"] == [str(metrics["tp"])]
    assert confusion["APCER: FN / morphs"] == [percent(metrics["apcer"])]
    assert confusion["threshold t"] == [threshold_text(metrics["threshold"])]
    groups = table(parsed, "By morph_type")
    average, worst = doc["groups"]["morph_type"]["average"], doc["groups"]["morph_type"]["worst"]
    assert groups["Average"][2] == percent(average["apcer"]["value"])
    assert groups["Worst"][2] == f"{percent(worst['apcer']['value'])} ({worst['apcer']['part']})"
    partial = doc["groups"]["morph_type"]["parts"][1]
    assert groups["partial"][2].startswith(f"{percent(partial['apcer'])} [")
    robustness = table(parsed, "Robustness")
    assert robustness["jpeg:50"][0] == percent(doc["perturbed"]["jpeg:50"]["d-eer"])
    points = table(parsed, "Stored operating points")
    assert points["eer"] == [threshold_text(0.4), percent(0.0512), percent(0.0625)]
    compare = json.loads((runs[0] / "compare.json").read_text())["methods"][0]
    assert table(parsed, "Rule comparison")["epsilon (rule)"] == [
        f"{compare['ms_per_image']:.2f}", f"{compare['aopc']:.4f}", f"{compare['aopc_vs_random']:.4f}",
        f"{compare['localisation']['mass_accuracy']:.4f}", "0.5000", "n/a"]
    region_rows = json.loads((runs[0] / "regions.json").read_text())["rows"]
    assert table(parsed, "Share of relevance")["nose"] == [
        f"{100 * region_rows[0]['positive']['nose']:.1f}", f"{100 * region_rows[1]['positive']['nose']:.1f}", "20.0"]


def test_two_runs_appear_in_every_table_and_the_det(runs: list[Path]) -> None:
    report = build_report(runs)
    parsed = parse(report.html)
    assert len(parsed.tables) >= 8
    for found in parsed.tables:
        header = [text for row in found["rows"] if row and row[-1][0] == "th" for _, text in row]
        assert "alpha" in header and "beta" in header, found["caption"]
    assert re.search(r'alt="DET curves of alpha, beta', report.html)


def test_nothing_is_fetched(runs: list[Path]) -> None:
    report = build_report(runs)
    parsed = parse(report.html)
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", report.html).replace("http-equiv", "")
    assert parsed.scripts == 0 and not re.search(r"https?:|//|url\(|@import", text)
    assert parsed.links and all(link.startswith(("data:image/png;base64,", "#")) for link in parsed.links)
    assert '<meta name="viewport"' in report.html and "@media print" in report.html
    assert all(re.search(r'<img src="[^"]+" alt="[^"]+"', tag) for tag in re.findall(r"<img [^>]+>", report.html))


def test_the_command_runs_no_model(runs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the report loaded a model")

    monkeypatch.setattr(checkpoint_module, "load_checkpoint", refuse)
    out, written = tmp_path / "page.html", tmp_path / "page.json"
    result = runner.invoke(app, ["report", *map(str, runs), "--out", str(out), "--json", str(written)])
    assert result.exit_code == 0, result.output
    found = json.loads(written.read_text())
    assert [run["name"] for run in found["runs"]] == ["alpha", "beta"]
    assert {"checkpoint", "evaluate", "scores", "compare-rules", "regions", "history"} <= set(found["runs"][0]["found"])
    assert found["sections"] == ["detector", "evaluation", "robustness", "explanations"]
    assert out.stat().st_size == found["bytes"]


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt", "over an input"])
def test_bad_input_is_one_line(case: str, runs: list[Path], tmp_path: Path) -> None:
    folder, out = tmp_path / "run", tmp_path / "report.html"
    if case != "missing":
        folder.mkdir()
    if case == "corrupt":
        (folder / "evaluate.json").write_text('{"split": "test", ')
    if case == "over an input":
        folder, out = runs[0], runs[0] / "evaluate.json"
    result = runner.invoke(app, ["report", str(folder), "--out", str(out)])
    assert result.exit_code == (2 if case == "over an input" else 1)  # a usage error is exit 2, as everywhere
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert {"missing": "no such folder", "empty": "nothing a report can show", "corrupt": "not valid JSON",
            "over an input": "would overwrite"}[case] in lines[0]


@pytest.mark.slow
@pytest.mark.chromium
def test_chromium_renders_the_page_without_errors(runs: list[Path], tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(build_report(runs).html, encoding="utf-8")
    assert "ISO/IEC 30107-3 rates" in render_in_chromium(page, tmp_path)


def make_errors_run(folder: Path, checkpoint: Path, data: Path) -> dict[str, list[tuple[str, str]]]:
    """A run folder with a checkpoint, an evaluate JSON at threshold 0.5 and a score file of the test images whose
    false accepts and false rejects are known: the expected (file name, score text) of each, in the page's order."""
    (folder / "run").mkdir(parents=True)
    shutil.copy(checkpoint, folder / "run" / "best.safetensors")
    bonafide = sorted((data / "test" / "bonafide").glob("*.png"))[:5]
    morphs = sorted((data / "test" / "morph").glob("*.png"))[:5]
    paths = bonafide + morphs
    labels = np.repeat([0, 1], 5)
    scores = np.array([0.1, 0.7, 0.5, 0.95, 0.2, 0.9, 0.3, 0.05, 0.49, 0.6])
    summary = summarize(labels, scores, 0.5, threshold_source="validation D-EER")
    doc = to_jsonable({"checkpoint": str(folder / "run" / "best.safetensors"), "split": "test", "data": str(data),
                       "metrics": summary})
    (folder / "evaluate.json").write_text(json.dumps(doc))
    (folder / "scores.csv").write_text(scores_csv(paths, labels, scores))
    texts = {i: repr(float(scores[i])) for i in range(10)}
    return {"false accept": [(paths[i].name, texts[i]) for i in (7, 6)],  # 0.05 and 0.3; 0.49 is the third
            "false reject": [(paths[i].name, texts[i]) for i in (3, 1)]}  # 0.95 and 0.7; 0.5 (at it) is the third


def test_explain_errors_shows_the_most_confident_errors_in_order(tiny_checkpoint: Path, tiny_data: Path,
                                                                  tmp_path: Path) -> None:
    expected = make_errors_run(tmp_path / "run", tiny_checkpoint, tiny_data)
    out, written = tmp_path / "page.html", tmp_path / "page.json"
    result = runner.invoke(app, ["report", str(tmp_path / "run"), "--out", str(out), "--json", str(written),
                                 "--explain-errors", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads(written.read_text())["sections"][-1] == "errors"
    page = out.read_text()
    errors = page[page.index('<section id="errors"'):]
    errors = errors[:errors.index("</section>")]
    cases = re.findall(r'<strong class="error-kind">([^<]+)</strong>: <code class="error-file">([^<]+)</code>,\s*'
                       r'P\(morph\) = <data class="error-score" value="([^"]+)">([^<]+)</data>\s*(\S+) threshold '
                       r'(\S+)</figcaption>', errors)
    assert [(kind, name, text) for kind, name, text, *_ in cases] == [
        (kind, name, text) for kind in ("false accept", "false reject") for name, text in expected[kind]]
    assert all(shown == f"{float(text):.4f}" and relation == ("&lt;" if kind == "false accept" else "≥")
               and threshold == "0.5000" for kind, _, text, shown, relation, threshold in cases)
    images = re.findall(r'<img class="pixels" src="data:image/png;base64,[^"]+" alt="([^"]+)"', errors)
    assert len(images) == 2 * len(cases)
    assert all(name in alt for (_, name, *_), alt in zip([c for c in cases for _ in (0, 1)], images, strict=True))
    assert 'class="scale-bar"' in errors and "speaks for &#34;morph&#34;" in errors
    assert "3 of 3 shown" not in errors and errors.count("2 of 3 shown") == 2


def test_explain_errors_without_scores_says_what_adds_them(runs: list[Path], tiny_checkpoint: Path,
                                                           tiny_data: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "run"
    make_errors_run(folder, tiny_checkpoint, tiny_data)
    (folder / "scores.csv").unlink()
    out = tmp_path / "page.html"
    result = runner.invoke(app, ["report", str(folder), "--out", str(out), "--explain-errors", "3",
                                 "--errors-rule", "epsilon"])
    assert result.exit_code == 0, result.output
    assert "Errors: run: no score file: evaluate --scores FILE" in " ".join(result.output.split())

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the report loaded a model")

    monkeypatch.setattr(checkpoint_module, "load_checkpoint", refuse)
    make_errors_run(tmp_path / "again", tiny_checkpoint, tiny_data)
    result = runner.invoke(app, ["report", str(tmp_path / "again"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert 'id="errors"' not in out.read_text()
    result = runner.invoke(app, ["report", str(tmp_path / "again"), "--out", str(out), "--explain-errors", "1",
                                 "--errors-rule", "patternnet"])
    assert result.exit_code == 2 and "--errors-rule patternnet needs fitted patterns" in result.output


def make_sets_run(folder: Path) -> Path:
    """A run folder whose evaluate JSON scores two test sets at one threshold (evaluate --data A --data B), with
    the score file of both (its test_set column)."""
    from smadlrp.evaluation.breakdown import Breakdown

    rng = np.random.default_rng(7)
    folder.mkdir(parents=True)
    sets, summaries, paths, labels, scores, names = [], [], [], [], [], []
    for name, shift in (("smdd", 0.45), ("mordiff", 0.2)):
        y = np.repeat([0, 1], 50)
        s = np.clip(rng.normal(0.3 + shift * y, 0.2), 0, 1)
        groups = ["" if v == 0 else ("complete" if i % 2 else "partial") for i, v in enumerate(y)]
        summary = summarize(y, s, 0.5, threshold_source="stored", intervals=IntervalOptions(0.95, 50, 0))
        summaries.append((name, summary))
        sets.append({"data": f"/data/{name}", "metrics": summary, "groups": {"morph_type": group_breakdown(
            y, s, groups, 0.5, column="morph_type", threshold_source="stored")}})
        paths += [Path(f"{name}/img{i}.png") for i in range(len(y))]
        labels += y.tolist()
        scores += s.tolist()
        names += [name] * len(y)
    doc = to_jsonable({"checkpoint": "best.safetensors", "split": "test", "test_sets": sets,
                       "across_sets": Breakdown("test set", tuple(summaries), species=False),
                       "gates": {"failed": []}})
    (folder / "evaluate.json").write_text(json.dumps(doc))
    (folder / "scores.csv").write_text(scores_csv(paths, np.array(labels), np.array(scores), {"test_set": names}))
    return folder


def test_every_test_set_of_an_evaluate_json_has_its_column(tmp_path: Path) -> None:
    folder = make_sets_run(tmp_path / "sets")
    report = build_report([folder])
    parsed = parse(report.html)
    doc = json.loads((folder / "evaluate.json").read_text())
    rates, confusion = table(parsed, "ISO/IEC 30107-3 rates"), table(parsed, "Confusion matrix")
    head = [text for t in parsed.tables if t["caption"].startswith("ISO/IEC") for row in t["rows"]
            if row and row[-1][0] == "th" for _, text in row]
    assert head == ["metric", "smdd", "mordiff"]
    for column, found in enumerate(doc["test_sets"]):
        metrics = found["metrics"]
        assert confusion["TP: morph called morph"][column] == str(metrics["tp"])
        assert confusion["APCER: FN / morphs"][column] == percent(metrics["apcer"])
        low, high = metrics["d-eer_ci"]
        assert rates["d-eer *"][column] == f"{percent(metrics['d-eer'])} [{100 * low:.1f}, {100 * high:.1f}]"
        assert rates["bpcer10 *"][column].split(" [")[0] == percent(metrics["bpcer10"])
        average = found["groups"]["morph_type"]["average"]["apcer"]["value"]
        assert table(parsed, "By morph_type")["Average"][2 * 2 + column] == percent(average)  # APCER, column-major
    across = table(parsed, "By test set")
    parts = doc["across_sets"]["parts"]
    assert [p["name"] for p in parts] == ["smdd", "mordiff"]
    for part in parts:
        assert across[part["name"]][:2] == [str(part["n_morph"]), str(part["n_bonafide"])]
        low, high = part["apcer_ci"]
        assert across[part["name"]][2] == f"{percent(part['apcer'])} [{100 * low:.1f}, {100 * high:.1f}] " \
                                          f"({part['fn']} missed)"
    worst = doc["across_sets"]["worst"]["apcer"]
    assert f"{percent(worst['value'])} ({worst['part']})" in across["Worst"]
    assert 'alt="DET curves of smdd, mordiff:' in report.html
