"""The contrastive target: one relevance pass explaining z_attack - z_other, conserved against the logit
difference, equal to the difference of the two single-logit explanations for rules linear in the output
relevance; through explain, trace, compare-rules and regions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

import smadlrp.lrp as lrp
from smadlrp.cli import app
from smadlrp.core.errors import UsageError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# every rule family: each is linear in the relevance that arrives at the output
RULES = [("zero", {}), ("epsilon", {}), ("gamma", {}), ("alpha1beta0", {}), ("alpha2beta1", {}),
         ("epsilon-plus-flat", {}), ("epsilon-gamma-box", {"mean": MEAN, "std": STD})]
runner = CliRunner()


def bias_free_resnet(classes: int = 2) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=classes).eval().double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.zero_()  # type: ignore[union-attr]
                module.running_var.uniform_(0.5, 2.0)  # type: ignore[union-attr]
                module.bias.zero_()
        model.fc.bias.zero_()
    return model


@pytest.mark.parametrize(("rule", "params"), RULES)
def test_contrast_is_the_difference_of_the_two_single_logit_explanations(rule: str, params: dict[str, object]
                                                                          ) -> None:
    model = bias_free_resnet()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    explainer = lrp.Explainer(model, rule, **params)
    contrast = explainer.explain(x, lrp.Contrast(1))
    morph, bonafide = explainer.explain(x, 1), explainer.explain(x, 0)
    torch.testing.assert_close(contrast.relevance, morph.relevance - bonafide.relevance, rtol=1e-9, atol=1e-12)
    assert contrast.contrast and torch.equal(contrast.target, torch.ones(3, dtype=torch.int64))
    torch.testing.assert_close(contrast.explained, contrast.logits[:, 1] - contrast.logits[:, 0])


def test_contrast_relevance_sums_to_the_logit_difference_without_biases() -> None:
    model = bias_free_resnet()
    result = lrp.Explainer(model, "zero").explain(torch.randn(2, 3, 32, 32, dtype=torch.float64),
                                                  lrp.Contrast(1))
    difference = result.logits[:, 1] - result.logits[:, 0]
    torch.testing.assert_close(result.total(), difference, rtol=1e-8, atol=0.0)


def test_contrast_needs_two_classes() -> None:
    with pytest.raises(UsageError, match="two-class model; this one has 3 classes"):
        lrp.Explainer(bias_free_resnet(3), "epsilon").explain(torch.randn(1, 3, 32, 32, dtype=torch.float64),
                                                               lrp.Contrast(0))


@pytest.mark.slow
def test_contrast_through_the_commands(tiny_checkpoint: Path, tiny_synth: Path, tmp_path: Path) -> None:
    image = sorted((tiny_synth / "test" / "morph").glob("*.png"))[0]
    common = ("--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--target", "contrast")
    done = runner.invoke(app, ["explain", str(image), "--rule", "zero", "--out", str(tmp_path / "e"), "--json",
                               str(tmp_path / "e.json"), *common])
    assert done.exit_code == 0, done.output
    explained = json.loads((tmp_path / "e.json").read_text())["images"][0]
    assert explained["target"] == "morph - bonafide"
    done = runner.invoke(app, ["trace", str(image), "--rule", "zero", "--out", str(tmp_path / "t"), "--json",
                               str(tmp_path / "t.json"), *common])
    assert done.exit_code == 0, done.output
    traced = json.loads((tmp_path / "t.json").read_text())
    assert traced["target"] == "morph - bonafide"
    assert traced["explained"] == pytest.approx(explained["target_logit"], rel=1e-5)
    assert traced["layers"][-1]["sum"] == pytest.approx(traced["explained"], rel=1e-5)  # the output's relevance
    done = runner.invoke(app, ["compare-rules", "--data", str(tiny_synth), "--rule", "epsilon", "--max-images", "6",
                               "--patch-size", "4", "--steps", "4", "--out", str(tmp_path / "c"), "--json",
                               str(tmp_path / "c.json"), *common])
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "c.json").read_text())["target"] == "morph - bonafide"
    done = runner.invoke(app, ["regions", "--data", str(tiny_synth), "--out", str(tmp_path / "r"), *common])
    assert done.exit_code == 0, done.output
