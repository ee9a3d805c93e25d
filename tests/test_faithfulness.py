"""Faithfulness metrics against hand computations: localisation, patch ordering, perturbation curves, AOPC, ABPC,
and the imputations (ROAD's linear system, the blurred copy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from smadlrp.core.errors import UsageError
from smadlrp.explain.compare import check_perturbation, default_patch_size, select_subset
from smadlrp.explain.faithfulness import (
    abpc,
    aopc,
    mass_accuracy,
    patch_order,
    perturbation_curve,
    pointing_game,
    rank_accuracy,
    removal_steps,
    resize_mask,
)
from smadlrp.explain.imputation import ROAD_NOISE, gaussian_blur, impute, road_fill, road_noise, road_solve, road_system


def test_resize_mask_area_average_at_least_half() -> None:
    mask = np.zeros((4, 4), np.uint8)
    mask[0:2, 0:2] = 255  # top-left quadrant full
    mask[0, 2] = 1  # top-right quadrant: 1 of 4 pixels
    mask[2:4, 0] = 7  # bottom-left quadrant: exactly half
    assert resize_mask(mask, 2, 2).tolist() == [[True, False], [True, False]]
    up = resize_mask(np.array([[1, 0], [0, 1]]), 4, 4)
    assert up.tolist() == np.kron(np.eye(2), np.ones((2, 2))).astype(bool).tolist()
    assert resize_mask(mask, 4, 4).tolist() == (mask != 0).tolist()


def test_localisation_hand_cases() -> None:
    mask = np.array([[[1, 1], [0, 0]]], bool)
    # positive relevance 3 + 1, of which 3 inside
    assert mass_accuracy(np.array([[[3.0, -1.0], [1.0, 0.0]]]), mask) == pytest.approx([0.75])
    assert np.isnan(mass_accuracy(-np.ones((1, 2, 2)), mask)).all()
    diagonal = np.array([[[0, 1], [1, 0]]], bool)
    ranked = np.array([[[4.0, 3.0], [2.0, 1.0]]])
    assert rank_accuracy(ranked, diagonal) == pytest.approx([0.5])  # top-2 = {4, 3}; only 3 inside
    # k = 1; three pixels tie at the top, one of them inside: expected overlap 1/3
    assert rank_accuracy(np.array([[[1.0, 1.0], [1.0, 0.0]]]), np.array([[[1, 0], [0, 0]]], bool)) == \
        pytest.approx([1 / 3])
    assert pointing_game(ranked, diagonal).tolist() == [0.0]
    assert pointing_game(ranked, mask).tolist() == [1.0]
    assert pointing_game(np.array([[[2.0, 2.0], [0.0, 0.0]]]), np.array([[[1, 0], [0, 0]]], bool)) == \
        pytest.approx([0.5])
    empty = np.zeros((1, 2, 2), bool)
    assert np.isnan(rank_accuracy(ranked, empty)).all() and np.isnan(pointing_game(ranked, empty)).all()
    with pytest.raises(ValueError, match="maps and masks"):
        mass_accuracy(np.zeros((1, 2, 2)), np.zeros((1, 3, 2), bool))


def test_map_equal_to_mask_scores_one_and_constant_map_scores_the_area() -> None:
    rng = np.random.default_rng(0)
    masks = rng.random((5, 16, 16)) < rng.uniform(0.05, 0.6, size=(5, 1, 1))
    for metric in (mass_accuracy, rank_accuracy, pointing_game):
        assert metric(masks.astype(np.float64), masks) == pytest.approx(np.ones(5))
        assert metric(np.full(masks.shape, 0.3), masks) == pytest.approx(masks.mean(axis=(1, 2)))


def test_random_map_mass_accuracy_is_the_area_fraction() -> None:
    """With i.i.d. uniform relevance, mass accuracy estimates the mask's area fraction a: by the delta method its
    standard deviation is sqrt(a (1 - a) / (3 N)) for N pixels, 0.0039 for a = 0.25 and N = 64 * 64, so the mean of
    20 maps lies within 0.01 (over 10 standard deviations) of a."""
    rng = np.random.default_rng(1)
    masks = np.zeros((20, 64, 64), bool)
    masks[:, 16:48, 16:48] = True  # a = 0.25
    values = mass_accuracy(rng.random(masks.shape), masks)
    assert abs(values.mean() - 0.25) < 0.01
    assert rank_accuracy(rng.random(masks.shape), masks).mean() == pytest.approx(0.25, abs=0.02)


def test_patch_order_and_removal_steps_with_partial_edge_patches() -> None:
    rmap = torch.zeros(1, 5, 5)
    rmap[0, 4, 4] = 5.0  # bottom-right 1x1 edge patch (index 8 of the 3x3 grid)
    rmap[0, 0:2, 2:4] = 1.0  # top-middle patch (index 1): sum 4
    rmap[0, 2, 0] = -3.0  # middle-left patch (index 3): most negative
    order = patch_order(rmap, 2)
    assert order.tolist() == [[8, 1, 0, 2, 4, 5, 6, 7, 3]]  # ties keep grid order
    steps = removal_steps(order, 5, 5, 2)
    assert steps.shape == (1, 1, 5, 5)
    assert steps[0, 0, 4, 4] == 1 and steps[0, 0, 0, 2] == 2 and steps[0, 0, 1, 3] == 2 and steps[0, 0, 2, 1] == 9
    assert torch.bincount(steps.flatten()).tolist() == [0, 1, 4, 4, 2, 4, 2, 2, 2, 4]


def _linear_model() -> nn.Module:
    """Logits (-sum x, +sum x) of a one-channel 4x4 image."""
    linear = nn.Linear(16, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.stack([-torch.ones(16), torch.ones(16)]))
    return nn.Sequential(nn.Flatten(), linear).eval()


def test_aopc_hand_case_on_a_linear_model() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)  # mean 7.5; patch sums TL 10, TR 18, BL 42, BR 50; f(x) = 120
    rmap = x[:, 0]  # gradient x input of class 1 ranks BR, BL, TR, TL
    with torch.no_grad():
        curve = perturbation_curve(_linear_model(), x, torch.tensor([1]), rmap, 2, 2, chunk=64)
    # BR -> 4 * 7.5 = 30: 120 - 50 + 30 = 100; then BL: 100 - 42 + 30 = 88
    assert curve.tolist() == [[120.0, 100.0, 88.0]]
    assert aopc(curve.numpy()) == pytest.approx([(0 + 20 + 32) / 3])
    both = torch.cat([x, x.flip(-1)])
    with torch.no_grad():
        small = perturbation_curve(_linear_model(), both, torch.tensor([1, 0]), both[:, 0], 2, 4, chunk=1)
        large = perturbation_curve(_linear_model(), both, torch.tensor([1, 0]), both[:, 0], 2, 4, chunk=1000)
    torch.testing.assert_close(small, large)
    assert small[1].tolist() == [-120.0, -100.0, -88.0, -100.0, -120.0]  # class 0 = -sum; all replaced: -7.5 * 16


def test_random_order_aopc_is_zero_for_a_constant_score() -> None:
    linear = nn.Linear(3 * 8 * 8, 2)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.tensor([0.3, -1.2]))
    model = nn.Sequential(nn.Flatten(), linear)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 8, 8, generator=gen)
    with torch.no_grad():
        curves = perturbation_curve(model, x, torch.ones(6, dtype=torch.int64), torch.rand(6, 8, 8, generator=gen),
                                    2, 10, chunk=16)
    assert curves.shape == (6, 11)
    assert np.abs(aopc(curves.numpy())).max() < 1e-6


def test_perturbation_refuses_more_steps_than_patches() -> None:
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="0..4"):
        perturbation_curve(_linear_model(), x, torch.tensor([1]), x[:, 0], 2, 5, chunk=8)
    with pytest.raises(UsageError, match="--steps 17: must lie in 1..16, the patches of a 4x4 grid"):
        check_perturbation(64, 16, 17)
    check_perturbation(64, default_patch_size(64), 256)
    assert (default_patch_size(64), default_patch_size(224), default_patch_size(8)) == (4, 14, 1)
    with pytest.raises(UsageError, match="--patch-size 65"):
        check_perturbation(64, 65, 1)


def test_select_subset_is_seeded_proportional_and_keeps_both_classes() -> None:
    labels = np.array([0] * 90 + [1] * 10)
    chosen = select_subset(labels, 20, seed=3)
    assert len(chosen) == len(set(chosen.tolist())) == 20 and (np.diff(chosen) > 0).all()
    assert (labels[chosen] == 1).sum() == 2
    assert select_subset(labels, 20, seed=3).tolist() == chosen.tolist()
    assert select_subset(labels, 20, seed=4).tolist() != chosen.tolist()
    assert (labels[select_subset(np.array([0] * 99 + [1]), 5, seed=0)] == 1).sum() == 1
    assert select_subset(labels, 500, seed=0).tolist() == list(range(100))


def test_abpc_hand_case_with_a_known_ranking() -> None:
    """A linear "model" whose class-1 logit is sum_p w_p (sum of patch p's pixels), patch weights TL 3, TR 1, BL -2,
    BR 0.5, on an image with patches +1, +1, -1, -1 (mean 0, so a removed patch contributes 0). Patch p adds
    4 w_p x_p = TL 12, TR 4, BL 8, BR -2 to f(x) = 22. The map equal to the weights ranks TL, TR, BR, BL:
    MoRF f = 22, 10, 6, 8 and LeRF (BL, BR, TR) f = 22, 14, 16, 12 over 3 steps."""
    weights = torch.tensor([[3.0, 1.0], [-2.0, 0.5]]).repeat_interleave(2, 0).repeat_interleave(2, 1)
    x = torch.tensor([[1.0, 1.0], [-1.0, -1.0]]).repeat_interleave(2, 0).repeat_interleave(2, 1).view(1, 1, 4, 4)
    linear = nn.Linear(16, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.stack([-weights.flatten(), weights.flatten()]))
    model = nn.Sequential(nn.Flatten(), linear).eval()
    rmap = weights.unsqueeze(0)
    with torch.no_grad():
        morf = perturbation_curve(model, x, torch.tensor([1]), rmap, 2, 3, chunk=8)
        lerf = perturbation_curve(model, x, torch.tensor([1]), -rmap, 2, 3, chunk=8)
    assert morf.tolist() == [[22.0, 10.0, 6.0, 8.0]]
    assert lerf.tolist() == [[22.0, 14.0, 16.0, 12.0]]
    # ABPC = mean_k (f_LeRF(x_k) - f_MoRF(x_k)) = (0 + 4 + 10 + 4) / 4 = 4.5 = AOPC(MoRF) 10.5 - AOPC(LeRF) 6
    assert abpc(morf.numpy(), lerf.numpy()) == pytest.approx([4.5])
    assert aopc(morf.numpy()) - aopc(lerf.numpy()) == pytest.approx([4.5])
    assert abpc(lerf.numpy(), morf.numpy()) == pytest.approx([-4.5])  # a reversed map: the same area, negative


def _image(channels: int = 2, side: int = 5) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(channels, side, side))


def test_road_single_pixels_are_the_weighted_mean_of_their_neighbours() -> None:
    """One removed pixel has only known neighbours: its value is sum_j w_j x_j / sum_j w_j over the neighbours
    inside the image, w = 1/6 for direct and 1/12 for diagonal neighbours."""
    image = _image()
    centre = np.zeros((5, 5), bool)
    centre[2, 2] = True
    expected = (image[:, 1, 2] + image[:, 3, 2] + image[:, 2, 1] + image[:, 2, 3]) / 6 + \
        (image[:, 1, 1] + image[:, 1, 3] + image[:, 3, 1] + image[:, 3, 3]) / 12  # the weights sum to 1
    np.testing.assert_allclose(road_solve(image, centre)[:, 2, 2], expected, rtol=1e-12)
    corner = np.zeros((5, 5), bool)
    corner[0, 0] = True  # neighbours (0, 1), (1, 0) at 1/6 and (1, 1) at 1/12: 5/12 of the weight exists
    expected = (image[:, 0, 1] / 6 + image[:, 1, 0] / 6 + image[:, 1, 1] / 12) / (5 / 12)
    np.testing.assert_allclose(road_solve(image, corner)[:, 0, 0], expected, rtol=1e-12)
    kept = ~(centre | corner)
    assert (road_solve(image, centre | corner)[:, kept] == image[:, kept]).all()


def test_road_solves_removed_neighbours_jointly() -> None:
    """Two adjacent removed pixels p = (2, 2), q = (2, 3): y_p = a + y_q / 6 and y_q = b + y_p / 6, a and b the
    weighted sums of their known neighbours, so y_p = (a + b / 6) / (1 - 1/36)."""
    image = _image(channels=1)[0]
    mask = np.zeros((5, 5), bool)
    mask[2, 2] = mask[2, 3] = True

    def known_sum(r: int, c: int) -> float:
        total = 0.0
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                if (dr or dc) and not mask[r + dr, c + dc]:
                    total += (1 / 6 if dr == 0 or dc == 0 else 1 / 12) * image[r + dr, c + dc]
        return total

    a, b = known_sum(2, 2), known_sum(2, 3)
    y_p, y_q = (a + b / 6) / (1 - 1 / 36), (b + a / 6) / (1 - 1 / 36)
    solved = road_solve(image[None], mask)[0]
    assert solved[2, 2] == pytest.approx(y_p, rel=1e-12) and solved[2, 3] == pytest.approx(y_q, rel=1e-12)
    matrix, rhs, unknown = road_system(image[None], mask)
    assert unknown.tolist() == [12, 13]
    np.testing.assert_allclose(matrix.toarray(), [[1.0, -1 / 6], [-1 / 6, 1.0]])
    np.testing.assert_allclose(rhs[:, 0], [a, b])


def test_road_every_imputed_pixel_satisfies_its_equation() -> None:
    """On a random mask of an 8x8 image (borders and corners included) every imputed value is the weighted mean
    of its neighbours in the filled image; `road_fill` (torch, batched) gives the same as `road_solve`."""
    rng = np.random.default_rng(1)
    image = rng.normal(size=(3, 8, 8))
    mask = rng.random((8, 8)) < 0.4
    filled = road_solve(image, mask)
    padded = np.pad(filled, ((0, 0), (1, 1), (1, 1)))
    inside = np.pad(np.ones((8, 8)), 1)
    kernel = np.array([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]])
    for r, c in zip(*np.nonzero(mask), strict=True):
        weights = kernel * inside[r:r + 3, c:c + 3]
        mean = (padded[:, r:r + 3, c:c + 3] * weights).sum(axis=(1, 2)) / weights.sum()
        np.testing.assert_allclose(filled[:, r, c], mean, rtol=1e-9, atol=1e-12)
    batch = torch.from_numpy(np.stack([image, image[::-1].copy()]))
    masks = torch.from_numpy(np.stack([mask, mask.T]))[:, None]
    torch.testing.assert_close(road_fill(batch, masks)[0], torch.from_numpy(filled))
    everything = road_solve(image, np.ones((8, 8), bool))  # nothing known: the channel means
    np.testing.assert_allclose(everything, np.broadcast_to(image.mean(axis=(1, 2))[:, None, None], image.shape))


def test_imputations_keep_kept_pixels_and_road_noise_is_seeded() -> None:
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    removed = torch.zeros(3, 2, 1, 8, 8, dtype=torch.bool)
    removed[1, :, :, 2:4, 2:4] = True
    removed[2, :, :, :4] = True
    noise = road_noise([5, 9], (3, 8, 8), seed=0, std=(0.5, 0.25, 0.2))
    assert noise.shape == (2, 3, 8, 8)
    assert noise[:, 0].std().item() == pytest.approx(ROAD_NOISE / 0.5, rel=0.2)
    assert torch.equal(noise, road_noise([5, 9], (3, 8, 8), seed=0, std=(0.5, 0.25, 0.2)))
    assert torch.equal(noise[1], road_noise([9], (3, 8, 8), seed=0, std=(0.5, 0.25, 0.2))[0])  # per image
    for name in ("mean", "blur", "road"):
        out = impute(name, x, removed, noise if name == "road" else None)
        assert out.shape == (3, 2, 3, 8, 8)
        kept = ~removed.expand_as(out)
        assert torch.equal(out[kept], x.unsqueeze(0).expand_as(out)[kept])
        assert torch.equal(out[0], x)
    road = impute("road", x, removed, noise)
    plain = impute("road", x, removed)
    assert torch.allclose(road - plain, torch.where(removed, noise.unsqueeze(0), torch.zeros(())))
    blurred = gaussian_blur(torch.ones(1, 2, 6, 6), 2.0)  # a normalised kernel keeps a constant image
    torch.testing.assert_close(blurred, torch.ones(1, 2, 6, 6))
    with pytest.raises(ValueError, match="unknown imputation"):
        impute("zero", x, removed)
