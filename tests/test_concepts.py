"""`smadlrp concepts`: conditional relevance (CRP) against its identities, the batched pass against one pass per
concept, the concept layers of residual and transformer graphs, prototypes, a planted shortcut, and the command on
a CNN, a DenseNet and a ViT."""

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
from torchvision.models.vision_transformer import VisionTransformer
from typer.testing import CliRunner

from smadlrp.cli import app
from smadlrp.core.errors import UsageError
from smadlrp.data.loading import IMAGENET_MEAN, IMAGENET_STD, scan_split
from smadlrp.data.regions import REGION_ID
from smadlrp.detector import architecture
from smadlrp.detector.architecture import Architecture
from smadlrp.detector.checkpoint import CheckpointMeta, save_checkpoint
from smadlrp.detector.models import ARCHITECTURES, build_model
from smadlrp.explain.concept_prototypes import fit_prototypes
from smadlrp.explain.concepts import conditional_shares, relevance_box, scan_layer, summarise, top_images
from smadlrp.explain.regions import RegionInputs, load_region_ids
from smadlrp.lrp import Explainer
from smadlrp.lrp.conditional import ConceptExplainer

runner = CliRunner()
CPU = ("--device", "cpu")


def _bias_free() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 2, bias=False)).double().eval()


def test_all_concepts_add_up_to_the_explanation_and_each_conserves_its_layer_relevance() -> None:
    model, x = _bias_free(), torch.randn(3, 3, 8, 8, dtype=torch.float64)
    explainer = Explainer(model, "zero")
    concepts = ConceptExplainer(explainer, x[:1])
    assert concepts.layer.name == "2" and concepts.layer.channels == 6  # the last convolution
    layer = concepts.layer_relevance(x, 1)
    full = explainer.explain(x, 1)
    torch.testing.assert_close(layer.channels.sum(1), full.logits[:, 1], rtol=1e-10, atol=1e-12)
    images, channels = torch.arange(3).repeat_interleave(6), torch.arange(6).repeat(3)
    cond = concepts.conditional(x, images, channels, 1)
    # summed over the layer's channels, the conditional relevances are the unconditional input relevance
    torch.testing.assert_close(cond.relevance.view(3, 6, 3, 8, 8).sum(1), full.relevance, rtol=1e-10, atol=1e-12)
    # one concept's input relevance sums to that channel's relevance at the layer (LRP-0, no biases: exact)
    torch.testing.assert_close(cond.total(), cond.layer, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cond.layer, layer.channels.flatten(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rule", ["epsilon-plus", "epsilon-gamma-box", "epsilon-alpha2-beta1", "zero"])
def test_the_batched_pass_equals_one_pass_per_concept_and_the_stacked_pass(rule: str) -> None:
    torch.manual_seed(1)
    model, _ = build_model("vgg_compact", 2, "none")
    bounds = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD} if rule == "epsilon-gamma-box" else {}
    explainer = Explainer(model.eval(), rule, class_names=["bonafide", "morph"], **bounds)
    x = torch.randn(2, 3, 32, 32)
    before = explainer.explain(x, "morph").relevance
    concepts = ConceptExplainer(explainer, x[:1])
    wanted = [(0, 5), (0, 17), (1, 5), (1, 99), (0, 127)]
    batched = concepts.conditional(x, [i for i, _ in wanted], [c for _, c in wanted], "morph")
    assert concepts.batched is True  # every rule of the registry batches (a vmap over the backward pass)
    for row, (image, channel) in enumerate(wanted):
        single = concepts.conditional(x, [image], [channel], "morph")
        torch.testing.assert_close(batched.relevance[row], single.relevance[0], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(batched.layer[row], single.layer[0], rtol=1e-5, atol=1e-7)
    concepts.batched = False  # the stacked pass: one row per (image, concept) in the forward pass too
    stacked = concepts.conditional(x, [i for i, _ in wanted], [c for _, c in wanted], "morph")
    torch.testing.assert_close(stacked.relevance, batched.relevance, rtol=1e-4, atol=1e-7)
    # the cut inserted after the layer leaves ordinary explanations as they were
    torch.testing.assert_close(explainer.explain(x, "morph").relevance, before, rtol=0, atol=0)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.inner = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.inner(h))
        return self.head(h.mean((2, 3)))


def test_concept_layers_are_the_nodes_all_relevance_passes_and_an_unknown_one_is_refused() -> None:
    model, x = _Residual().eval(), torch.randn(2, 3, 8, 8)
    concepts = ConceptExplainer(Explainer(model, "epsilon"), x[:1])
    assert list(concepts.layers) == ["stem", "add"]  # the inner convolution is bypassed by the residual
    assert concepts.layer.name == "add"
    images, channels = torch.arange(2).repeat_interleave(4), torch.arange(4).repeat(2)
    cond = concepts.conditional(x, images, channels, 1)
    full = Explainer(model, "epsilon").explain(x, 1)
    torch.testing.assert_close(cond.relevance.view(2, 4, 3, 8, 8).sum(1), full.relevance, rtol=1e-4, atol=1e-6)
    with pytest.raises(UsageError, match=r"--layer 'inner' is not a concept layer of this model; layers: stem, add"):
        ConceptExplainer(Explainer(model, "epsilon"), x[:1], "inner")


def _tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                            num_classes=2)
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts the head at zero: nothing to explain
    return vit.eval()


