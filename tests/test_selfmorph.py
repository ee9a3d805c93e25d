"""Self-blended pseudo-morphs: exact masks, the face region, seeded items, and `finetune --selfmorph`."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from smadlrp.cli import app
from smadlrp.data.align import AlignPolicy
from smadlrp.data.loading import DataSource, ImageDataset
from smadlrp.data.selfblend import RECIPE, face_ellipse, pseudo_morph
from smadlrp.data.selfmorph import FaceFinding, SelfMorphDataset, find_faces
from smadlrp.detector.checkpoint import load_meta

runner = CliRunner()
SIZE = 96


def _face_image(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A textured (SIZE, SIZE, 3) image and the face ellipse of dlib's chip template on it."""
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.uniform(0, 255, (SIZE, SIZE, 3)), (1.5, 1.5, 0)).astype(np.uint8)
    policy = AlignPolicy(size=SIZE)
    return image, face_ellipse(policy.template(), SIZE, SIZE)


def test_face_ellipse_covers_eyes_and_nose_and_turns_with_the_face() -> None:
    policy = AlignPolicy(size=200)
    points = policy.template()
    face = face_ellipse(points, 200, 200)
    for x, y in points.round().astype(int):
        assert face[y, x]
    assert 0.2 < face.mean() < 0.6  # a face, not the whole chip
    turned = np.rot90(face_ellipse(np.stack([points[:, 1], 199 - points[:, 0]], 1), 200, 200), k=-1)
    assert (turned != face).mean() < 0.01  # the same ellipse, rotated with its landmarks


def test_self_morph_changes_only_inside_its_mask() -> None:
    image, face = _face_image()
    recipe = dataclasses.replace(RECIPE, blend_share=0.0, frequency_p=1.0)  # self-morphing, with the pattern
    for seed in range(6):
        out, weight = pseudo_morph(image, face, np.random.default_rng(seed), recipe)
        outside = weight == 0
        assert np.array_equal(out[outside], image[outside])  # exact: the mask holds every changed pixel
        assert weight.max() in RECIPE.morph_ratios and weight.max() <= 0.5
        assert np.abs(out.astype(int) - image)[~outside].mean() > 1


def test_self_blend_mask_lies_on_the_face_and_changes_the_image() -> None:
    image, face = _face_image(1)
    recipe = dataclasses.replace(RECIPE, blend_share=1.0, frequency_p=0.0)
    reach = ndimage.binary_dilation(face, iterations=12)  # shift, scale and elastic warp move the mask a little
    for seed in range(6):
        out, weight = pseudo_morph(image, face, np.random.default_rng(seed), recipe)
        assert weight.dtype == np.float32 and 0 <= weight.min() and weight.max() <= 1
        assert weight[~reach].max() < 0.02
        assert weight.max() == pytest.approx(max(r for r in RECIPE.blend_ratios if r <= weight.max() + 1e-6),
                                             abs=1e-3)
        assert not np.array_equal(out, image)


def test_pseudo_morphs_repeat_with_their_seed() -> None:
    image, face = _face_image(2)
    first = pseudo_morph(image, face, np.random.default_rng(7))
    again = pseudo_morph(image, face, np.random.default_rng(7))
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])


def _bonafide_only(tiny_synth: Path, root: Path) -> Path:
    """The tiny synthetic set without its morphs (their manifest rows and folders gone)."""
    shutil.copytree(tiny_synth, root)
    for split in ("train", "val", "test"):
        shutil.rmtree(root / split / "morph")
    lines = (root / "manifest.csv").read_text().splitlines()
    (root / "manifest.csv").write_text("\n".join(lines[:1] + [ln for ln in lines[1:] if ",bonafide," in ln]) + "\n")
    return root


def test_faces_come_from_region_maps_and_items_are_seeded(tiny_synth: Path) -> None:
    split = DataSource(tiny_synth).split("val", attack_class="morph")
    bonafide = [i for i, s in enumerate(split.samples) if s.label == 0]
    finding = find_faces(split, 32, None)
    assert finding.source == "regions" and finding.found == len(split.samples)
    images = ImageDataset([split.samples[i] for i in bonafide], 32, [0.5] * 3, [0.5] * 3)
    faces = FaceFinding([finding.faces[i] for i in bonafide], "regions")
    val = SelfMorphDataset(images, faces, (0, 1), seed=0)
    assert len(val) == 2 * len(bonafide) and val.labels.tolist() == [0] * len(bonafide) + [1] * len(bonafide)
    x, label, _ = val[len(bonafide)]
    assert label == 1 and x.shape == (3, 32, 32)
    assert np.array_equal(x.numpy(), val[len(bonafide)][0].numpy())  # validation items are fixed
    train = SelfMorphDataset(images, faces, (0, 1), seed=None)
    draws = {train[len(bonafide)][0].numpy().tobytes() for _ in range(4)}
    assert len(draws) > 1  # training items are drawn anew


