"""Frozen-backbone heads (linear, logistic, svm, gmm) and backbone features with their cache: what `finetune
--frozen` relies on. The heads equal their scikit-learn models, rebuild from their spec and state dict, and the
features equal the head layer's input, reused from the cache without reading an image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import write_tiny_dataset
from safetensors.torch import load_file, save_file
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression
from sklearn.mixture import GaussianMixture
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from torch import nn

from smadlrp.core.container import read_document
from smadlrp.core.distributed import Ranks
from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.data import loading
from smadlrp.data.loading import IMAGENET_MEAN, IMAGENET_STD, ImageDataset, scan_split
from smadlrp.detector import features as feats
from smadlrp.detector.architecture import CompactVGG
from smadlrp.detector.features import FeatureCache, extract_features, feature_key, features_for, weights_fingerprint
from smadlrp.detector.frozen_heads import (
    FALLBACK_SIGMAS,
    KINDS,
    GMMHead,
    build_head,
    default_options,
    fit_head,
    head_spec,
)

CPU = torch.device("cpu")


def gaussian_split(n: int, dims: int = 6, seed: int = 0, shift: float = 1.0,
                   attack_index: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` bona fide and `n` attack feature vectors (2n, dims) float32, of unequal scales and offsets, and their
    class indices (attack = `attack_index` of two)."""
    rng = np.random.default_rng(seed)
    scales = np.linspace(0.5, 4.0, dims)
    offsets = np.linspace(-3.0, 3.0, dims)
    mixing = np.eye(dims) + 0.3 * rng.standard_normal((dims, dims))
    bona = rng.standard_normal((n, dims)) @ mixing
    attack = rng.standard_normal((n, dims)) @ mixing + shift
    x = np.concatenate([bona, attack]) * scales + offsets
    y = np.concatenate([np.full(n, 1 - attack_index), np.full(n, attack_index)])
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))


def fit_linear(kind: str, *args: Any, **kwargs: Any) -> nn.Linear:
    """`fit_head` for a kind stored as one nn.Linear."""
    head = fit_head(kind, *args, **kwargs)
    assert isinstance(head, nn.Linear) and type(head) is nn.Linear  # a plain Linear, as the LRP engine expects
    return head


def fit_gmm(*args: Any, **kwargs: Any) -> GMMHead:
    """`fit_head("gmm", ...)`."""
    head = fit_head("gmm", *args, **kwargs)
    assert isinstance(head, GMMHead)
    return head


def margin(head: nn.Module, x: torch.Tensor, attack_index: int) -> np.ndarray:
    """z_attack - z_other (two classes) in float64."""
    with torch.no_grad():
        z = head.double()(x.double())
    return (z[:, attack_index] - z[:, 1 - attack_index]).numpy()


# ---- supervised heads --------------------------------------------------------------------------------------


@pytest.mark.parametrize("attack_index", [1, 0])
def test_svm_head_is_the_linear_svc_decision_function(attack_index: int) -> None:
    x, y = gaussian_split(80, attack_index=attack_index)
    head = fit_linear("svm", x, y, None, None, attack_index, 2, seed=3, dtype=torch.float64)
    assert head.weight.dtype == torch.float64
    svc = make_pipeline(StandardScaler(), LinearSVC(C=1.0, dual="auto", random_state=3, max_iter=10_000, tol=1e-4))
    svc.fit(x.double().numpy(), y.numpy() == attack_index)
    expected = svc.decision_function(x.double().numpy())
    np.testing.assert_allclose(margin(head, x, attack_index), expected, rtol=0, atol=1e-6)
    other = head.weight[1 - attack_index]
    assert torch.count_nonzero(other) == 0 and head.bias[1 - attack_index] == 0  # the other row is zeros
    stored = fit_linear("svm", x, y, None, None, attack_index, 2, seed=3)  # float32, as a checkpoint holds it
    assert stored.weight.dtype == torch.float32
    np.testing.assert_allclose(margin(stored, x, attack_index), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_svm_head_without_standardisation_is_the_raw_linear_svc() -> None:
    x, y = gaussian_split(60, seed=1)
    head = fit_linear("svm", x, y, None, None, 1, 2, seed=0, dtype=torch.float64, standardize=False, C=0.1)
    svc = LinearSVC(C=0.1, dual="auto", random_state=0, max_iter=10_000, tol=1e-4).fit(x.double().numpy(), y == 1)
    np.testing.assert_allclose(margin(head, x, 1), svc.decision_function(x.double().numpy()), rtol=0, atol=1e-6)


def test_logistic_head_is_sklearns_decision_function_and_probability() -> None:
    x, y = gaussian_split(80, seed=2)
    head = fit_linear("logistic", x, y, None, None, 1, 2, seed=0, dtype=torch.float64, C=0.5)
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, tol=1e-6, max_iter=10_000, random_state=0))
    reference.fit(x.double().numpy(), y.numpy() == 1)
    np.testing.assert_allclose(margin(head, x, 1), reference.decision_function(x.double().numpy()), rtol=0, atol=1e-6)
    with torch.no_grad():
        probability = torch.softmax(head(x.double()), dim=1)[:, 1].numpy()
    np.testing.assert_allclose(probability, reference.predict_proba(x.double().numpy())[:, 1], rtol=0, atol=1e-9)


