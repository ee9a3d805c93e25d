"""`smadlrp predict --sheet`: one self-contained HTML page per image, with predict's score and decision, the
operating point, a heatmap and the decision under perturbation; an unreadable image gets a page that says so."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import hopper_photo, render_in_chromium
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
        assert "Region shares need landmarks or region maps" in " ".join(text.split())  # no region source: one line
        assert 'class="region-shares"' not in html


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


# ------------------------------------------------------------------------------- region shares

REGION_ROW = re.compile(r'<tr><th scope="row"><span class="swatch" style="[^"]*"></span>([a-z-]+)</th>'
                        r'<td class="photo-share">([^<]*)</td>(?:<td class="typical-share">([^<]*)</td>)?'
                        r'<td class="area-share">([^<]*)</td></tr>')


@pytest.fixture(scope="module")
def typical(tiny_checkpoint: Path, tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`smadlrp regions --json` of the tiny checkpoint on the tiny synthetic set's test split."""
    folder = tmp_path_factory.mktemp("typical")
    result = runner.invoke(app, ["regions", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_synth),
                                 "--device", "cpu", "--out", str(folder / "regions"), "--json",
                                 str(folder / "typical.json")])
    assert result.exit_code == 0, result.output
    return folder / "typical.json"


def _region_rows(html: str) -> dict[str, tuple[str, str | None, str]]:
    return {region: (photo, typical or None, area) for region, photo, typical, area in REGION_ROW.findall(html)}


def test_region_shares_beside_the_typical_shares(tiny_checkpoint: Path, tiny_synth: Path, typical: Path,
                                                 tmp_path: Path) -> None:
    """The photo's R+ share per region is the one `regions` computes, the typical share is the JSON's bona fide row,
    the area share the map's."""
    import numpy as np
    import torch

    from smadlrp.detector.checkpoint import load_checkpoint
    from smadlrp.explain.regions import RegionInputs, load_region_ids, region_sums, relevance_maps
    from smadlrp.explain.run import build_explainers
    from smadlrp.report.numbers import share

    image = sorted((tiny_synth / "test" / "morph").glob("*.png"))[0]
    code, output, _ = _predict(tiny_checkpoint, [image], tmp_path / "s", "--typical", str(typical), "--regions",
                               str(tiny_synth / "regions"), "--sheet-perturb", "jpeg:50")
    assert code == 0, output
    html = (tmp_path / "s" / f"{image.stem}.sheet.html").read_text(encoding="utf-8")
    doc = json.loads(typical.read_text())
    model, meta = load_checkpoint(tiny_checkpoint)
    explainer = build_explainers(model, meta, [doc["rule"]], {}, None)[doc["rule"]]
    maps = relevance_maps([image], meta, explainer, meta.attack_index, batch_size=1, workers=0,
                          device=torch.device("cpu"))
    region_map = tiny_synth / "regions" / "test" / "morph" / image.name
    ids = load_region_ids(RegionInputs([image], np.array([1]), [""], [region_map]), meta.input_size)
    sums = region_sums(maps.maps, ids)
    positive, area = sums.positive[0] / sums.positive[0].sum(), sums.area[0] / sums.area[0].sum()
    bona_fide = next(row for row in doc["rows"] if row["class"] == "bonafide" and not row["group"])
    rows = _region_rows(html)
    assert set(rows) == {r for i, r in enumerate(doc["regions"]) if area[i] > 0 or bona_fide["positive"][r]}
    for i, region in enumerate(doc["regions"]):
        if region in rows:
            assert rows[region] == (share(positive[i]), share(bona_fide["positive"][region]), share(area[i])), region
    text = " ".join(_parse(html).text)
    assert f"rule {doc['rule']}" in text and "bona fide row of typical.json" in text
    assert "not that the region was manipulated" in text and str(region_map) in text
    assert 'alt="The face regions of' in html


