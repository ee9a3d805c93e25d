"""`smadlrp align` on a real photograph (scikit-image's astronaut), failures to acquire, the recorded policy in
checkpoints, and `predict --align`. Needs the align extra (dlib-bin, face_recognition_models)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import astronaut_photo
from PIL import Image
from typer.testing import CliRunner

from smadlrp.cli import app
from smadlrp.data.align import AlignPolicy, FaceAligner

pytestmark = pytest.mark.dlib
pytest.importorskip("dlib")
runner = CliRunner()


def astronaut() -> Image.Image:
    """scikit-image's astronaut photograph (public domain, NASA)."""
    return Image.open(astronaut_photo()).convert("RGB")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """astronaut.jpg, the same rotated by 15 degrees in a subfolder, and a picture of sky without a face."""
    folder = tmp_path_factory.mktemp("photos")
    (folder / "sub").mkdir()
    astronaut().save(folder / "astronaut.jpg", quality=95)
    astronaut().rotate(15, resample=Image.Resampling.BICUBIC).save(folder / "sub" / "rotated.png")
    Image.new("RGB", (300, 200), (90, 140, 200)).save(folder / "sky.png")
    return folder


@pytest.mark.slow
def test_align_acceptance(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "aligned"
    result = runner.invoke(app, ["align", str(photos), str(out)])
    assert result.exit_code == 0, result.output
    assert "1/3" in result.output and "failure to acquire: sky.png: no face found" in result.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["astronaut.png", "sub/rotated.png"]
    doc = json.loads((out / "align.json").read_text())
    assert doc["counts"] == {"images": 3, "aligned": 2, "fta": 1, "fta_rate": pytest.approx(1 / 3)}
    assert doc["failures"] == [{"image": "sky.png", "reason": "no face found", "output": ""}]
    assert doc["policy"]["policy"] == "chip" and "dlib" in doc["detector"] and "5" in doc["landmark_model"]
    policy = AlignPolicy.from_dict(doc["policy"])
    aligner = FaceAligner(policy)
    for name in ("astronaut.png", "sub/rotated.png"):
        crop = Image.open(out / name)
        assert crop.size == (224, 224)
        found = aligner.detect(np.asarray(crop))  # landmarks found again in the crop, independently
        assert found is not None
        eyes = np.array(found[0].landmarks[:4], dtype=np.float64)
        assert np.abs(eyes - policy.template()[:4]).max() <= 4.0, (name, eyes)
    big = next(f for f in doc["images"] if f["image"] == "astronaut.jpg")
    assert big["box"][1] < 200  # the largest face, not the mission patch lower down


@pytest.mark.slow
def test_box_policy_and_center_crop(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "box"
    result = runner.invoke(app, ["align", str(photos), str(out), "--policy", "box", "--size", "128",
                                 "--on-failure", "center-crop"])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "align.json").read_text())
    assert doc["policy"] == {"policy": "box", "size": 128, "margin": 0.05, "on_failure": "center-crop",
                             "upsample": 1}
    assert doc["failures"][0]["output"] == "sky.png" and Image.open(out / "sky.png").size == (128, 128)
    face = next(f for f in doc["images"] if f["image"] == "astronaut.jpg")
    left, top, right, bottom = face["box"]
    grow = 0.05 * (right - left)
    box = (round(left - grow), round(top - grow), round(right + grow), round(bottom + grow))
    expected = Image.open(photos / "astronaut.jpg").convert("RGB").crop(box)
    expected = expected.resize((128, 128), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(Image.open(out / "astronaut.png")), np.asarray(expected))