def test_binary_heads_give_sigmoid_of_the_decision_with_more_classes() -> None:
    x, y2 = gaussian_split(60, seed=4)
    y = torch.where(y2 == 1, 2, torch.arange(len(y2)) % 2)  # classes 0 and 1 are bona fide kinds, 2 the attack
    head = fit_linear("logistic", x, y, None, None, 2, 3, seed=0, dtype=torch.float64)
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, tol=1e-6, max_iter=10_000, random_state=0))
    reference.fit(x.double().numpy(), y.numpy() == 2)
    with torch.no_grad():
        probability = torch.softmax(head(x.double()), dim=1)[:, 2].numpy()
    np.testing.assert_allclose(probability, reference.predict_proba(x.double().numpy())[:, 1], rtol=0, atol=1e-9)


def test_linear_head_separates_separable_data_and_repeats_itself() -> None:
    x, y = gaussian_split(50, seed=5, shift=6.0)
    vx, vy = gaussian_split(20, seed=6, shift=6.0)
    head = fit_linear("linear", x, y, vx, vy, 1, 2, seed=7, epochs=30, batch_size=16, lr=0.01)
    with torch.no_grad():
        assert torch.equal(head(x).argmax(1), y) and torch.equal(head(vx).argmax(1), vy)
    again = fit_linear("linear", x, y, vx, vy, 1, 2, seed=7, epochs=30, batch_size=16, lr=0.01)
    assert torch.equal(head.weight, again.weight) and torch.equal(head.bias, again.bias)
    assert 1 <= head_spec(head)["fit"]["epoch"] <= 30


# ---- the Gaussian mixture head -----------------------------------------------------------------------------


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_gmm_log_likelihood_is_score_samples(covariance_type: str) -> None:
    x, y = gaussian_split(120, seed=8)
    vx, vy = gaussian_split(30, seed=9)
    options: dict[str, Any] = {"components": 2, "covariance_type": covariance_type, "reg_covar": 1e-3}
    head = fit_gmm(x, y, vx, vy, 1, 2, seed=4, dtype=torch.float64, standardize=False, **options)
    mixture = GaussianMixture(n_components=2, covariance_type=covariance_type, reg_covar=1e-3, random_state=4,
                              max_iter=100, n_init=1).fit(x[y == 0].double().numpy())
    everything = torch.cat([x, vx]).double()
    with torch.no_grad():
        np.testing.assert_allclose(head.log_likelihood(everything).numpy(),
                                   mixture.score_samples(everything.numpy()), rtol=0, atol=1e-6)
    # standardised (the default): the same model of the standardised features, with the Jacobian of the scaling
    scaled = fit_gmm(x, y, vx, vy, 1, 2, seed=4, dtype=torch.float64, **options)
    scaler = StandardScaler().fit(x[y == 0].double().numpy())
    mixture.fit(scaler.transform(x[y == 0].double().numpy()))
    expected = mixture.score_samples(scaler.transform(everything.numpy())) - np.log(scaler.scale_).sum()
    with torch.no_grad():
        np.testing.assert_allclose(scaled.log_likelihood(everything).numpy(), expected, rtol=0, atol=1e-6)