def test_a_typical_of_another_checkpoint_is_refused(tiny_checkpoint: Path, tiny_synth: Path, typical: Path,
                                                    tmp_path: Path) -> None:
    doc = json.loads(typical.read_text())
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**doc, "weights_fingerprint": "0" * 64}))
    image = sorted((tiny_synth / "test" / "morph").glob("*.png"))[0]
    command = ["predict", str(image), "--checkpoint", str(tiny_checkpoint), "--sheet", str(tmp_path / "s"),
               "--typical", str(other), "--regions", str(tiny_synth / "regions")]
    result = runner.invoke(app, command)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "made with other weights than" in errors[0], result.output
    assert not (tmp_path / "s").exists()
    del doc["weights_fingerprint"]  # a file without a fingerprint: the checkpoint it names must be this one
    other.write_text(json.dumps({**doc, "checkpoint": str(tmp_path / "elsewhere.safetensors")}))
    result = runner.invoke(app, command)
    assert result.exit_code == 1 and "made with another checkpoint" in result.output


def test_a_typical_of_a_rule_the_sheet_cannot_run_is_said(tiny_checkpoint: Path, tiny_synth: Path, typical: Path,
                                                          tmp_path: Path) -> None:
    other = tmp_path / "patternnet.json"
    other.write_text(json.dumps({**json.loads(typical.read_text()), "rule": "patternnet"}))
    image = sorted((tiny_synth / "test" / "bonafide").glob("*.png"))[0]
    code, output, _ = _predict(tiny_checkpoint, [image], tmp_path / "s", "--typical", str(other), "--regions",
                               str(tiny_synth / "regions"), "--sheet-perturb", "jpeg:50")
    assert code == 0, output
    html = (tmp_path / "s" / f"{image.stem}.sheet.html").read_text(encoding="utf-8")
    text = " ".join(" ".join(_parse(html).text).split())
    assert "The typical shares use rule patternnet, which the sheet cannot compute" in text
    assert "this photo's shares use epsilon-plus-flat" in text and len(_region_rows(html)) >= 5


def test_a_photo_without_a_map_gets_a_line(tiny_checkpoint: Path, tiny_data: Path, tiny_synth: Path,
                                           tmp_path: Path) -> None:
    code, output, _ = _predict(tiny_checkpoint, _images(tiny_data)[:1], tmp_path / "s", "--regions",
                               str(tiny_synth / "regions"), "--sheet-perturb", "jpeg:50")
    assert code == 0, output
    html = (tmp_path / "s" / "test_morph_00.sheet.html").read_text(encoding="utf-8")
    assert "No region shares for this photo: no region map for test_morph_00.png in" in html
    assert not _region_rows(html)


@pytest.mark.parametrize(("extra", "message"), [
    (["--landmarks", "dlib68", "--regions", "."], "give one"),
    (["--align", "--regions", "."], "--align crops"),
    (["--landmarks", "nonsense"], "choose dlib68"),
    (["--typical", "missing.json"], "no such file"),
])
def test_region_options_that_cannot_work_are_refused(tiny_checkpoint: Path, tiny_data: Path, tmp_path: Path,
                                                     extra: list[str], message: str) -> None:
    result = runner.invoke(app, ["predict", str(_images(tiny_data)[0]), "--checkpoint", str(tiny_checkpoint),
                                 "--sheet", str(tmp_path / "s"), *extra])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "s").exists()


def test_sheet_options_need_a_sheet(tiny_checkpoint: Path, tiny_data: Path) -> None:
    result = runner.invoke(app, ["predict", str(_images(tiny_data)[0]), "--checkpoint", str(tiny_checkpoint),
                                 "--typical", "t.json", "--pdf"])
    assert result.exit_code == 2 and "--typical, --pdf are options of the examiner sheets" in result.output


