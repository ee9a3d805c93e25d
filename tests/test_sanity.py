"""The sanity checks of compare-rules: map similarity and complexity by hand, cascading randomisation (copies,
order, seeding), MPRT and eMPRT on a model-independent edge map and on gradient x input, class sensitivity, and
the verdicts in words."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smadlrp.explain.checks import CheckValues, in_words, verdicts
from smadlrp.explain.map_similarity import histogram_entropy, spearman, ssim, unit_scaled
from smadlrp.explain.methods import RANDOM, baseline_maps, rule_maps
from smadlrp.explain.randomisation import cascading, randomised_layers, rebind
from smadlrp.explain.sanity import Batch, class_correlation, randomisation_checks, relative_rise
from smadlrp.lrp import Explainer


def test_spearman_ssim_and_entropy_by_hand() -> None:
    a = np.array([[[1.0, 2.0], [3.0, 4.0]]])
    assert spearman(a, a * 10 + 3) == pytest.approx([1.0])
    assert spearman(a, -a) == pytest.approx([-1.0])
    # ranks of (1, 2, 2, 3): 1, 2.5, 2.5, 4 against 1, 2, 3, 4 -> r = 4.5 / sqrt(4.5 * 5)
    assert spearman(a, np.array([[[1.0, 2.0], [2.0, 3.0]]])) == pytest.approx([4.5 / np.sqrt(22.5)])
    assert np.isnan(spearman(a, np.ones_like(a))).all()
    maps = np.random.default_rng(0).random((3, 16, 16))
    assert ssim(maps, maps) == pytest.approx(np.ones(3))
    assert (ssim(maps, maps[::-1].copy())[[0, 2]] < 0.2).all()  # independent noise maps
    assert unit_scaled(np.array([[[-4.0, 2.0]], [[0.0, 0.0]]])).tolist() == [[[1.0, 0.5]], [[0.0, 0.0]]]
    # 4 values over 100 bins from min 0 to max 3: bins 0, 33, 66, 99, one value each -> log 4
    assert histogram_entropy(np.array([[[0.0, 1.0], [2.0, 3.0]]])) == pytest.approx([np.log(4)])
    assert histogram_entropy(np.array([[[0.0, 0.0], [0.0, 3.0]]])) == pytest.approx(
        [-(0.75 * np.log(0.75) + 0.25 * np.log(0.25))])
    assert histogram_entropy(np.full((1, 2, 2), 7.0)) == pytest.approx([0.0])
    assert relative_rise(np.array([[2.0, 3.0], [0.0, 1.0]]))[0] == pytest.approx(0.5)
    assert np.isnan(relative_rise(np.array([[0.0, 1.0]]))).all()


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 2)).eval()


def test_cascading_randomisation_copies_top_down_and_is_seeded() -> None:
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert randomised_layers(model) == ["6", "2", "0"]
    seen = []
    for name, copy in cascading(model, seed=3):
        state = copy.state_dict()
        changed = sorted({k.split(".")[0] for k in state if not torch.equal(state[k], before[k])})
        seen.append((name, changed))
        for k in state:  # the scale of each tensor is kept
            if k.split(".")[0] == name and state[k].numel() > 1:
                assert state[k].std().item() == pytest.approx(before[k].std().item(), rel=0.6)
    assert seen == [("6", ["6"]), ("2", ["2", "6"]), ("0", ["0", "2", "6"])]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model is untouched

    def final(seed: int) -> dict[str, Tensor]:
        *_, (_, randomised) = cascading(model, seed=seed)
        return randomised.state_dict()

    first, again, other = final(3), final(3), final(4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["0.weight"], other["0.weight"])


def _images(n: int = 6, side: int = 16) -> list[Batch]:
    x = torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(1))
    x = F.avg_pool2d(x, 3, stride=1, padding=1) * 3  # smooth, image-like structure
    return [(x[:3], torch.ones(3, dtype=torch.int64), [0, 1, 2]), (x[3:], torch.ones(n - 3, dtype=torch.int64),
                                                                   list(range(3, n)))]


def _sobel(x: Tensor, target: Tensor, positions: Sequence[int]) -> Tensor:
    """An edge detector of the image alone (Sobel magnitude, summed over channels): it ignores the model."""
    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    kernel = torch.stack([kx, kx.T]).unsqueeze(1).repeat(x.shape[1], 1, 1, 1)
    edges = F.conv2d(x, kernel.to(x.dtype), padding=1, groups=x.shape[1])
    return edges.pow(2).view(len(x), -1, 2, *x.shape[2:]).sum(dim=2).sqrt().sum(dim=1)


def test_mprt_fails_an_edge_detector_and_passes_gradient_times_input() -> None:
    model = _net()

    def methods_of(current: nn.Module) -> dict[str, object]:
        return {"sobel": _sobel, "gradient*input": baseline_maps(current, 0)["gradient*input"]}

    layers, values = randomisation_checks(model, methods_of, _images(), seed=0, device="cpu")  # type: ignore[arg-type]
    assert layers == ["6", "2", "0"]
    sobel, gi = values["sobel"], values["gradient*input"]
    assert sobel.positions == gi.positions == list(range(6))
    assert sobel.spearman.shape == sobel.ssim.shape == (6, 3) and sobel.entropy.shape == (6, 2)
    assert sobel.spearman == pytest.approx(np.ones((6, 3)))  # the same map at every depth: fails MPRT
    assert sobel.ssim == pytest.approx(np.ones((6, 3)))
    assert relative_rise(sobel.entropy) == pytest.approx(np.zeros(6))  # and eMPRT (no rise)
    assert gi.spearman[:, -1].mean() < 0.5  # passes MPRT
    assert gi.spearman[:, 0].mean() > gi.spearman[:, -1].mean()
    assert verdicts(CheckValues(None, None, None, float(sobel.spearman[:, -1].mean()),
                                float(relative_rise(sobel.entropy).mean()), None)) == {
        "localisation": None, "abpc": None, "mprt": False, "emprt": False, "class_sensitivity": None}


def test_class_sensitivity_is_low_when_the_classes_use_disjoint_pixels() -> None:
    """Class 0's logit reads the left half of the image, class 1's the right half: gradient x input (and LRP,
    which equals it on a linear model) for one class is zero where the other's lives."""
    side = 8
    left = torch.zeros(1, side, side)
    left[..., : side // 2] = 1.0
    rng = torch.Generator().manual_seed(2)
    w0 = torch.rand(1, side, side, generator=rng) * left
    w1 = torch.rand(1, side, side, generator=rng) * (1 - left)
    linear = nn.Linear(side * side, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.stack([w0.flatten(), w1.flatten()]))
    model = nn.Sequential(nn.Flatten(), linear).eval()
    x = torch.rand(5, 1, side, side, generator=rng) + 0.5
    ones, zeros = torch.ones(5, dtype=torch.int64), torch.zeros(5, dtype=torch.int64)
    gi = baseline_maps(model, 0)["gradient*input"]
    rho = class_correlation(gi, x, ones, zeros, list(range(5)))
    assert rho.mean() < -0.5  # each map is positive where the other is zero
    epsilon = rule_maps({"epsilon": Explainer(model, "epsilon")})["epsilon"]
    assert class_correlation(epsilon, x, ones, zeros, list(range(5))) == pytest.approx(rho, abs=1e-6)
    same = nn.Linear(side * side, 2, bias=False)
    with torch.no_grad():
        same.weight.copy_(torch.stack([w0.flatten(), w0.flatten()]))
    shared = baseline_maps(nn.Sequential(nn.Flatten(), same).eval(), 0)["gradient*input"]
    assert class_correlation(shared, x, ones, zeros, list(range(5))) == pytest.approx(np.ones(5))  # insensitive
    assert class_correlation(baseline_maps(model, 0)[RANDOM], x, ones, zeros, [0, 1, 2, 3, 4]) == \
        pytest.approx(np.ones(5))


def test_rebound_explainers_explain_the_copy() -> None:
    model = _net()
    x = _images()[0][0]
    explainers = {"epsilon": Explainer(model, "epsilon", class_names=["a", "b"])}
    *_, (_, randomised) = cascading(model, seed=0)
    rebound = rebind(explainers, randomised)
    assert rebound["epsilon"].composite is explainers["epsilon"].composite
    expected = Explainer(randomised, "epsilon").explain(x, 1).relevance
    torch.testing.assert_close(rebound["epsilon"].explain(x, 1).relevance, expected)
    assert not torch.allclose(explainers["epsilon"].explain(x, 1).relevance, expected)


def test_verdicts_in_words_name_thresholds_and_what_did_not_run() -> None:
    values = CheckValues(mass_accuracy=0.5, random_mass_accuracy=0.4, abpc=0.8, mprt_spearman=0.7, emprt=0.2,
                         class_sensitivity=None)
    passed = verdicts(values)
    assert passed == {"localisation": True, "abpc": True, "mprt": False, "emprt": True, "class_sensitivity": None}
    words = in_words(values, passed)
    assert words.startswith("passes 3 of 4: localisation above random (mass accuracy 0.500 > 0.400), ABPC > 0")
    assert "fails MPRT (Spearman 0.70 >= 0.5 when fully randomised)" in words
    assert words.endswith("not checked: class sensitivity (contrastive target)")
    random = CheckValues(0.4, 0.4, -0.1, None, None, 1.0, is_random=True)
    assert verdicts(random)["localisation"] is None and verdicts(random)["abpc"] is False
    assert "localisation (the random map is its reference)" in in_words(random, verdicts(random))