def test_gmm_is_fitted_on_bona_fide_images_only() -> None:
    x, y = gaussian_split(100, seed=10)
    vx, vy = gaussian_split(30, seed=11)
    with_attacks = fit_gmm(x, y, vx, vy, 1, 2, seed=0, dtype=torch.float64)
    moved = torch.where((y == 1)[:, None], x * 100.0 - 7.0, x)  # attack rows changed beyond recognition
    changed = fit_gmm(moved, y, vx, vy, 1, 2, seed=0, dtype=torch.float64)
    bona_only = fit_gmm(x[y == 0], y[y == 0], vx, vy, 1, 2, seed=0, dtype=torch.float64)
    for other in (changed, bona_only):
        for name, tensor in with_attacks.state_dict().items():
            assert torch.equal(tensor, other.state_dict()[name]), name


def nll_of(x: torch.Tensor, y: torch.Tensor, points: torch.Tensor) -> np.ndarray:
    """The NLL of `points` under the default gmm head's model, computed with scikit-learn alone."""
    bona = x[y == 0].double().numpy()
    scaler = StandardScaler().fit(bona)
    mixture = GaussianMixture(1, covariance_type="full", reg_covar=1e-2, random_state=0).fit(scaler.transform(bona))
    return -(mixture.score_samples(scaler.transform(points.double().numpy())) - np.log(scaler.scale_).sum())