def _grace_hopper(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(hopper_photo(), folder / "grace_hopper.jpg")
    return folder / "grace_hopper.jpg"


@pytest.mark.dlib
def test_landmarks_of_a_real_face_give_its_regions(tiny_checkpoint: Path, tmp_path: Path) -> None:
    photo = _grace_hopper(tmp_path / "in")
    code, output, _ = _predict(tiny_checkpoint, [photo], tmp_path / "s", "--landmarks", "dlib68",
                               "--sheet-perturb", "jpeg:50")
    assert code == 0, output
    html = (tmp_path / "s" / "grace_hopper.sheet.html").read_text(encoding="utf-8")
    rows = _region_rows(html)
    assert {"left-eye", "right-eye", "nose", "face-skin", "background"} <= set(rows)  # the mouth may fall between
    assert "hair" not in rows and "shortcut" not in rows  # landmarks draw neither
    assert all(typical is None for _, typical, _ in rows.values())  # no --typical: no typical column
    assert abs(sum(float(photo) for photo, _, _ in rows.values()) - 100) < 0.6
    assert abs(sum(float(area) for _, _, area in rows.values()) - 100) < 0.6
    text = " ".join(" ".join(_parse(html).text).split())
    assert "non-commercial use only" in text and "--typical FILE" in text


@pytest.mark.slow
@pytest.mark.dlib
def test_an_aligned_sheet_shows_the_photo_and_the_crop(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`predict --sheet --align` with a checkpoint that records an alignment policy: the photo as stored and the
    aligned crop the detector saw, and region shares from landmarks found on the crop."""
    from smadlrp.data.align import AlignPolicy
    from smadlrp.detector.checkpoint import load_checkpoint, save_checkpoint

    model, meta = load_checkpoint(tiny_checkpoint)
    meta.alignment = AlignPolicy(size=96).as_dict()
    checkpoint = tmp_path / "aligned.safetensors"
    save_checkpoint(checkpoint, model, meta)
    photo = _grace_hopper(tmp_path / "in")
    code, output, _ = _predict(checkpoint, [photo], tmp_path / "s", "--align", "--landmarks", "dlib68",
                               "--sheet-perturb", "jpeg:50")
    assert code == 0, output
    html = (tmp_path / "s" / "grace_hopper.sheet.html").read_text(encoding="utf-8")
    photo_section = html[html.index('<section id="photo"'):html.index('<section id="threshold"')]
    captions = re.findall(r"<figcaption>([^<]+)</figcaption>", photo_section)
    assert len(captions) == 2 and captions[0].startswith("The photograph (")
    assert captions[1] == "The aligned crop the detector saw (32 x 32 px)"
    assert "no face alignment was asked for" not in html
    assert "found on the aligned crop" in " ".join(html.split()) and len(_region_rows(html)) >= 7


# ------------------------------------------------------------------------------- PDF

@pytest.mark.slow
@pytest.mark.chromium
def test_pdf_sheets_are_printed_on_a4(tiny_checkpoint: Path, tiny_data: Path, tmp_path: Path) -> None:
    code, output, _ = _predict(tiny_checkpoint, _images(tiny_data)[:1], tmp_path / "s", "--pdf",
                               "--sheet-perturb", "jpeg:50")
    assert code == 0, output
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["test_morph_00.sheet.html",
                                                                   "test_morph_00.sheet.pdf"]
    pdf = (tmp_path / "s" / "test_morph_00.sheet.pdf").read_bytes()
    assert pdf.startswith(b"%PDF-")
    boxes = re.findall(rb"/MediaBox\s*\[\s*0 0 ([0-9.]+) ([0-9.]+)\s*\]", pdf)
    assert boxes and all(abs(float(w) - 595.3) < 1.5 and abs(float(h) - 841.9) < 1.5 for w, h in boxes)  # A4 in pt
    assert "1 sheet(s) and 1 PDF(s)" in output


def test_pdf_without_chromium_is_one_line_before_any_work(tiny_checkpoint: Path, tiny_data: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("smadlrp.report.pdf.BROWSERS", ("no-such-chromium",))
    result = runner.invoke(app, ["predict", str(_images(tiny_data)[0]), "--checkpoint", str(tiny_checkpoint),
                                 "--sheet", str(tmp_path / "s"), "--pdf", "--json", str(tmp_path / "p.json")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "headless Chromium" in lines[0], result.output
    assert not (tmp_path / "s").exists() and not (tmp_path / "p.json").exists()


@pytest.mark.slow
@pytest.mark.chromium
def test_chromium_renders_a_region_sheet_without_errors(tiny_checkpoint: Path, tiny_synth: Path, typical: Path,
                                                        tmp_path: Path) -> None:
    image = sorted((tiny_synth / "test" / "morph").glob("*.png"))[0]
    code, output, _ = _predict(tiny_checkpoint, [image], tmp_path / "s", "--typical", str(typical), "--regions",
                               str(tiny_synth / "regions"), "--sheet-perturb", "jpeg:50")
    assert code == 0, output
    dom = render_in_chromium(tmp_path / "s" / f"{image.stem}.sheet.html", tmp_path)  # no refused inline style
    assert "Share of positive relevance per face region" in dom