@pytest.mark.slow
def test_corrupt_file_is_one_failure_line(photos: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    astronaut().save(folder / "a.png")
    (folder / "broken.png").write_bytes(b"not a png")
    result = runner.invoke(app, ["align", str(folder), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "broken.png" in line]
    assert len(lines) == 1 and "not a readable image" in lines[0]
    assert (tmp_path / "out" / "a.png").is_file()


def test_refuses_to_write_into_its_input(photos: Path) -> None:
    result = runner.invoke(app, ["align", str(photos), str(photos / "crops")])
    assert result.exit_code == 2 and "inside the input" in result.output


def test_without_the_extra_one_line_names_the_install(photos: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib now raises ImportError
    result = runner.invoke(app, ["align", str(photos), str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "pip install 'smadlrp[align]'" in result.output


def _face_tree(root: Path) -> Path:
    """train/val/test x bonafide/morph, two raw photographs each (the astronaut at two rotations; morphs mirrored)."""
    for split in ("train", "val", "test"):
        for label in ("bonafide", "morph"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i, angle in enumerate((0, 8)):
                image = astronaut().rotate(angle, resample=Image.Resampling.BICUBIC)
                (image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if label == "morph" else image).save(
                    folder / f"{split}_{i}.jpg", quality=90)
    return root


@pytest.mark.slow
def test_checkpoint_records_the_policy_and_predict_aligns_raw_photos(tmp_path: Path) -> None:
    raw, aligned, run = _face_tree(tmp_path / "raw"), tmp_path / "aligned", tmp_path / "run"
    assert runner.invoke(app, ["align", str(raw), str(aligned), "--size", "96"]).exit_code == 0
    result = runner.invoke(app, ["finetune", "--data", str(aligned), "--epochs", "1", "--batch-size", "4",
                                 "--image-size", "32", "--weights", "none", "--full", "--out", str(run),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    from smadlrp.detector.checkpoint import load_meta

    policy = json.loads((aligned / "align.json").read_text())["policy"]
    assert load_meta(run / "best.safetensors").alignment == policy
    scores = {}
    for name, image, extra in (("raw", raw / "test" / "morph" / "test_1.jpg", ["--align"]),
                               ("aligned", aligned / "test" / "morph" / "test_1.png", [])):
        result = runner.invoke(app, ["predict", str(image), "--checkpoint", str(run / "best.safetensors"),
                                     "--device", "cpu", "--json", str(tmp_path / f"{name}.json"), *extra])
        assert result.exit_code == 0, result.output
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())["images"][0]["score"]
    assert scores["raw"] == pytest.approx(scores["aligned"], abs=1e-4)
    explained = {}  # explain --align on the raw photograph explains what the aligned crop explains
    for name, image, extra in (("raw", raw / "test" / "morph" / "test_1.jpg", ["--align"]),
                               ("aligned", aligned / "test" / "morph" / "test_1.png", [])):
        result = runner.invoke(app, ["explain", str(image), "--checkpoint", str(run / "best.safetensors"), "--rule",
                                     "epsilon", "--device", "cpu", "--out", str(tmp_path / f"explained-{name}"),
                                     "--json", str(tmp_path / f"explained-{name}.json"), *extra])
        assert result.exit_code == 0, result.output
        explained[name] = json.loads((tmp_path / f"explained-{name}.json").read_text())["images"][0]
    assert explained["raw"]["p_attack"] == pytest.approx(explained["aligned"]["p_attack"], abs=1e-4)
    assert explained["raw"]["relevance_sum"]["epsilon"] == pytest.approx(
        explained["aligned"]["relevance_sum"]["epsilon"], rel=1e-3, abs=1e-6)


def test_align_option_needs_a_recorded_policy(tiny_checkpoint: Path, photos: Path) -> None:
    result = runner.invoke(app, ["predict", str(photos / "astronaut.jpg"), "--checkpoint", str(tiny_checkpoint),
                                 "--align", "--device", "cpu"])
    assert result.exit_code == 2 and "records no alignment" in result.output


@pytest.mark.slow
def test_protocol_in_protocol_out(photos: Path, tmp_path: Path) -> None:
    protocol = photos / "protocol.csv"
    protocol.write_text("path,label,split,subject\nastronaut.jpg,bonafide,test,a\nsub/rotated.png,morph,test,a\n"
                        "sky.png,bonafide,test,b\n")
    out = tmp_path / "aligned"
    try:
        result = runner.invoke(app, ["align", str(protocol), str(out), "--size", "64"])
    finally:
        protocol.unlink()
    assert result.exit_code == 0, result.output
    assert (out / "protocol.csv").read_text() == ("path,label,split,subject\nastronaut.png,bonafide,test,a\n"
                                                  "sub/rotated.png,morph,test,a\n")
    assert Image.open(out / "sub" / "rotated.png").size == (64, 64)