def test_gmm_calibration_is_platt_scaling_and_monotone() -> None:
    x, y = gaussian_split(100, seed=12)
    vx, vy = gaussian_split(40, seed=13)
    head = fit_gmm(x, y, vx, vy, 1, 2, seed=0, dtype=torch.float64)
    assert head_spec(head)["fit"]["calibration"]["method"] == "platt"
    nll = nll_of(x, y, vx)
    positive = vy.numpy() == 1
    n_pos, n_neg = positive.sum(), (~positive).sum()
    target = np.where(positive, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    center, spread = nll.mean(), nll.std()

    u = (nll - center) / spread

    def loss(p: np.ndarray) -> tuple[float, np.ndarray]:  # cross-entropy of sigmoid(p0 * u + p1), and its gradient
        v = p[0] * u + p[1]
        q = 1 / (1 + np.exp(-v))
        return float(np.sum(np.logaddexp(0, v) - target * v)), np.array([np.sum((q - target) * u), np.sum(q - target)])

    found = minimize(loss, np.zeros(2), jac=True, method="BFGS", options={"gtol": 1e-12}).x
    a, b = found[0] / spread, found[1] - found[0] * center / spread
    assert float(head.calibration_a) == pytest.approx(a, rel=1e-6)
    assert float(head.calibration_b) == pytest.approx(b, rel=1e-6)
    grid = torch.linspace(-8, 8, 200, dtype=torch.float64)[:, None] * torch.ones(1, x.shape[1], dtype=torch.float64)
    with torch.no_grad():
        probability = torch.softmax(head(grid), dim=1)[:, 1]
        score = -head.log_likelihood(grid)
    order = torch.argsort(score)
    assert float(head.calibration_a) > 0 and bool((probability[order].diff() >= 0).all())
    np.testing.assert_allclose(probability.numpy(), 1 / (1 + np.exp(-(a * score.numpy() + b))), rtol=1e-9)


def test_gmm_calibration_falls_back_to_bona_fide_statistics_without_validation_attacks() -> None:
    x, y = gaussian_split(100, seed=14)
    vx, vy = gaussian_split(40, seed=15)
    bona_val = vx[vy == 0]
    notes: list[str] = []
    head = fit_gmm(x, y, bona_val, vy[vy == 0], 1, 2, seed=0, dtype=torch.float64, notify=notes.append)
    nll = nll_of(x, y, bona_val)
    mean, std = nll.mean(), nll.std(ddof=1)
    assert float(head.calibration_a) == pytest.approx(1 / std, rel=1e-9)
    assert float(head.calibration_b) == pytest.approx(-mean / std - FALLBACK_SIGMAS, rel=1e-9)
    assert head_spec(head)["fit"]["calibration"]["method"] == "bonafide standardisation" and not notes
    with torch.no_grad():  # P(attack) = 0.5 at FALLBACK_SIGMAS standard deviations above the mean NLL
        assert float(torch.sigmoid(head.calibration_a * (mean + FALLBACK_SIGMAS * std) + head.calibration_b)) == \
            pytest.approx(0.5)
    no_val = fit_gmm(x, y, None, None, 1, 2, seed=0, notify=notes.append)
    assert head_spec(no_val)["fit"]["calibration"]["split"] == "train" and "training bona fide" in notes[-1]


def test_gmm_calibration_never_lets_a_larger_nll_mean_bona_fide() -> None:
    x, y = gaussian_split(100, seed=16, shift=3.0)
    vx, vy = gaussian_split(40, seed=17, shift=3.0)
    swapped = torch.where(vy == 0, 1, 0)  # validation "attacks" are the typical bona fide images
    notes: list[str] = []
    head = fit_gmm(x, y, vx, swapped, 1, 2, seed=0, notify=notes.append)
    assert float(head.calibration_a) > 0 and "not less likely" in notes[0]
    assert head_spec(head)["fit"]["calibration"]["method"] == "bonafide standardisation"


# ---- specs, round trips, refusals --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_every_head_rebuilds_from_its_spec_and_state_dict(kind: str, tmp_path: Path) -> None:
    x, y = gaussian_split(60, seed=18)
    vx, vy = gaussian_split(20, seed=19)
    options = {"epochs": 3} if kind == "linear" else {"covariance_type": "diag"} if kind == "gmm" else {}
    head = fit_head(kind, x, y, vx, vy, 1, 2, seed=0, **options)
    spec = json.loads(json.dumps(head_spec(head)))
    assert spec["kind"] == kind and spec["dims"] == x.shape[1]
    rebuilt = build_head(spec, x.shape[1], 2)
    rebuilt.load_state_dict(head.state_dict())
    save_file(head.state_dict(), str(tmp_path / "head.safetensors"))
    reloaded = build_head(spec, x.shape[1], 2)
    reloaded.load_state_dict(load_file(str(tmp_path / "head.safetensors")))
    with torch.no_grad():
        expected = head(x)
        assert torch.equal(rebuilt.eval()(x), expected) and torch.equal(reloaded.eval()(x), expected)
    assert head_spec(rebuilt) == spec


def test_full_gmm_spec_describes_its_shapes() -> None:
    x, y = gaussian_split(60, seed=20)
    head = fit_gmm(x, y, None, None, 0, 2, seed=0, components=2)
    spec = head_spec(head)
    assert {k: spec[k] for k in ("components", "covariance_type", "dims", "attack_index")} == \
        {"components": 2, "covariance_type": "full", "dims": 6, "attack_index": 0}
    assert head.state_dict()["precisions_cholesky"].shape == (2, 6, 6)
    assert default_options("gmm")["components"] == 1 and default_options("gmm")["covariance_type"] == "full"


@pytest.mark.parametrize(("spec", "words"), [
    ({"kind": "forest"}, "unknown kind 'forest'"),
    ({"kind": "svm", "dims": 7}, "dims 7"),
    ({"kind": "gmm", "components": 0, "covariance_type": "full", "attack_index": 1}, "components 0"),
    ({"kind": "gmm", "components": 1, "covariance_type": "tied", "attack_index": 1}, "covariance_type 'tied'"),
    ({"kind": "gmm", "components": 1, "covariance_type": "diag", "attack_index": 2}, "attack_index 2"),
    (["gmm"], "not a JSON object"),
])
def test_build_head_refuses_a_spec_it_cannot_build(spec: Any, words: str) -> None:
    with pytest.raises(SmadlrpError, match=words):
        build_head(spec, 6, 2)


def test_fit_head_refuses_what_cannot_be_fitted() -> None:
    x, y = gaussian_split(20, seed=21)
    with pytest.raises(UsageError, match="unknown frozen head 'tree'"):
        fit_head("tree", x, y, None, None, 1, 2, seed=0)
    with pytest.raises(UsageError, match="unknown option 'gamma'"):
        fit_linear("svm", x, y, None, None, 1, 2, seed=0, gamma=1.0)
    with pytest.raises(UsageError, match="C=0: must be > 0"):
        fit_linear("logistic", x, y, None, None, 1, 2, seed=0, C=0)
    with pytest.raises(UsageError, match="covariance_type='tied'"):
        fit_head("gmm", x, y, None, None, 1, 2, seed=0, covariance_type="tied")
    with pytest.raises(SmadlrpError, match="training images of the attack class and of the others"):
        fit_linear("svm", x[y == 0], y[y == 0], None, None, 1, 2, seed=0)
    broken = x.clone()
    broken[3, 2] = float("nan")
    with pytest.raises(SmadlrpError, match="1 of 40 training feature vectors hold NaN"):
        fit_head("gmm", broken, y, None, None, 1, 2, seed=0)


# ---- features ----------------------------------------------------------------------------------------------


@pytest.fixture()
def tiny_split(tmp_path: Path) -> ImageDataset:
    """The train split (6 PNG images, 32 px) of a fresh tiny data folder."""
    root = write_tiny_dataset(tmp_path / "data", per_class=3, size=32)
    return ImageDataset(scan_split(root, "train").samples, 32, IMAGENET_MEAN, IMAGENET_STD)


def tiny_network() -> CompactVGG:
    torch.manual_seed(0)
    model = CompactVGG(2, widths=(4, 8))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):  # non-trivial statistics: train mode would be seen
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


