"""Foundation-model recipes through the commands, with random weights at small sizes: MADation's LoRA on a CLIP
ViT-B/16 (finetune, evaluate, explain, trace, predict; only adapters and head change; the merged checkpoint computes
the adapted model; resume is exact), and Colbois & Marcel's one-class GMM on frozen DINOv2 features (finetune,
evaluate, explain; a second fit reads no image)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from smadlrp.cli import app
from smadlrp.core.container import read_tensors
from smadlrp.data import loading
from smadlrp.detector.checkpoint import ADAPTER_PREFIX, load_checkpoint
from smadlrp.detector.frozen_heads import GMMHead
from smadlrp.detector.models import build_model
from smadlrp.detector.train import Finetuner, read_resume

pytest.importorskip("open_clip")
pytest.importorskip("timm")
pytest.importorskip("peft")
runner = CliRunner()
CPU = ("--device", "cpu")


def invoke(*args: object) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result.output


def refused(*args: object) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    return result.output.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def clip_start(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random CLIP ViT-B/16 weights at 32 px, saved as the run's starting file."""
    from smadlrp.core.container import write_document

    torch.manual_seed(5)
    model, _ = build_model("clip_vit_b_16", 2, "none", image_size=32)
    path = tmp_path_factory.mktemp("clip") / "start.safetensors"
    write_document(path, model.state_dict(), {})
    return path


def lora_run(data: Path, start: Path, out: Path, epochs: int = 1) -> list[object]:
    return ["finetune", "--arch", "clip_vit_b_16", "--lora", 4, "--weights", start, "--image-size", 32,
            "--epochs", epochs, "--batch-size", 16, "--lr", 1e-2, "--data", data, "--out", out, *CPU]