def test_finetune_selfmorph_trains_on_bonafide_images_alone(tiny_synth: Path, tmp_path: Path) -> None:
    data = _bonafide_only(tiny_synth, tmp_path / "bonafide-only")
    out = tmp_path / "run"
    done = runner.invoke(app, ["finetune", "--data", str(data), "--selfmorph", "--epochs", "1", "--batch-size", "8",
                               "--image-size", "32", "--weights", "none", "--out", str(out), "--json",
                               str(tmp_path / "run.json")])
    assert done.exit_code == 0, done.output
    meta = load_meta(out / "best.safetensors")
    record = meta.training["selfmorph"]
    assert meta.class_names == ["bonafide", "morph"] and record["mode"] == "only"
    assert record["face_source"] == "regions" and record["train_pseudo_morphs"] == record["faces_found"] > 0
    history = json.loads((tmp_path / "run.json").read_text())["history"]
    assert history[0]["d_eer"] is not None  # validated on pseudo-morphs: both classes present


def test_finetune_selfmorph_ignores_the_morphs_and_says_so(tiny_synth: Path, tmp_path: Path) -> None:
    done = runner.invoke(app, ["finetune", "--data", str(tiny_synth), "--selfmorph", "--epochs", "1",
                               "--batch-size", "8", "--image-size", "32", "--weights", "none", "--out",
                               str(tmp_path / "run")])
    assert done.exit_code == 0, done.output
    assert "morph(s) of the train split are ignored" in " ".join(done.output.split())


def test_selfmorph_without_face_positions_is_one_line(tiny_data: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Noise images: no region maps, no alignment record, and no face for dlib to find."""
    from smadlrp.data import selfmorph

    class NoDlib:
        def __init__(self, *args: object) -> None:
            raise selfmorph.AlignExtraMissing("dlib (package dlib-bin)")

    monkeypatch.setattr(selfmorph, "FaceAligner", NoDlib)
    done = runner.invoke(app, ["finetune", "--data", str(tiny_data), "--selfmorph", "--epochs", "1",
                               "--image-size", "32", "--weights", "none", "--out", str(tmp_path / "run")])
    assert done.exit_code != 0 and "Traceback" not in done.output
    assert "--selfmorph needs to know where each face is" in " ".join(done.output.split())


def test_finetune_refuses_selfmorph_with_frozen(tiny_synth: Path, tmp_path: Path) -> None:
    done = runner.invoke(app, ["finetune", "--data", str(tiny_synth), "--selfmorph", "--frozen", "--epochs", "1",
                               "--weights", "none", "--out", str(tmp_path / "run")])
    assert done.exit_code == 2 and "choose one" in done.output


def test_pseudo_morph_image_round_trip(tmp_path: Path) -> None:
    """A pseudo-morph saved as PNG with its weight as an 8-bit mask reloads to the same pixels and support."""
    image, face = _face_image(3)
    out, weight = pseudo_morph(image, face, np.random.default_rng(0))
    Image.fromarray(out).save(tmp_path / "m.png")
    Image.fromarray(np.rint(weight * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "m.png")), out)
    assert ((np.asarray(Image.open(tmp_path / "mask.png")) > 0) == (np.rint(weight * 255) > 0)).all()


def test_chips_made_by_align_share_one_face_ellipse(tiny_data: Path) -> None:
    split = DataSource(tiny_data).split("val", attack_class="morph")
    finding = find_faces(split, 64, {"policy": "chip", "size": 224, "margin": 0.25})
    expected = face_ellipse(AlignPolicy(size=224, margin=0.25).template() * 64 / 224, 64, 64)
    assert finding.source == "aligned chips" and finding.found == len(split.samples)
    assert all(np.array_equal(face, expected) for face in finding.faces)


@pytest.mark.dlib
def test_selfmorph_where_dlib_finds_no_face_is_one_line(tiny_data: Path, tmp_path: Path) -> None:
    done = runner.invoke(app, ["finetune", "--data", str(tiny_data), "--selfmorph", "--epochs", "1",
                               "--image-size", "32", "--weights", "none", "--out", str(tmp_path / "run")])
    assert done.exit_code != 0 and "Traceback" not in done.output
    assert "no face found in any bona fide image of the train split (face source: landmarks)" in \
        " ".join(done.output.split())