def test_extracted_features_are_the_head_input(tiny_split: ImageDataset) -> None:
    model = tiny_network().train()
    features, labels = extract_features(model, "classifier", tiny_split, batch_size=4, device=CPU)
    assert model.training  # its mode is restored
    images = torch.stack([tiny_split[i][0] for i in range(len(tiny_split))])
    with torch.no_grad():
        model.eval()
        expected = model.flatten(model.pool(model.features(images)))
    assert features.shape == (6, 8) and features.dtype == torch.float32 and not features.is_inference()
    torch.testing.assert_close(features, expected)
    assert labels.tolist() == [s.label for s in tiny_split.samples] and labels.dtype == torch.int64


def test_a_convolutional_head_is_refused(tiny_split: ImageDataset) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1))
    with pytest.raises(SmadlrpError, match=r"input of layer '1' has shape \(4, 4, 32, 32\)"):
        extract_features(model, "1", tiny_split, batch_size=4, device=CPU)


@dataclass(frozen=True)
class _ScriptedRanks(Ranks):
    """Ranks whose collectives are played from a script: `gather` records this rank's value and answers `parts`
    with it in place of this rank's entry (and of every None)."""

    parts: tuple[Any, ...] = ()
    seen: list[Any] = field(default_factory=list)

    @contextmanager
    def shared_failure(self) -> Iterator[None]:
        yield

    def gather(self, value: Any) -> list[Any]:
        self.seen.append(value)
        return [value if i == self.rank or part is None else part for i, part in enumerate(self.parts)]


def test_sharded_extraction_gathers_the_features_of_one_process(tiny_split: ImageDataset) -> None:
    model = tiny_network()
    alone = extract_features(model, "classifier", tiny_split, batch_size=2, device=CPU)
    second = _ScriptedRanks(1, 2, parts=(None, None))
    extract_features(model, "classifier", tiny_split, batch_size=2, device=CPU, ranks=second)
    assert second.seen[0][0] == [2, 3]  # rank 1's share: the second batch of two
    merged = extract_features(model, "classifier", tiny_split, batch_size=2, device=CPU,
                              ranks=_ScriptedRanks(0, 2, parts=(None, second.seen[0])))
    assert torch.equal(merged[0], alone[0]) and torch.equal(merged[1], alone[1])


def key_of(model: nn.Module, dataset: ImageDataset) -> str:
    return feature_key(weights_fingerprint(model, "classifier"), dataset.samples, "classifier", 32, IMAGENET_MEAN,
                       IMAGENET_STD)


