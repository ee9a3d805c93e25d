"""Fine-tuning: outputs, exact resume, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from smadlrp.cli import app
from smadlrp.core.container import read_tensors
from smadlrp.detector.checkpoint import load_checkpoint
from smadlrp.detector.train import Finetuner, TrainConfig

runner = CliRunner()


def _config(data: Path, epochs: int) -> TrainConfig:
    return TrainConfig(arch="vgg_compact", epochs=epochs, batch_size=4, lr=1e-2, optimizer="sgd", image_size=32,
                       full=True, weights="none", seed=3, data=str(data))


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tiny_data: Path, tmp_path: Path) -> None:
    device = torch.device("cpu")
    straight = Finetuner(_config(tiny_data, 3), tiny_data, tmp_path / "a", device)
    straight.run()
    first = Finetuner(_config(tiny_data, 1), tiny_data, tmp_path / "b", device)
    first.run()
    from smadlrp.detector.train import read_resume

    config, doc, tensors = read_resume(tmp_path / "b")
    config.epochs = 3
    resumed = Finetuner(config, tiny_data, tmp_path / "b", device)
    resumed.restore(doc, tensors)
    resumed.run()
    a = read_tensors(tmp_path / "a" / "last.safetensors")
    b = read_tensors(tmp_path / "b" / "last.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert straight.state.history[-1]["train_loss"] == resumed.state.history[-1]["train_loss"]


@pytest.mark.slow
def test_finetune_cli_writes_outputs(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["finetune", "--data", str(tiny_data), "--epochs", "2", "--batch-size", "8",
                                 "--image-size", "32", "--weights", "none", "--full", "--out", str(out),
                                 "--device", "cpu", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    for name in ("best.safetensors", "last.safetensors", "history.json", "training-curves.png", "resume.safetensors"):
        assert (out / name).is_file(), name
    model, meta = load_checkpoint(out / "best.safetensors")
    assert meta.class_names == ["bonafide", "morph"] and meta.attack_class == "morph"
    assert meta.training["full"] is True and meta.weights_source == "random initialisation"
    history = json.loads((out / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    assert Image.open(out / "training-curves.png").size[0] > 100
    # the output folder is never reused by accident
    again = runner.invoke(app, ["finetune", "--data", str(tiny_data), "--out", str(out), "--weights", "none"])
    assert again.exit_code == 2 and "not empty" in again.output


def test_finetune_refuses_bad_data(tiny_data: Path, tmp_path: Path) -> None:
    missing = runner.invoke(app, ["finetune", "--data", str(tmp_path / "nope"), "--weights", "none"])
    assert missing.exit_code == 1 and "data folder not found" in missing.output
    broken = tmp_path / "broken"
    for split in ("train", "val"):
        (broken / split / "bonafide").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(broken / split / "bonafide" / "a.png")
    (broken / "train" / "morph").mkdir()
    Image.new("RGB", (8, 8)).save(broken / "train" / "morph" / "b.png")
    result = runner.invoke(app, ["finetune", "--data", str(broken), "--weights", "none", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "class folder 'morph' is missing" in result.output
    assert "Traceback" not in result.output


def test_weights_file_of_another_architecture_is_refused(tiny_checkpoint: Path, tiny_data: Path,
                                                         tmp_path: Path) -> None:
    result = runner.invoke(app, ["finetune", "--arch", "alexnet", "--weights", str(tiny_checkpoint), "--data",
                                 str(tiny_data), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "does not hold alexnet weights" in result.output


def test_unavailable_device_is_a_usage_error(tiny_data: Path) -> None:
    if torch.cuda.is_available():
        return
    result = runner.invoke(app, ["finetune", "--device", "cuda", "--data", str(tiny_data)])
    assert result.exit_code == 2 and "CUDA is not available" in result.output