def test_a_transformer_concept_is_a_feature_of_the_last_block_summed_over_tokens() -> None:
    model, x = _tiny_vit(), torch.randn(2, 3, 32, 32)
    explainer = Explainer(model, "epsilon")
    concepts = ConceptExplainer(explainer, x[:1])
    assert concepts.layer.name == "encoder.layers.encoder_layer_1.add#2"
    assert concepts.layer.shape == (17, 16) and concepts.layer.channel_dim == 2
    assert "summed over its 17 tokens" in concepts.layer.unit
    images, channels = torch.arange(2).repeat_interleave(16), torch.arange(16).repeat(2)
    cond = concepts.conditional(x, images, channels, 1)
    full = explainer.explain(x, 1)
    torch.testing.assert_close(cond.relevance.view(2, 16, 3, 32, 32).sum(1), full.relevance, rtol=1e-4, atol=1e-6)
    totals = cond.total().view(2, 16).sum(1)  # the class token and positional embedding are below the layer
    torch.testing.assert_close(totals, full.total(), rtol=1e-4, atol=1e-6)


def test_an_unusual_concept_vector_gets_a_low_likelihood() -> None:
    rng = np.random.default_rng(0)
    usual = np.abs(rng.normal(1.0, 0.1, (60, 8)))
    usual[:30, 0] += 3.0  # two strategies: channel 0 strong, or all alike
    unusual = np.zeros((1, 8))
    unusual[0, 7] = 10.0  # all relevance in a channel no other image uses much
    found = fit_prototypes(np.vstack([usual, unusual]), np.zeros(61, dtype=np.int64), ["morph"], components=2)
    (prototypes,) = found
    assert len(prototypes.weights) == 2 and prototypes.top_concepts(int(prototypes.assignment[0]))[0] == 0
    assert prototypes.log_likelihood[-1] < prototypes.log_likelihood[:-1].min()
    assert prototypes.outlier[-1] and prototypes.outlier[:-1].mean() < 0.1


def test_a_reference_is_cropped_to_its_relevance() -> None:
    rmap = np.zeros((64, 64), dtype=np.float32)
    rmap[4:12, 5:13] = 1.0
    rmap[40, 40] = 0.05  # below 10 % of the maximum
    rows, cols = relevance_box(rmap)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (0, 16, 1, 17)  # grown by 3 px, then to 16 px
    assert relevance_box(-rmap) == (slice(0, 64), slice(0, 64))


# the planted shortcut, small: grey noise pictures whose morphs carry a faint doubled bar (the "artifact") or the
# corner mark or both (as tests/test_regions.py plants them); a tiny CNN learns on all images at once. The shortcut
# detector learns morphs that carry the mark and no bar, the clean one morphs with the bar and no mark; both are
# analysed on a set whose morphs all carry the bar and half of them the mark.

def _pictures(root: Path, marks: Callable[[int], bool], count: int = 32, seed: int = 0, bar: bool = True) -> Path:
    return write_pictures(root, "train", marks, count=count, seed=seed, bar=bar)


def _trained(root: Path) -> nn.Module:
    return train_tiny(root, "train")


def test_a_planted_shortcut_is_a_concept_with_marked_references(tmp_path: Path) -> None:
    half = _pictures(tmp_path / "half", lambda i: i % 2 == 0, seed=5)  # analysed, and searched for references
    index = scan_split(half, "train", ["bonafide", "morph"])
    paths = [s.path for s in index.samples]
    marked = np.array([p.parent.name == "morph" and int(p.stem[-2:]) % 2 == 0 for p in paths])
    maps = [half / "regions" / p.relative_to(half) for p in paths]
    ids = load_region_ids(RegionInputs(paths, index.labels, [""] * len(paths), maps), SIZE)
    meta = CheckpointMeta("tiny", ["bonafide", "morph"], "morph", SIZE, IMAGENET_MEAN, IMAGENET_STD, "none")
    batching = {"batch_size": 32, "workers": 0, "device": torch.device("cpu")}
    found = {}
    for name, marks in (("shortcut", lambda i: True), ("clean", lambda i: False)):
        model = _trained(_pictures(tmp_path / name, marks, bar=name == "clean"))
        concepts = ConceptExplainer(Explainer(model, "epsilon-plus", class_names=meta.class_names),
                                    torch.zeros(1, 3, SIZE, SIZE))
        scan = scan_layer(concepts, paths, meta, **batching)
        top = summarise(scan, index.labels, meta.class_names, meta.attack_index).ranking[:4]
        shares = conditional_shares(concepts, paths, top, meta, region_ids=ids, masks={}, **batching)
        assert shares.regions is not None
        found[name] = shares.regions[:, REGION_ID["shortcut"]]
        if name == "shortcut":
            best = int(np.nanargmax(found[name]))
            (references,) = top_images(scan.channels, [top[best]], 4)
            assert marked[references].all(), references  # the concept's reference examples carry the mark
    assert np.nanmax(found["shortcut"]) > 0.5, found  # a concept whose conditional relevance lies mostly in the corner
    assert np.nanmax(found["clean"]) < 0.2, found


