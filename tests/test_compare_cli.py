"""`smadlrp compare-rules` end to end on a small synthetic set with a tiny checkpoint."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import smadlrp.lrp as lrp
from smadlrp.cli import app
from smadlrp.data.loading import eval_transform, load_rgb
from smadlrp.data.synthetic.generator import SynthConfig, generate_dataset
from smadlrp.detector.checkpoint import load_checkpoint

runner = CliRunner()
METHODS = ["epsilon", "zero", "gradient", "gradient*input", "random"]


def _invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 identities at 64 px: 20 test images (10 morphs with artifact masks) and a manifest."""
    out = tmp_path_factory.mktemp("synth") / "set"
    generate_dataset(out, SynthConfig(identities=12, image_size=64, seed=0), workers=1)
    return out


@pytest.fixture(scope="session")
def compared(synth_small: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, dict[str, Any], str]:
    """One run with two rules, three batches (5 + 5 + 2) and 4-pixel patches on the 32-px model input."""
    out = tmp_path_factory.mktemp("compare")
    code, output = _invoke("compare-rules", "--checkpoint", str(tiny_checkpoint), "--data", str(synth_small),
                           "--rule", "epsilon", "--rule", "zero", "--max-images", "12", "--batch-size", "5",
                           "--patch-size", "4", "--steps", "6", "--seed", "1", "--device", "cpu",
                           "--out", str(out / "res"), "--json", str(out / "r.json"))
    assert code == 0, output
    return out / "res", json.loads((out / "r.json").read_text()), output


@pytest.mark.slow
def test_outputs_exist_and_agree(compared: tuple[Path, dict[str, Any], str]) -> None:
    out, report, output = compared
    methods = {m["name"]: m for m in report["methods"]}
    assert list(methods) == METHODS
    assert [m["kind"] for m in report["methods"]] == ["rule"] * 2 + ["baseline"] * 3
    assert report["n_images"] == 12 == len(set(report["images"]))
    assert report["class_counts"] == {"bonafide": 6, "morph": 6}
    assert (report["target"], report["patch_size"], report["steps"]) == ("morph", 4, 6)
    for name in METHODS:
        assert name in output
    assert "Localisation per morph type" in output
    with open(out / "compare-rules.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["method"] for row in rows] == METHODS
    for row in rows:
        m = methods[row["method"]]
        assert float(row["aopc"]) == pytest.approx(m["aopc"], abs=1e-6)
        assert float(row["ms_per_image"]) == pytest.approx(m["ms_per_image"], abs=1e-4)
        assert float(row["mass_accuracy"]) == pytest.approx(m["localisation"]["mass_accuracy"], abs=1e-6)
        assert int(row["n_images"]) == m["localisation"]["n_images"]
        for t, loc in m["per_type"].items():
            assert float(row[f"{t}.pointing_game"]) == pytest.approx(loc["pointing_game"], abs=1e-6)
        assert len(m["curve"]) == 7 and m["curve"][0] == 0.0
        assert np.mean(m["curve"]) == pytest.approx(m["aopc"], rel=1e-6, abs=1e-9)
        assert m["aopc_vs_random"] == pytest.approx(m["aopc"] - methods["random"]["aopc"], abs=1e-12)
        assert sum(loc["n_images"] for loc in m["per_type"].values()) == m["localisation"]["n_images"]
    with Image.open(out / "perturbation-curves.png") as img:
        assert img.format == "PNG" and img.size[0] > 600


@pytest.mark.slow
def test_lrp_zero_equals_gradient_times_input(compared: tuple[Path, dict[str, Any], str]) -> None:
    """On a ReLU network LRP-0 is gradient x input, so the two rows must agree (an independent cross-check)."""
    methods = {m["name"]: m for m in compared[1]["methods"]}
    zero, gi = methods["zero"], methods["gradient*input"]
    assert zero["aopc"] == pytest.approx(gi["aopc"], rel=1e-4, abs=1e-7)
    for key in ("mass_accuracy", "rank_accuracy", "pointing_game"):
        assert zero["localisation"][key] == pytest.approx(gi["localisation"][key], abs=1e-4)


def _inputs(report: dict[str, Any], checkpoint: Path) -> tuple[torch.nn.Module, torch.Tensor, list[Path]]:
    model, meta = load_checkpoint(checkpoint)
    transform = eval_transform(meta.input_size, meta.mean, meta.std)
    paths = [Path(p) for p in report["images"]]
    return model, torch.stack([transform(load_rgb(p)) for p in paths]), paths


@pytest.mark.slow
def test_localisation_matches_a_hand_computation(compared: tuple[Path, dict[str, Any], str], synth_small: Path,
                                                 tiny_checkpoint: Path) -> None:
    """gradient x input mass accuracy recomputed image by image; masks (64 px) halved by 2x2 block means >= 0.5."""
    report = compared[1]
    model, x, paths = _inputs(report, tiny_checkpoint)
    with open(synth_small / "manifest.csv", newline="") as fh:
        mask_of = {(synth_small / r["path"]).resolve(): synth_small / r["mask_path"] for r in csv.DictReader(fh)}
    values = []
    for i, path in enumerate(paths):
        if path.parent.name != "morph":
            continue
        mask = np.asarray(Image.open(mask_of[path.resolve()])) > 0
        small = mask.reshape(32, 2, 32, 2).mean(axis=(1, 3)) >= 0.5
        if not small.any():
            continue
        leaf = x[i:i + 1].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(leaf)[0, 1], leaf)
        rmap = (grad * leaf).sum(dim=1)[0].detach().double().numpy()
        positive = np.clip(rmap, 0, None)
        values.append(positive[small].sum() / positive.sum())
    loc = {m["name"]: m for m in report["methods"]}["gradient*input"]["localisation"]
    assert loc["n_images"] == len(values) > 0
    assert loc["mass_accuracy"] == pytest.approx(np.mean(values), abs=1e-5)


