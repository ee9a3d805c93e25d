"""`smadlrp regions`: region shares against hand sums, SpRAy on known strategies, bad input, and a planted
shortcut that a tiny detector learns and the analysis finds."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shortcut_pictures import SIZE, train_tiny, write_pictures
from torch import nn
from typer.testing import CliRunner

from smadlrp.cli import app
from smadlrp.data.loading import IMAGENET_MEAN, IMAGENET_STD, scan_split
from smadlrp.data.regions import REGION_ID
from smadlrp.data.synthetic import generator as synthetic
from smadlrp.data.synthetic.generator import SynthConfig
from smadlrp.detector.checkpoint import CheckpointMeta
from smadlrp.explain.regions import load_region_ids, region_inputs, region_sums, region_table, relevance_maps
from smadlrp.explain.spray import knn_affinity, laplacian_spectrum, spray, spray_features
from smadlrp.lrp import Explainer

runner = CliRunner()


def test_region_shares_match_hand_sums_and_sum_to_one() -> None:
    ids = np.full((3, 4, 4), REGION_ID["background"], dtype=np.uint8)
    ids[:, :2, :2] = REGION_ID["left-eye"]  # 4 of 16 pixels
    ids[:, 3, :] = REGION_ID["mouth"]  # 4 of 16 pixels
    maps = np.zeros((3, 4, 4), dtype=np.float32)
    maps[0, 0, 0], maps[0, 3, 3], maps[0, 2, 2] = 3.0, 1.0, -4.0  # eye 3, mouth 1, background -4
    maps[1, 1, 1], maps[1, 2, 3] = 2.0, 2.0  # eye 2, background 2
    maps[2, 3, 0] = 5.0  # mouth 5 (a bona fide image)
    labels = np.array([1, 1, 0])
    rows = region_table(region_sums(maps, ids), labels, ["splicing", "complete", ""], ["bonafide", "morph"])
    by_name = {row.name: row for row in rows}
    assert list(by_name) == ["bonafide", "morph", "morph complete", "morph splicing"]
    eye, mouth, background = REGION_ID["left-eye"], REGION_ID["mouth"], REGION_ID["background"]
    morph = by_name["morph"]
    # image 0: positive 3/4 eye, 1/4 mouth; absolute 3/8, 1/8, 4/8. image 1: positive and absolute 1/2, 1/2
    assert morph.positive[eye] == pytest.approx((0.75 + 0.5) / 2)
    assert morph.positive[mouth] == pytest.approx(0.125)
    assert morph.absolute[background] == pytest.approx((0.5 + 0.5) / 2)
    assert morph.area[eye] == morph.area[mouth] == pytest.approx(0.25)
    assert by_name["bonafide"].positive[mouth] == pytest.approx(1.0)
    assert by_name["morph splicing"].positive[eye] == pytest.approx(0.75)
    for row in rows:
        for kind in (row.positive, row.absolute, row.area):
            assert kind.sum() == pytest.approx(1.0)


def test_spray_finds_two_known_strategies() -> None:
    rng = np.random.default_rng(0)
    maps = rng.normal(0, 0.05, (40, 16, 16)).astype(np.float32)
    maps[:25, 1:5, 1:5] += 1.0  # strategy A: a corner
    maps[25:, 8:14, 6:10] += 1.0  # strategy B: the centre
    result = spray(maps)
    assert result.count == 2 and result.chosen_by == "eigengap"
    assert len(set(result.clusters[:25])) == 1 and len(set(result.clusters[25:])) == 1
    assert result.clusters[0] != result.clusters[-1]
    central = result.central(int(result.clusters[0]))
    assert len(central) == 8 and all(i < 25 for i in central)
    assert spray(maps, clusters=3).count == 3


@pytest.fixture(scope="module")
def marked_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic set at 32 px whose test morphs carry the corner mark (3 in 4)."""
    out = tmp_path_factory.mktemp("marked") / "set"
    config = SynthConfig(identities=8, image_size=32, captures_per_identity=2, seed=2, shortcut="corner-mark",
                         shortcut_fraction=0.75, shortcut_splits=("test",))
    synthetic.generate_dataset(out, config, workers=1)
    return out


def _regions(checkpoint: Path, data: Path, tmp_path: Path, *extra: str) -> tuple[int, str, dict]:
    result = runner.invoke(app, ["regions", "--checkpoint", str(checkpoint), "--data", str(data), "--device",
                                 "cpu", "--out", str(tmp_path / "out"), "--json", str(tmp_path / "r.json"), *extra])
    report = json.loads((tmp_path / "r.json").read_text()) if result.exit_code == 0 else {}
    return result.exit_code, result.output, report


@pytest.mark.slow
def test_regions_command_writes_its_tables_figures_and_clusters(tiny_checkpoint: Path, marked_set: Path,
                                                                tmp_path: Path) -> None:
    code, output, report = _regions(tiny_checkpoint, marked_set, tmp_path, "--by", "morph_type", "--clusters", "2")
    assert code == 0, output
    assert "share of relevance per region" in output and "SpRAy: 2 clusters (--clusters)" in output
    assert [(r["class"], r["group"]) for r in report["rows"]][:2] == [("bonafide", None), ("morph", None)]
    for row in report["rows"]:
        for kind in ("positive", "absolute", "area"):
            assert sum(row[kind].values()) == pytest.approx(1.0)
    assert sum(c["images"] for c in report["spray"]["per_cluster"]) == report["images"] == 8
    for name in report["files"].values():
        assert Path(name).stat().st_size > 0
    for key in ("shares", "means", "clusters", "embedding"):
        with Image.open(report["files"][key]) as figure:
            assert figure.format == "PNG" and min(figure.size) > 300
    lines = (tmp_path / "out" / "spray-clusters.csv").read_text().splitlines()
    assert len(lines) == 9 and lines[0].startswith("path,class,group,cluster")