def test_cached_features_are_reused_without_reading_an_image(tiny_split: ImageDataset, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    notes: list[str] = []
    cache = FeatureCache(tmp_path / "cache", notify=notes.append)
    model = tiny_network()
    common: dict[str, Any] = {"input_size": 32, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "batch_size": 4,
                              "device": CPU, "cache": cache}
    first = features_for(model, "classifier", tiny_split, **common)
    assert not first.cached and cache.path(first.key).is_file() and first.key == key_of(model, tiny_split)

    def no_image(path: Any) -> Any:
        raise AssertionError(f"read {path}")

    with monkeypatch.context() as patched:
        patched.setattr(loading, "load_rgb", no_image)
        second = features_for(model, "classifier", tiny_split, **common)
    assert second.cached and torch.equal(second.features, first.features) and torch.equal(second.labels, first.labels)
    assert [note.split(" /")[0] for note in notes] == ["reusing cached features"]
    with torch.no_grad():
        model.classifier.weight.add_(1.0)  # the head does not change the features
    assert key_of(model, tiny_split) == first.key
    with torch.no_grad():
        model.get_parameter("features.1.bias").add_(1e-3)  # the backbone does (BatchNorm's shift)
    assert key_of(model, tiny_split) != first.key


def test_an_image_touched_since_changes_the_key(tiny_split: ImageDataset) -> None:
    model = tiny_network()
    before = key_of(model, tiny_split)
    path = tiny_split.samples[4].path
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert key_of(model, tiny_split) != before


def test_a_corrupt_or_foreign_cache_file_is_ignored_and_rewritten(tiny_split: ImageDataset, tmp_path: Path) -> None:
    notes: list[str] = []
    cache = FeatureCache(tmp_path / "cache", notify=notes.append)
    model = tiny_network()
    common: dict[str, Any] = {"input_size": 32, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "batch_size": 4,
                              "device": CPU, "cache": cache}
    first = features_for(model, "classifier", tiny_split, **common)
    path = cache.path(first.key)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    again = features_for(model, "classifier", tiny_split, **common)
    assert not again.cached and "ignoring the cached features" in notes[-1] and "truncated" in notes[-1]
    assert torch.equal(again.features, first.features) and read_document(path)["key"] == first.key
    assert features_for(model, "classifier", tiny_split, **common).cached  # rewritten, whole again
    foreign = cache.path("0" * 64)
    foreign.write_bytes(path.read_bytes())  # a valid file under another key's name is not trusted
    assert cache.load("0" * 64) is None and "another key" in notes[-1]
    cache.save(first.key, first.features, first.labels[torch.randperm(6)] * 0, {})  # labels that are not the split's
    assert not features_for(model, "classifier", tiny_split, **common).cached and "labels differ" in notes[-1]


def test_the_default_cache_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SMADLRP_CACHE", str(tmp_path / "c"))
    assert FeatureCache().folder == tmp_path / "c" / "features"
    monkeypatch.delenv("SMADLRP_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert feats.default_feature_folder() == tmp_path / "home" / ".cache" / "smadlrp" / "features"


_WORKER = """
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from smadlrp.core import distributed
from smadlrp.data.loading import IMAGENET_MEAN, IMAGENET_STD, ImageDataset, scan_split
from smadlrp.detector.features import FeatureCache, features_for
from smadlrp.detector.architecture import CompactVGG

data, out = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
model = CompactVGG(2, widths=(4, 8))
dataset = ImageDataset(scan_split(data, "train").samples, 32, IMAGENET_MEAN, IMAGENET_STD)
with distributed.session("cpu") as ranks:
    results = []
    for _ in range(2):
        found = features_for(model, "classifier", dataset, input_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                             batch_size=2, device=torch.device("cpu"), cache=FeatureCache(out / "cache"))
        results.append({"cached": found.cached, "features": found.features.tolist(),
                        "labels": found.labels.tolist()})
    (out / f"rank{ranks.rank}.json").write_text(json.dumps(results))
"""


@pytest.mark.slow
def test_features_on_two_ranks_equal_one_process_and_are_cached_once(tmp_path: Path) -> None:
    data = write_tiny_dataset(tmp_path / "data", per_class=3, size=32)
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(data), str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    torch.manual_seed(0)
    model = CompactVGG(2, widths=(4, 8))
    dataset = ImageDataset(scan_split(data, "train").samples, 32, IMAGENET_MEAN, IMAGENET_STD)
    alone, labels = extract_features(model, "classifier", dataset, batch_size=2, device=CPU)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for runs in ranks:
        assert [run["cached"] for run in runs] == [False, True]
        for run in runs:
            assert torch.equal(torch.tensor(run["features"]), alone) and run["labels"] == labels.tolist()
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