@pytest.mark.slow
def test_aopc_matches_a_step_by_step_loop(compared: tuple[Path, dict[str, Any], str], tiny_checkpoint: Path) -> None:
    """epsilon AOPC recomputed with loops over images, patches and steps (4-px patches on 32 px: an 8x8 grid)."""
    report = compared[1]
    model, x, _ = _inputs(report, tiny_checkpoint)
    maps = lrp.explain(model, x, "epsilon", target=1).sum(dim=1)
    versions = []
    for image, rmap in zip(x, maps, strict=True):
        sums = {(r, c): float(rmap[4 * r:4 * r + 4, 4 * c:4 * c + 4].sum()) for r in range(8) for c in range(8)}
        current, fill = image.clone(), image.mean(dim=(1, 2))
        versions.append(current.clone())
        for r, c in sorted(sums, key=lambda rc: -sums[rc])[:6]:
            current[:, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = fill[:, None, None]
            versions.append(current.clone())
    with torch.no_grad():
        scores = model(torch.stack(versions))[:, 1].view(len(x), 7).double().numpy()
    epsilon = {m["name"]: m for m in report["methods"]}["epsilon"]
    assert epsilon["aopc"] == pytest.approx((scores[:, :1] - scores).mean(), rel=1e-4, abs=1e-6)


def test_data_without_masks_shows_na(tiny_data: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    code, output = _invoke("compare-rules", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_data),
                           "--rule", "epsilon", "--max-images", "6", "--steps", "3", "--device", "cpu",
                           "--out", str(tmp_path / "res"), "--json", str(tmp_path / "r.json"))
    assert code == 0, output
    assert "localisation columns are n/a" in output and "n/a" in output
    report = json.loads((tmp_path / "r.json").read_text())
    assert "manifest" in report["localisation_note"]
    assert all(m["localisation"] is None and m["per_type"] == {} for m in report["methods"])
    with open(tmp_path / "res" / "compare-rules.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["mass_accuracy"] for row in rows] == [""] * 4
    assert (tmp_path / "res" / "perturbation-curves.png").is_file()


def test_missing_mask_file_is_one_clear_line(tiny_data: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "manifest.csv").write_text("path,label,mask_path\n"
                                       "test/morph/test_morph_00.png,morph,masks/test_morph_00.png\n")
    code, output = _invoke("compare-rules", "--checkpoint", str(tiny_checkpoint), "--data", str(data),
                           "--rule", "epsilon", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "res"))
    assert code == 1
    assert output.strip().splitlines()[-1] == \
        f"error: artifact mask not found: {data / 'masks/test_morph_00.png'} (listed in {data / 'manifest.csv'})"


@pytest.mark.parametrize(("args", "message"), [
    (["--rule", "bogus"], "unknown rule 'bogus'"),
    (["--rule", "patternnet"], "rule patternnet needs fitted patterns"),
    (["--rule", "epsilon", "--steps", "1000"], "--steps 1000: must lie in 1..256"),
    (["--rule", "epsilon", "--patch-size", "40"], "--patch-size 40: must lie in 1..32"),
    (["--rule", "epsilon", "--target", "predicted"], "compare-rules explains one class for every image"),
    (["--rule", "epsilon", "--target", "nonsense"], "--target 'nonsense': unknown class"),
    (["--rule", "epsilon", "--sum-split", "half"], "--sum-split 'half': choose z or absolute"),
])
def test_bad_input_exits_2_with_one_line(tiny_data: Path, tiny_checkpoint: Path, tmp_path: Path, args: list[str],
                                         message: str) -> None:
    code, output = _invoke("compare-rules", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_data),
                           "--device", "cpu", "--out", str(tmp_path / "res"), *args)
    assert code == 2
    assert message in output.strip().splitlines()[-1]


@pytest.mark.slow
def test_grid_search_compares_every_setting_and_names_the_best(synth_small: Path, tiny_checkpoint: Path,
                                                                tmp_path: Path) -> None:
    code, output = _invoke("compare-rules", "--checkpoint", str(tiny_checkpoint), "--data", str(synth_small),
                           "--rule", "epsilon-gamma-box", "--grid", "gamma=0,0.25", "--grid", "epsilon=0.01,1",
                           "--max-images", "6", "--patch-size", "4", "--steps", "4", "--device", "cpu",
                           "--out", str(tmp_path / "res"), "--json", str(tmp_path / "r.json"))
    assert code == 0, output
    report = json.loads((tmp_path / "r.json").read_text())
    settings = [m for m in report["methods"] if m["kind"] == "rule"]
    assert [m["name"] for m in settings] == [f"epsilon-gamma-box(gamma={g},epsilon={e})"
                                             for g in ("0", "0.25") for e in ("0.01", "1")]
    best = max(settings, key=lambda m: m["aopc"])
    params = best["name"][len("epsilon-gamma-box("):-1].split(",")
    assert f"most faithful setting: {best['name']}" in output
    assert f"use --param {params[0]} --param {params[1]}" in output
    code, output = _invoke("compare-rules", "--checkpoint", str(tiny_checkpoint), "--data", str(synth_small),
                           "--rule", "epsilon", "--grid", "epsilon", "--out", str(tmp_path / "bad"))
    assert code == 2 and "--grid 'epsilon': write PARAM=V1,V2,... with numbers" in output
