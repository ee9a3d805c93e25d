"""`smadlrp predict --sheet`: one self-contained HTML page per image, with predict's score and decision, the
operating point, a heatmap and the decision under perturbation; an unreadable image gets a page that says so."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import render_in_chromium
from typer.testing import CliRunner

from smadlrp.cli import app

runner = CliRunner()


class _Page(HTMLParser):
    """The tags and attributes of a page, and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


def _images(tiny_data: Path) -> list[Path]:
    test = tiny_data / "test"
    return [test / "morph" / "test_morph_00.png", test / "bonafide" / "test_bonafide_00.png"]


def _predict(tiny_checkpoint: Path, images: list[Path], out: Path, *extra: str) -> tuple[int, str, dict]:
    json_out = out.parent / f"{out.name}.json"
    result = runner.invoke(app, ["predict", *map(str, images), "--checkpoint", str(tiny_checkpoint), "--sheet",
                                 str(out), "--json", str(json_out), *extra])
    return result.exit_code, result.output, json.loads(json_out.read_text()) if json_out.exists() else {}


@pytest.fixture(scope="module")
def sheets(tiny_checkpoint: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sheets") / "sheets"
    code, output, written = _predict(tiny_checkpoint, _images(tiny_data), out)
    assert code == 0, output
    return out, written


def test_a_self_contained_sheet_per_image(sheets: tuple[Path, dict]) -> None:
    out, _ = sheets
    pages = sorted(out.iterdir())
    assert [p.name for p in pages] == ["bonafide__test_bonafide_00.sheet.html", "morph__test_morph_00.sheet.html"]
    for page in pages:
        html = page.read_text(encoding="utf-8")
        parsed = _parse(html)
        assert "http" not in html.replace("http-equiv", "") and "<script" not in html
        for tag, attrs in parsed.tags:
            for key in ("src", "href"):
                assert not (attrs.get(key) or "").startswith("//"), (tag, attrs)
        images = [attrs for tag, attrs in parsed.tags if tag == "img"]
        assert len(images) == 3 and all(a["src"].startswith("data:image/png;base64,") for a in images)  # type: ignore[union-attr]
        assert all(a.get("alt") for a in images)
        text = " ".join(parsed.text)
        for line in ("not a proof that the photo is a morph", "not where the image was manipulated",
                     "epsilon-plus-flat", "Red marks pixels", "Does the decision hold?"):
            assert line in text
        assert "region" not in text.lower()  # no region shares on a sheet


def test_score_and_decision_equal_predicts_json(sheets: tuple[Path, dict]) -> None:
    out, written = sheets
    for row in written["images"]:
        stem = "__".join(Path(row["path"]).parts[-2:]).removesuffix(".png")
        html = (out / f"{stem}.sheet.html").read_text(encoding="utf-8")
        value = re.search(r'<data class="p-attack" value="([^"]+)">([^<]+)</data>', html)
        assert value is not None and float(value.group(1)) == row["score"]
        assert value.group(2) == f"{row['score']:.4f}"
        decision = re.search(r'<strong class="decision">([^<]+)</strong>', html)
        assert decision is not None and decision.group(1) == row["decision"]
        assert f"{written['threshold']:.4f}" in html


def test_perturbation_rows_and_fixed_threshold(tiny_checkpoint: Path, tiny_data: Path, tmp_path: Path) -> None:
    code, output, written = _predict(tiny_checkpoint, _images(tiny_data)[:1], tmp_path / "s", "--threshold", "0.5",
                                     "--sheet-perturb", "jpeg:30", "--sheet-perturb", "print-scan",
                                     "--sheet-perturb", "blur:1")
    assert code == 0, output
    html = (tmp_path / "s" / "test_morph_00.sheet.html").read_text(encoding="utf-8")
    rows = re.findall(r'<tr class="condition"><th scope="row">([^<]+)</th><td>([0-9.]+)</td>', html)
    assert [spec for spec, _ in rows] == ["jpeg:30", "print-scan", "blur:1"]
    assert all(0.0 <= float(score) <= 1.0 for _, score in rows)
    assert "no validation meaning" in html and "APCER on validation" not in html
    assert written["images"][0]["score"] is not None


def test_a_stored_point_shows_its_validation_rates(tiny_checkpoint: Path, tiny_data: Path, tmp_path: Path) -> None:
    from smadlrp.detector.checkpoint import load_checkpoint, save_checkpoint

    model, meta = load_checkpoint(tiny_checkpoint)
    meta.operating_points = {"split": "val", "epoch": 3, "n_bonafide": 8, "n_morph": 8,
                             "points": {"eer": {"threshold": 0.5, "apcer": 0.125, "bpcer": 0.25}}}
    checkpoint = tmp_path / "stored.safetensors"
    save_checkpoint(checkpoint, model, meta)
    code, output, _ = _predict(checkpoint, _images(tiny_data)[:1], tmp_path / "s")
    assert code == 0, output
    html = (tmp_path / "s" / "test_morph_00.sheet.html").read_text(encoding="utf-8")
    assert '<td class="apcer">12.50 %</td>' in html and '<td class="bpcer">25.00 %</td>' in html
    assert "no validation meaning" not in html


def test_a_corrupt_image_gets_a_page_and_exit_1(tiny_checkpoint: Path, tiny_data: Path, tmp_path: Path) -> None:
    broken = tmp_path / "in" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"this is not a png")
    code, output, written = _predict(tiny_checkpoint, [_images(tiny_data)[0], broken], tmp_path / "s")
    assert code == 1, output
    pages = {p.name: p.read_text(encoding="utf-8") for p in (tmp_path / "s").iterdir()}
    page = next(html for name, html in pages.items() if "broken" in name)
    assert "could not be read" in page and "not a readable image" in page and "<img" not in page
    assert [row["score"] is None for row in written["images"]] == [False, True]


def test_a_sheet_folder_holding_an_input_is_refused(tiny_checkpoint: Path, tiny_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(_images(tiny_data)[0], folder / "face.png")
    shutil.copy(_images(tiny_data)[1], folder / "face.sheet.png")  # the outputs of face.png are face.sheet.*
    result = runner.invoke(app, ["predict", str(folder / "face.png"), str(folder / "face.sheet.png"),
                                 "--checkpoint", str(tiny_checkpoint), "--sheet", str(folder)])
    assert result.exit_code == 2 and "--sheet" in result.output and "face.sheet.png" in result.output
    assert sorted(p.name for p in folder.iterdir()) == ["face.png", "face.sheet.png"]


@pytest.mark.parametrize(("option", "message"), [("patternnet", "needs fitted patterns"),
                                                  ("nonsense", "unknown rule")])
def test_a_rule_the_sheet_cannot_use_is_refused(tiny_checkpoint: Path, tiny_data: Path, tmp_path: Path,
                                                option: str, message: str) -> None:
    result = runner.invoke(app, ["predict", str(_images(tiny_data)[0]), "--checkpoint", str(tiny_checkpoint),
                                 "--sheet", str(tmp_path / "s"), "--sheet-rule", option])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
@pytest.mark.chromium
def test_chromium_renders_a_sheet_without_errors(sheets: tuple[Path, dict], tmp_path: Path) -> None:
    page = next(sheets[0].iterdir())
    assert "Does the decision hold?" in render_in_chromium(page, tmp_path)
