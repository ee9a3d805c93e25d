"""Robustness: `finetune --augment` (seeded, recorded) and `evaluate --perturb` (checked against an independent
scoring of the perturbed images)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from smadlrp.cli import app
from smadlrp.core.container import read_tensors
from smadlrp.data.loading import eval_transform, list_images
from smadlrp.detector.checkpoint import load_checkpoint
from smadlrp.detector.train import Finetuner, TrainConfig
from smadlrp.evaluation.metrics import d_eer

runner = CliRunner()


def _config(data: Path, augment: str) -> TrainConfig:
    return TrainConfig(arch="vgg_compact", epochs=1, batch_size=8, lr=1e-2, optimizer="sgd", image_size=32,
                       full=True, weights="none", seed=5, data=str(data), augment=augment)


@pytest.mark.slow
def test_augmented_training_is_seeded_and_recorded(tiny_data: Path, tmp_path: Path) -> None:
    device = torch.device("cpu")
    runs = {}
    for name, augment in (("a", "jpeg:50-95,blur:0-1.5"), ("b", "jpeg:50-95,blur:0-1.5"), ("plain", "")):
        Finetuner(_config(tiny_data, augment), tiny_data, tmp_path / name, device).run()
        runs[name] = read_tensors(tmp_path / name / "last.safetensors")
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["plain"][k]) for k in runs["a"])
    _, meta = load_checkpoint(tmp_path / "a" / "last.safetensors")
    assert meta.training["augment"] == "jpeg:50-95,blur:0-1.5" and meta.training["seed"] == 5


def test_bad_augment_spec_is_one_red_line(tiny_data: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["finetune", "--data", str(tiny_data), "--augment", "jpeg:95-50", "--weights",
                                 "none", "--out", str(tmp_path / "r"), "--device", "cpu"])
    assert result.exit_code == 2
    assert "--augment 'jpeg:95-50': the range's low end exceeds its high end" in result.output
    assert "Traceback" not in result.output


@torch.no_grad()
def _jpeg_scores(checkpoint: Path, data: Path, quality: int) -> tuple[np.ndarray, np.ndarray]:
    """P(morph) of every test image after PIL's own JPEG round trip, scored one by one."""
    model, meta = load_checkpoint(checkpoint)
    transform = eval_transform(meta.input_size, meta.mean, meta.std)
    labels, scores = [], []
    for label, name in enumerate(meta.class_names):
        for path in list_images(data / "test" / name):
            buffer = io.BytesIO()
            Image.open(path).convert("RGB").save(buffer, format="JPEG", quality=quality)
            x = transform(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")).unsqueeze(0)
            scores.append(float(torch.softmax(model(x).double(), 1)[0, meta.attack_index]))
            labels.append(int(label == meta.attack_index))
    return np.array(labels), np.array(scores)


@pytest.mark.slow
def test_evaluate_perturb_adds_a_block_per_condition(tiny_checkpoint: Path, tiny_data: Path,
                                                     tmp_path: Path) -> None:
    report, figure = tmp_path / "e.json", tmp_path / "robustness.png"
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_data),
                                 "--perturb", "jpeg:10", "--perturb", "print-scan", "--robustness", str(figure),
                                 "--det", str(tmp_path / "det.png"), "--device", "cpu", "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert "jpeg:10" in result.output and "print-scan" in result.output
    doc = json.loads(report.read_text())
    assert list(doc["perturbed"]) == ["jpeg:10", "print-scan"]
    labels, scores = _jpeg_scores(tiny_checkpoint, tiny_data, 10)
    assert doc["perturbed"]["jpeg:10"]["d-eer"] == pytest.approx(d_eer(labels, scores).value, abs=1e-12)
    assert doc["perturbed"]["jpeg:10"]["threshold"] == doc["metrics"]["threshold"]
    assert Image.open(figure).size[0] > 300


def test_bad_perturb_spec_is_one_red_line(tiny_checkpoint: Path, tiny_data: Path) -> None:
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_data),
                                 "--perturb", "jpeg:200", "--device", "cpu"])
    assert result.exit_code == 2
    assert "--perturb 'jpeg:200': jpeg's quality lies in [1, 95]" in result.output


def test_explain_perturb_writes_each_condition(tiny_checkpoint: Path, tiny_data: Path, tmp_path: Path) -> None:
    images = list_images(tiny_data / "test" / "morph")[:2]
    out, report = tmp_path / "explain", tmp_path / "x.json"
    result = runner.invoke(app, ["explain", *map(str, images), "--checkpoint", str(tiny_checkpoint), "--rule",
                                 "epsilon", "--perturb", "blur:0", "--perturb", "jpeg:20", "--out", str(out),
                                 "--device", "cpu", "--json", str(report)])
    assert result.exit_code == 0, result.output
    doc = json.loads(report.read_text())
    for image in doc["images"]:
        unchanged, jpeg = image["perturbed"]["blur:0"], image["perturbed"]["jpeg:20"]
        assert unchanged["p_attack"] == pytest.approx(image["p_attack"], abs=1e-9)  # blur 0 leaves the image as it is
        assert unchanged["correlation"]["epsilon"] == pytest.approx(1.0, abs=1e-9)
        assert -1.0 <= jpeg["correlation"]["epsilon"] < 1.0
        stem = Path(image["path"]).stem
        for name in (f"{stem}.jpeg-20.epsilon.heatmap.png", f"{stem}.blur-0.epsilon.overlay.png",
                     f"{stem}.perturb.png"):
            assert (out / name).is_file() and name in image["files"]
    assert Image.open(out / f"{Path(doc['images'][0]['path']).stem}.perturb.png").size[1] > 200
