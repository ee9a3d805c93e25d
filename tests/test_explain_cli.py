"""`smadlrp explain` and `smadlrp trace` end to end on a tiny checkpoint."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

import smadlrp.lrp as lrp
from smadlrp.cli import app
from smadlrp.core.errors import SmadlrpError
from smadlrp.data.loading import eval_transform, load_rgb
from smadlrp.detector.checkpoint import load_checkpoint
from smadlrp.explain.heatmaps import heatmap_rgb, overlay_rgb, rule_grid_figure
from smadlrp.explain.run import BackgroundWriter, layer_maps

runner = CliRunner()


def _invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture()
def two_same_names(tiny_data: Path, tmp_path: Path) -> Path:
    """Two `a.png` in different folders, one of them RGBA and one 16-bit grayscale."""
    for folder, source in (("x", "test/morph/test_morph_00.png"), ("y", "test/bonafide/test_bonafide_00.png")):
        (tmp_path / "in" / folder).mkdir(parents=True)
        shutil.copy(tiny_data / source, tmp_path / "in" / folder / "a.png")
    Image.open(tiny_data / "test/morph/test_morph_01.png").convert("RGBA").save(tmp_path / "in" / "x" / "rgba.png")
    grey16 = (np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "in" / "y" / "grey16.png")
    return tmp_path / "in"


@pytest.mark.slow
def test_explain_writes_maps_table_and_raw(tiny_checkpoint: Path, two_same_names: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, output = _invoke("explain", str(two_same_names), "--checkpoint", str(tiny_checkpoint), "--rule", "epsilon",
                           "--rule", "alpha1beta0", "--out", str(out), "--save-raw", "--device", "cpu",
                           "--json", str(tmp_path / "r.json"))
    assert code == 0, output
    names = sorted(p.name for p in out.iterdir())
    assert "x__a.grid.png" in names and "y__a.grid.png" in names  # same-named inputs stay apart
    for stem in ("x__a", "y__a", "x__rgba", "y__grey16"):
        for rule in ("epsilon", "alpha1beta0"):
            for kind in ("heatmap", "overlay"):
                with Image.open(out / f"{stem}.{rule}.{kind}.png") as img:
                    assert img.size == (32, 32) and img.mode == ("P" if kind == "heatmap" else "RGB")
        with Image.open(out / f"{stem}.grid.png") as img:
            assert img.size[0] > img.size[1] > 100
    report = json.loads((tmp_path / "r.json").read_text())
    model, meta = load_checkpoint(tiny_checkpoint)
    transform = eval_transform(meta.input_size, meta.mean, meta.std)
    with safe_open(str(out / "relevance.safetensors"), "pt") as raw:
        files = json.loads(raw.metadata()["smadlrp"])["files"]
        stored = raw.get_tensor("epsilon")
    for row in report["images"]:
        x = transform(load_rgb(row["path"]))[None]
        for rule in ("epsilon", "alpha1beta0"):
            expected = lrp.explain(model, x, rule).sum().item()
            assert row["relevance_sum"][rule] == pytest.approx(expected, rel=1e-5, abs=1e-7)
        reference = lrp.explain(model, x, "epsilon")[0]
        torch.testing.assert_close(stored[files.index(row["path"])], reference, rtol=1e-5, atol=1e-7)
        # the heatmap file decodes to the colours of the channel-summed map on its own robust scale
        stem = Path(row["files"][0]).name.split(".")[0]
        with Image.open(out / f"{stem}.epsilon.heatmap.png") as img:
            decoded = np.asarray(img.convert("RGB"))
        np.testing.assert_array_equal(decoded, heatmap_rgb(stored[files.index(row["path"])].sum(0).numpy()))


def test_trace_figure_keeps_24_evenly_spaced_maps_of_a_deep_graph() -> None:
    records = [lrp.TraceRecord(i, f"n{i}", "Conv2d", torch.full((1, 2, 3, 3), float(i))) for i in range(170)]
    records.append(lrp.TraceRecord(170, "output", "Output", torch.ones(1, 2)))
    maps, spatial = layer_maps(records)
    assert spatial == 170 and len(maps) == 24
    names = [name for name, _ in maps]
    assert names[0] == "0: n0" and names[-1] == "169: n169" and len(set(names)) == 24
    assert [int(n.split(":")[0]) for n in names] == sorted(int(n.split(":")[0]) for n in names)
    assert len(layer_maps(records[:10])[0]) == 10  # small graphs keep every map


def test_grid_has_one_panel_per_rule_plus_input() -> None:
    maps = {name: np.random.default_rng(0).normal(size=(8, 8)) for name in ("a", "b", "c", "d", "e", "f", "g")}
    fig = rule_grid_figure(np.zeros((8, 8, 3), np.uint8), maps)
    assert [ax.get_title() for ax in fig.axes] == ["input", *maps]


@pytest.mark.slow
def test_trace_sums_match_the_engine(tiny_checkpoint: Path, tiny_data: Path, tmp_path: Path) -> None:
    image = tiny_data / "test/morph/test_morph_02.png"
    code, output = _invoke("trace", str(image), "--checkpoint", str(tiny_checkpoint), "--rule", "alpha1beta0",
                           "--out", str(tmp_path), "--json", str(tmp_path / "t.json"))
    assert code == 0, output
    layers = json.loads((tmp_path / "t.json").read_text())["layers"]
    model, meta = load_checkpoint(tiny_checkpoint)
    x = eval_transform(meta.input_size, meta.mean, meta.std)(load_rgb(image))[None]
    with lrp.trace() as recorded:
        relevance = lrp.explain(model, x, "alpha1beta0")
    assert [r["name"] for r in layers] == [r.name for r in recorded.records]
    for row, rec in zip(layers, recorded.records, strict=True):
        assert row["sum"] == pytest.approx(float(rec.relevance.double().sum()), rel=1e-6, abs=1e-9)
    assert layers[0]["sum"] == pytest.approx(float(relevance.sum()), rel=1e-5)
    assert (tmp_path / "test_morph_02.alpha1beta0.trace.png").is_file()
    with safe_open(str(tmp_path / "test_morph_02.alpha1beta0.trace.safetensors"), "pt") as stored:
        assert len(stored.keys()) == len(layers)


@pytest.mark.parametrize(
    ("setup", "extra", "message"),
    [
        (lambda p: None, ["{tmp}/missing.png"], "no such file or folder"),
        (lambda p: (p / "empty").mkdir(), ["{tmp}/empty"], "no images found"),
        (lambda p: (p / "note.png").write_text("not an image"), ["{tmp}/note.png"], "not a readable image"),
        (lambda p: None, ["{data}", "--rule", "patternnet"], "needs fitted patterns"),
        (lambda p: (p / "file").write_text("x"), ["{data}", "--out", "{tmp}/file"], "is an existing file"),
        (lambda p: None, ["{data}", "--rule", "nonsense"], "unknown rule 'nonsense'"),
        (lambda p: None, ["{data}", "--target", "cat"], "--target 'cat'"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_checkpoint: Path, tiny_data: Path, tmp_path: Path, setup: object,
                                     extra: list[str], message: str) -> None:
    setup(tmp_path)  # type: ignore[operator]
    args = [a.format(tmp=tmp_path, data=tiny_data / "test" / "morph") for a in extra]
    code, output = _invoke("explain", *args[:1], "--checkpoint", str(tiny_checkpoint), *args[1:])
    assert code in (1, 2)
    assert message in output and "Traceback" not in output


def test_background_writer_runs_jobs_in_order_and_reports_a_failure() -> None:
    done: list[int] = []
    with BackgroundWriter(pending=2) as writer:
        for i in range(6):
            writer.submit(functools.partial(done.append, i))
    assert done == list(range(6))  # every job finished when the block ends

    def fail() -> None:
        raise SmadlrpError("cannot write out/a.png: No space left on device")

    with pytest.raises(SmadlrpError, match="No space left on device"), BackgroundWriter() as writer:
        writer.submit(fail)


def test_overlay_blends_heatmap_over_grey_by_relevance_magnitude() -> None:
    """Zero relevance shows the grey input; relevance at the limit is 60 % heatmap colour."""
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    image[..., 0] = 90  # grey value 30
    rmap = np.array([[0.0, 2.0], [-2.0, 1.0]], dtype=np.float32)
    heat = heatmap_rgb(rmap, 2.0)
    blended = overlay_rgb(image, rmap, limit=2.0).astype(np.float64)
    weight = 0.6 * np.clip(np.abs(rmap) / 2.0, 0, 1)[..., None]
    expected = np.floor((1 - weight) * 30.0 + weight * heat + 0.5)
    np.testing.assert_array_equal(blended, expected)
    assert (blended[0, 0] == 30).all()
    assert (heat[0, 0] >= 250).all()  # zero maps to (near) white


def test_pattern_kind_picks_the_estimator_of_the_pattern_file(tiny_checkpoint: Path, tiny_data: Path,
                                                                tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from smadlrp.lrp.patterns import load_patterns

    patterns, image, out = tmp_path / "p.safetensors", tiny_data / "test/morph/test_morph_00.png", tmp_path / "out"
    code, output = _invoke("fit-patterns", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_data), "--kind",
                           "all", "--max-images", "8", "--out", str(patterns), "--device", "cpu")
    assert code == 0, output
    common = (str(image), "--checkpoint", str(tiny_checkpoint), "--rule", "patternattribution", "--patterns",
              str(patterns), "--device", "cpu")
    code, output = _invoke("explain", *common, "--pattern-kind", "all", "--save-raw", "--out", str(out))
    assert code == 0, output
    model, meta = load_checkpoint(tiny_checkpoint)
    x = eval_transform(meta.input_size, meta.mean, meta.std)(load_rgb(image)).unsqueeze(0)
    expected = lrp.explain(model, x, "patternattribution", patterns=load_patterns(patterns)[0]["all"].patterns)
    assert torch.allclose(load_file(out / "relevance.safetensors")["patternattribution"], expected, atol=1e-6)
    code, output = _invoke("explain", *common, "--out", str(tmp_path / "out2"))  # default: positive, not in file
    assert code == 2 and "--pattern-kind all" in output and "--kind positive" in output, output
