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
from smadlrp.explain.imputation import road_solve

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
        assert len(m["lerf_curve"]) == 7 and m["lerf_curve"][0] == 0.0
        assert m["abpc"] == pytest.approx(m["aopc"] - m["lerf_aopc"], abs=1e-9)
        assert float(row["abpc"]) == pytest.approx(m["abpc"], abs=1e-6)
        assert -1.0 <= m["class_sensitivity"] <= 1.0 and float(row["class_sensitivity"]) == pytest.approx(
            m["class_sensitivity"], abs=1e-6)
        assert m["randomisation"] is None and row["mprt_spearman"] == "" and m["checks"]["mprt"] is None
        assert m["summary"] in output.replace("\n", " ") or m["summary"][:40] in output
    assert report["imputation"] == "road" and report["replacement"].startswith("ROAD")
    assert report["thresholds"]["mprt_spearman_below"] == 0.5 and report["randomised_layers"] is None
    assert "Faithfulness and sanity checks" in output and "Checks per method" in output
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
    """epsilon AOPC in both orders recomputed with loops over images, patches and steps (4-px patches on 32 px: an
    8x8 grid), each step's removed pixels imputed by ROAD from the image's kept pixels, plus the image's noise
    (0.01 / std per channel, drawn from (seed 1, position in the subset))."""
    report = compared[1]
    model, x, _ = _inputs(report, tiny_checkpoint)
    _, meta = load_checkpoint(tiny_checkpoint)
    maps = lrp.explain(model, x, "epsilon", target=1).sum(dim=1)
    scale = 0.01 / np.asarray(meta.std).reshape(3, 1, 1)
    orders: dict[int, list[torch.Tensor]] = {1: [], -1: []}
    for position, (image, rmap) in enumerate(zip(x, maps, strict=True)):
        sums = {(r, c): float(rmap[4 * r:4 * r + 4, 4 * c:4 * c + 4].sum()) for r in range(8) for c in range(8)}
        noise = np.random.default_rng([1, position, 7]).standard_normal((3, 32, 32)) * scale
        for sign, versions in orders.items():
            removed = np.zeros((32, 32), bool)
            versions.append(image.clone())
            for r, c in sorted(sums, key=lambda rc: -sign * sums[rc])[:6]:
                removed[4 * r:4 * r + 4, 4 * c:4 * c + 4] = True
                filled = road_solve(image.double().numpy(), removed) + noise * removed
                versions.append(torch.from_numpy(filled).float())
    with torch.no_grad():
        morf, lerf = (model(torch.stack(orders[s]))[:, 1].view(len(x), 7).double().numpy() for s in (1, -1))
    epsilon = {m["name"]: m for m in report["methods"]}["epsilon"]
    assert epsilon["aopc"] == pytest.approx((morf[:, :1] - morf).mean(), rel=1e-4, abs=1e-5)
    assert epsilon["lerf_aopc"] == pytest.approx((lerf[:, :1] - lerf).mean(), rel=1e-4, abs=1e-5)
    assert epsilon["abpc"] == pytest.approx((lerf - morf).mean(), rel=1e-4, abs=1e-5)


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


def test_sanity_checks_and_mean_imputation_write_the_new_keys(tiny_data: Path, tiny_checkpoint: Path,
                                                              tmp_path: Path) -> None:
    code, output = _invoke("compare-rules", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_data),
                           "--rule", "epsilon", "--max-images", "4", "--steps", "3", "--impute", "mean", "--sanity",
                           "--device", "cpu", "--out", str(tmp_path / "res"), "--json", str(tmp_path / "r.json"))
    assert code == 0, output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["imputation"] == "mean" and report["replacement"] == "per-image channel mean"
    layers = report["randomised_layers"]
    assert layers[0] == "classifier" and layers[-1] == "features.0"
    methods = {m["name"]: m for m in report["methods"]}
    for m in methods.values():
        r = m["randomisation"]
        assert len(r["spearman"]) == len(r["ssim"]) == len(layers)
        assert set(m["checks"]) == {"localisation", "abpc", "mprt", "emprt", "class_sensitivity"}
        assert m["checks"]["mprt"] == (r["spearman"][-1] < 0.5) and m["checks"]["emprt"] == (r["emprt"] > 0)
        assert m["checks"]["localisation"] is None  # no masks
        assert m["summary"].startswith("passes ")
    random = methods["random"]["randomisation"]  # the same map whatever the weights
    assert random["spearman"] == pytest.approx([1.0] * len(layers)) and random["emprt"] == pytest.approx(0.0)
    assert methods["random"]["checks"]["mprt"] is False and methods["random"]["class_sensitivity"] == 1.0
    assert "MPRT ρ" in output and "epsilon: passes" in output
    with Image.open(tmp_path / "res" / "randomisation.png") as img:
        assert img.format == "PNG"
    with open(tmp_path / "res" / "compare-rules.csv", newline="") as fh:
        rows = {row["method"]: row for row in csv.DictReader(fh)}
    assert float(rows["epsilon"]["emprt"]) == pytest.approx(methods["epsilon"]["randomisation"]["emprt"], abs=1e-6)


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
    (["--rule", "epsilon", "--impute", "zero"], "--impute 'zero': choose road, mean, blur"),
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
