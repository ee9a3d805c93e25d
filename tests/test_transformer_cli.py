"""The commands on transformer and ConvNeXt detectors: finetune a ViT, a Swin and a ConvNeXt at 32 px, then
explain (every rule), trace, compare-rules and regions on their checkpoints; on a bias-free copy, trace shows
the relevance of the input and of the learned terms adding up to the output's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from smadlrp.cli import app
from smadlrp.detector.checkpoint import load_checkpoint, save_checkpoint

runner = CliRunner()


def invoke(*args: object) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result.output


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vit_b_16", pytest.param("swin_t", marks=pytest.mark.sweep),
                                  pytest.param("convnext_tiny", marks=pytest.mark.sweep)])  # make test-all: all
def test_transformer_detector_end_to_end(arch: str, tiny_synth: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    invoke("finetune", "--full", "--arch", arch, "--weights", "none", "--image-size", 32, "--epochs", 1,
           "--batch-size", 8, "--data", tiny_synth, "--out", run, "--device", "cpu")
    checkpoint = run / "best.safetensors"
    image = sorted((tiny_synth / "test" / "morph").glob("*.png"))[0]
    model_options = ("--checkpoint", checkpoint, "--device", "cpu")
    invoke("explain", image, "--rule", "all", "--out", tmp_path / "explain", "--json", tmp_path / "e.json",
           *model_options)
    explained = json.loads((tmp_path / "e.json").read_text())["images"][0]
    if arch == "vit_b_16":
        assert set(explained["term_relevance"]["epsilon"]) == {"class_token", "encoder.pos_embedding"}
    invoke("compare-rules", "--data", tiny_synth, "--rule", "epsilon", "--rule", "gamma-transformer",
           "--max-images", 6, "--patch-size", 4, "--steps", 4, "--out", tmp_path / "compare", *model_options)
    invoke("regions", "--data", tiny_synth, "--out", tmp_path / "regions", *model_options)

    model, meta = load_checkpoint(checkpoint)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):  # also attention's in_proj_bias
                param.zero_()
    bias_free = save_checkpoint(tmp_path / "bias_free.safetensors", model, meta)
    output = invoke("trace", image, "--rule", "zero", "--attention", "cp", "--checkpoint", bias_free, "--device", "cpu",
                    "--out", tmp_path / "trace", "--json", tmp_path / "t.json")
    traced = json.loads((tmp_path / "t.json").read_text())
    rows, terms = traced["layers"], traced["terms"]
    total = rows[0]["sum"] + sum(terms.values())
    assert total == pytest.approx(rows[-1]["sum"], rel=1e-4)
    if terms:
        assert "input + terms" in output