# the planted shortcut, small: grey noise pictures whose morphs carry a faint doubled bar (the "artifact"),
# and in the shortcut set the corner mark as well; a tiny CNN, the region maps from a user folder

def _pictures(tmp_path: Path, name: str, marks: Callable[[int], bool], count: int = 48) -> Path:
    return write_pictures(tmp_path / name, "test", marks, count=count, seed=len(name))


def _trained(root: Path) -> nn.Module:
    return train_tiny(root, "test")


@pytest.mark.slow
def test_a_planted_shortcut_is_learnt_and_found(tmp_path: Path) -> None:
    shortcut_model = _trained(_pictures(tmp_path, "marked", lambda i: True))
    clean_model = _trained(_pictures(tmp_path, "clean", lambda i: False))
    evaluation = _pictures(tmp_path, "half-marked", lambda i: i % 2 == 0)
    index = scan_split(evaluation, "test", ["bonafide", "morph"])
    meta = CheckpointMeta("tiny", ["bonafide", "morph"], "morph", SIZE, IMAGENET_MEAN, IMAGENET_STD, "none")
    inputs = region_inputs(index, by=None, regions_folder=evaluation / "regions", max_images=None, attack_index=1)
    marked = np.array([p.parent.name == "morph" and int(p.stem[-2:]) % 2 == 0 for p in inputs.paths])
    groups = ["mark" if m else "" for m in marked]
    ids = load_region_ids(inputs, SIZE)
    shares = {}
    for name, model in (("shortcut", shortcut_model), ("clean", clean_model)):
        explainer = Explainer(model, "epsilon-plus", class_names=meta.class_names)
        relevance = relevance_maps(inputs.paths, meta, explainer, "morph", batch_size=32, workers=0,
                                   device=torch.device("cpu"))
        rows = {row.name: row for row in region_table(region_sums(relevance.maps, ids), inputs.labels, groups,
                                                      meta.class_names)}
        shares[name] = rows["morph mark"].positive[REGION_ID["shortcut"]]
        area = rows["morph mark"].area[REGION_ID["shortcut"]]
        if name == "shortcut":
            result = spray(relevance.maps)
            mostly_marked = [c for c in range(result.count)
                             if marked[result.clusters == c].mean() > 0.5]
            purity = np.isin(result.clusters[marked], mostly_marked).mean()
            assert purity >= 0.8, purity
    assert shares["shortcut"] >= 5 * area, (shares, area)
    assert shares["shortcut"] >= 5 * shares["clean"], shares


def test_one_cluster_is_one_red_line(tiny_checkpoint: Path, marked_set: Path, tmp_path: Path) -> None:
    code, output, _ = _regions(tiny_checkpoint, marked_set, tmp_path, "--clusters", "1")
    assert code == 2 and "--clusters 1" in output and len(output.strip().splitlines()) == 1


def test_region_maps_that_do_not_match_their_images_are_refused(tiny_checkpoint: Path, marked_set: Path,
                                                               tmp_path: Path) -> None:
    folder = tmp_path / "maps"
    for image in sorted((marked_set / "test").rglob("*.png")):
        target = folder / image.relative_to(marked_set)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (16, 16)).save(target)
    code, output, _ = _regions(tiny_checkpoint, marked_set, tmp_path, "--regions", str(folder))
    assert code == 1 and "region map is 16x16 but its image is 32x32" in output
    assert "Traceback" not in output and len(output.strip().splitlines()) <= 2
    code, output, _ = _regions(tiny_checkpoint, marked_set, tmp_path, "--regions", str(tmp_path / "none"))
    assert code == 1 and "no region map" in output


def test_groups_of_morphs_need_morphs(tiny_checkpoint: Path, marked_set: Path, tmp_path: Path) -> None:
    code, output, _ = _regions(tiny_checkpoint, marked_set, tmp_path, "--by", "morph_type", "--max-images", "1")
    assert code == 1 and "no morph of split 'test' has a morph_type value" in output
    code, output, _ = _regions(tiny_checkpoint, marked_set, tmp_path, "--by", "colour")
    assert code == 2 and "no such column" in output



def test_laplacian_spectrum_matches_a_dense_eigendecomposition() -> None:
    rng = np.random.default_rng(1)
    features = spray_features(rng.normal(0, 1, (150, 8, 8)).astype(np.float32))
    affinity = knn_affinity(features, 10)
    dense = affinity.toarray()
    scale = 1 / np.sqrt(dense.sum(axis=1))
    expected = np.linalg.eigvalsh(np.eye(150) - scale[:, None] * dense * scale[None, :])[:11]
    np.testing.assert_allclose(laplacian_spectrum(affinity, 11), expected, atol=1e-8)