@pytest.mark.slow
def test_madation_lora_recipe_end_to_end(tiny_data: Path, clip_start: Path, tmp_path: Path) -> None:
    """Two epochs straight, and one epoch resumed to two: the same tensors (an exact resume); then every command on
    the resumed run's checkpoint, which only the adapters and the head changed."""
    invoke(*lora_run(tiny_data, clip_start, tmp_path / "straight", epochs=2))
    run = tmp_path / "run"
    invoke(*lora_run(tiny_data, clip_start, run, epochs=1))
    invoke("finetune", "--resume", run, "--epochs", 2, *CPU)
    straight, resumed = (read_tensors(tmp_path / name / "last.safetensors") for name in ("straight", "run"))
    assert straight.keys() == resumed.keys()
    for key, tensor in straight.items():
        assert torch.equal(tensor, resumed[key]), key

    checkpoint = run / "last.safetensors"
    model_options = ("--checkpoint", checkpoint, *CPU)
    image = sorted((tiny_data / "test" / "morph").glob("*.png"))[0]
    invoke("evaluate", "--data", tiny_data, *model_options)
    invoke("explain", image, "--rule", "all", "--out", tmp_path / "explain", *model_options)
    invoke("trace", image, "--out", tmp_path / "trace", *model_options)
    assert "P(morph)" in invoke("predict", image, *model_options)

    model, meta = load_checkpoint(checkpoint)
    assert meta.training["backbone"] == {"library": "open_clip", "model": "ViT-B-16", "tag": "openai"}
    recorded = meta.training["lora"]
    assert (recorded["rank"], recorded["alpha"], recorded["targets"]) == (4, 4.0, ["q", "v"])
    width, layers = 768, 12
    assert recorded["trainable_parameters"] == layers * 2 * 4 * 2 * width + (512 * 2 + 2)  # A and B on q, v; head
    assert json.loads((run / "history.json").read_text())["lora"] == recorded

    # only the adapted projections (q and v rows of the packed weights) and the head changed
    start = read_tensors(clip_start)
    adapters = {k.removeprefix(ADAPTER_PREFIX): v for k, v in resumed.items() if k.startswith(ADAPTER_PREFIX)}
    assert len(adapters) == layers * 2 * 2
    for name, tensor in start.items():
        if name.startswith("head."):
            assert not torch.equal(resumed[name], tensor), name
        elif name.endswith("attn.in_proj_weight"):
            prefix = name.removesuffix("in_proj_weight")
            for row, target in zip(range(3), "qkv", strict=True):
                rows = slice(row * width, (row + 1) * width)
                if target == "k":
                    assert torch.equal(resumed[name][rows], tensor[rows]), name
                else:  # the merged weight is the start plus B @ A (alpha = rank: a scaling of 1)
                    a, b = adapters[f"{prefix}{target}.lora_A"], adapters[f"{prefix}{target}.lora_B"]
                    torch.testing.assert_close(resumed[name][rows], tensor[rows] + b @ a, rtol=0, atol=1e-6)
        else:
            assert torch.equal(resumed[name], tensor), name

    # the merged checkpoint computes what the adapted (unmerged) training model computes
    config, doc, tensors = read_resume(run)
    trainer = Finetuner(config, tiny_data, tmp_path / "again", torch.device("cpu"))
    trainer.restore(doc, tensors)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trainer.model.eval()(x), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_one_class_gmm_on_frozen_dinov2_end_to_end(tiny_data: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMADLRP_CACHE", str(tmp_path / "cache"))
    fit = ("finetune", "--arch", "timm/vit_small_patch14_dinov2", "--frozen", "--head", "gmm", "--weights", "none",
           "--image-size", 42, "--batch-size", 8, "--data", tiny_data, *CPU)
    invoke(*fit, "--out", tmp_path / "run")
    checkpoint = tmp_path / "run" / "best.safetensors"
    model, meta = load_checkpoint(checkpoint)
    assert meta.head["kind"] == "gmm" and isinstance(model.head, GMMHead)
    image = sorted((tiny_data / "test" / "morph").glob("*.png"))[0]
    invoke("evaluate", "--data", tiny_data, "--checkpoint", checkpoint, *CPU)
    said = invoke("explain", image, "--checkpoint", checkpoint, "--out", tmp_path / "explain",
                  "--json", tmp_path / "explain.json", *CPU)
    assert "gradient x input" in " ".join(said.split())  # never silently an LRP map
    assert "gradient x input" in json.loads((tmp_path / "explain.json").read_text())["head"]
    line = refused("fit-patterns", "--checkpoint", checkpoint, "--data", tiny_data, "--out", tmp_path / "p.safetensors",
                   *CPU)
    assert "normalisation, attention or mixture layer" in line  # no PatternNet signal through either

    def no_image(path: object) -> object:
        raise AssertionError(f"an image was read: {path}")

    monkeypatch.setattr(loading, "load_rgb", no_image)
    said = invoke(*fit, "--out", tmp_path / "second")
    assert "reusing cached features" in said
    first, second = (read_tensors(tmp_path / name / "best.safetensors") for name in ("run", "second"))
    for key in ("head.means", "head.precisions_cholesky", "head.calibration_a"):
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize(("args", "message"), [
    (("--arch", "resnet18", "--lora", 4), "--lora: resnet18 has no attention projections to adapt"),
    (("--arch", "vit_b_16", "--lora", 4, "--full"), "--lora trains the adapters and the head only: drop --full"),
    (("--arch", "vit_b_16", "--lora", 4, "--lora-targets", "q,x"), "--lora-targets"),
    (("--head", "gmm"), "--head chooses the head that --frozen fits: add --frozen"),
    (("--frozen", "--head", "forest"), "--head 'forest': choose one of linear, logistic, svm, gmm"),
])
def test_recipe_options_that_cannot_work_are_one_line(args: tuple[object, ...], message: str, tiny_data: Path,
                                                      tmp_path: Path) -> None:
    line = refused("finetune", *args, "--weights", "none", "--image-size", 32, "--data", tiny_data,
                   "--out", tmp_path / "run", *CPU)
    assert message in line