def _run(*args: object) -> tuple[int, str]:
    result = runner.invoke(app, ["concepts", *[str(a) for a in args], *CPU])
    return result.exit_code, result.output


def test_concepts_command_writes_table_json_csv_and_figure(tiny_checkpoint: Path, tiny_synth: Path,
                                                           tmp_path: Path) -> None:
    code, output = _run("--checkpoint", tiny_checkpoint, "--data", tiny_synth, "--max-images", 6, "--top", 3,
                        "--references", 2, "--out", tmp_path / "out", "--json", tmp_path / "c.json",
                        "--csv", tmp_path / "c.csv")
    assert code == 0, output
    assert "top concepts of features.12" in output and "prototypes" in output
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["layer"]["name"] == "features.12" and report["layer"]["channels"] == 128
    assert report["layer"]["unit"].startswith("channel of the (128, 4, 4) output")
    assert len(report["concepts"]) == 3 and report["images"] == 6
    first = report["concepts"][0]
    assert set(first["regions"]) >= {"shortcut", "hair"} and first["artifact_mask"] is not None
    assert sum(v for v in first["regions"].values()) == pytest.approx(1.0)
    assert len(first["references"]) == 2 and all("/train/" in p for p in first["references"])
    lines = (tmp_path / "c.csv").read_text().splitlines()
    assert len(lines) == 129 and lines[0].startswith("rank,channel,mean_relevance")
    assert sum(line.split(",")[6] == "1" for line in lines[1:]) == 3  # the top column
    assert len((tmp_path / "out" / "images.csv").read_text().splitlines()) == 7
    with Image.open(report["files"]["figure"]) as figure:
        assert figure.format == "PNG" and min(figure.size) > 300


def test_an_unknown_layer_is_one_line_naming_the_layers(tiny_checkpoint: Path, tiny_synth: Path,
                                                        tmp_path: Path) -> None:
    code, output = _run("--checkpoint", tiny_checkpoint, "--data", tiny_synth, "--layer", "classifier",
                        "--out", tmp_path / "out")
    assert code == 2
    lines = [line for line in output.strip().splitlines() if line.startswith("error:")]
    assert lines == ["error: --layer 'classifier' is not a concept layer of this model; layers: features.0, "
                     "features.4, features.8, features.12"], output


def _checkpoint(tmp_path: Path, arch: str, model: nn.Module) -> Path:
    path = tmp_path / f"{arch}.safetensors"
    meta = CheckpointMeta(arch, ["bonafide", "morph"], "morph", 32, IMAGENET_MEAN, IMAGENET_STD, "random")
    save_checkpoint(path, model, meta)
    return path


def test_concepts_on_a_densenet(tiny_synth: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, _ = build_model("densenet121", 2, "none")
    code, output = _run("--checkpoint", _checkpoint(tmp_path, "densenet121", model), "--data", tiny_synth,
                        "--max-images", 4, "--top", 2, "--references", 1, "--out", tmp_path / "out",
                        "--json", tmp_path / "d.json")
    assert code == 0, output
    layer = json.loads((tmp_path / "d.json").read_text())["layer"]
    assert layer["name"] == "features.denseblock4.cat" and layer["channels"] == 1024


def test_concepts_on_a_vision_transformer(tiny_synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = Architecture("vit_tiny", 32, ("heads.head",), torchvision_name="vit_tiny", side_bound="vit",
                         size_step=8, min_size=32)
    monkeypatch.setitem(ARCHITECTURES, "vit_tiny", entry)
    real = architecture.tvm.get_model
    monkeypatch.setattr(architecture.tvm, "get_model", lambda name, weights=None, **options: _tiny_vit()
                        if name == "vit_tiny" else real(name, weights=weights, **options))
    code, output = _run("--checkpoint", _checkpoint(tmp_path, "vit_tiny", _tiny_vit()), "--data", tiny_synth,
                        "--max-images", 4, "--top", 2, "--references", 1, "--out", tmp_path / "out",
                        "--json", tmp_path / "v.json")
    assert code == 0, output
    layer = json.loads((tmp_path / "v.json").read_text())["layer"]
    assert layer["name"] == "encoder.layers.encoder_layer_1.add#2" and "tokens" in layer["unit"]
