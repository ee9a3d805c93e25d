"""PatternNet / PatternAttribution fitting: estimators on a toy problem, conv geometry, streaming, files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.lrp import patterns as patterns_module
from smadlrp.lrp.patterns import (
    KINDS,
    SCHEMA,
    PatternSet,
    check_fingerprint,
    fit_patterns,
    load_patterns,
    save_patterns,
    weights_fingerprint,
)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _reference_pattern(x: np.ndarray, y: np.ndarray, w: np.ndarray, active: np.ndarray | None) -> np.ndarray:
    """Pattern of one unit from its samples x (N, K), y = w^T x (N,), in float64; `active` selects samples."""
    if active is not None:
        x, y = x[active], y[active]
    numerator = (x * y[:, None]).mean(0) - x.mean(0) * y.mean()
    return numerator / (w @ numerator)


def _linear(w: np.ndarray, bias: float | None = 0.0) -> nn.Linear:
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w))
        if layer.bias is not None:
            layer.bias.fill_(bias or 0.0)
    return layer


def test_toy_signal_distractor_recovers_signal_direction() -> None:
    """x = a_s s + a_d d: a filter w orthogonal to a_d reads s; the pattern, not w, points along a_s."""
    rng = np.random.default_rng(0)
    n = 20000
    a_s, a_d = np.array([1.0, 0.0]), np.array([1.0, 1.0]) / np.sqrt(2)
    s, d = rng.normal(0.0, 1.0, n), rng.normal(2.0, 1.0, n)  # the distractor has a non-zero mean
    x = s[:, None] * a_s + d[:, None] * a_d
    w = np.array([[1.0, -1.0]])  # w^T a_d = 0, w^T a_s = 1
    model = _linear(w, bias=0.0)
    batches = list(torch.from_numpy(x).float().split(4096))
    sets = fit_patterns(model, batches, KINDS)
    assert _cosine(w[0], a_s) < 0.75
    for kind in KINDS:
        pattern = sets[kind].patterns[""][0].double().numpy()
        assert _cosine(pattern, a_s) >= 0.99, kind
        assert pattern @ w[0] == pytest.approx(1.0, rel=1e-6)
    y = x @ w[0]
    active = y > 0
    expected = _reference_pattern(x, y, w[0], active)
    fitted = sets["positive"].patterns[""][0].double().numpy()
    np.testing.assert_allclose(fitted, expected, rtol=1e-4, atol=1e-5)
    # The other reading of the positive estimator, E[y] over all samples, is pulled towards the distractor.
    unconditional = (x[active] * y[active, None]).mean(0) - x[active].mean(0) * y.mean()
    assert _cosine(unconditional, a_s) < 0.9
    assert sets["positive"].stats[0].active_share == pytest.approx(active.mean())


def _conv_samples(layer: nn.Conv2d, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Unfolded patches per group (G, N, K) and y = w^T patch per unit (N, out), checked against the layer."""
    if isinstance(layer.padding, str):
        totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size, strict=True)]
        pads = (totals[1] // 2, totals[1] - totals[1] // 2, totals[0] // 2, totals[0] - totals[0] // 2)
    else:
        pads = (layer.padding[1], layer.padding[1], layer.padding[0], layer.padding[0])
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    padded = F.pad(x, pads, mode=mode)
    cols = F.unfold(padded, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)  # (B, C*k, L)
    groups, units = layer.groups, layer.out_channels
    per_group = cols.shape[1] // groups
    patches = torch.stack([cols[:, g * per_group:(g + 1) * per_group] for g in range(groups)])
    patches = patches.permute(0, 1, 3, 2).reshape(groups, -1, per_group)  # (G, B*L, K)
    w = layer.weight.detach().reshape(units, -1)
    y = torch.stack([patches[j // (units // groups)] @ w[j] for j in range(units)], dim=1)  # (B*L, out)
    with torch.no_grad():
        out = layer(x)
    bias = 0 if layer.bias is None else layer.bias.detach().view(1, -1, 1, 1)
    expected = (out - bias).permute(0, 2, 3, 1).reshape(-1, units)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    return patches.numpy(), y.numpy()


CONVS = {
    "stride-padding": lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1),
    "dilation-groups-nobias": lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False),
    "rect-reflect-groups": lambda: nn.Conv2d(3, 6, (3, 2), stride=(2, 1), padding=(1, 1), groups=3,
                                             padding_mode="reflect"),
    "same-circular": lambda: nn.Conv2d(2, 3, (2, 3), padding="same", dilation=(2, 1),
                                       padding_mode="circular"),
    "same-zeros-asymmetric": lambda: nn.Conv2d(2, 3, 4, padding="same"),
    "valid-replicate-1x1": lambda: nn.Conv2d(4, 2, 1, padding="valid", padding_mode="replicate"),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("case", sorted(CONVS))
def test_conv_patterns_equal_unfold_reference(case: str) -> None:
    torch.manual_seed(1)
    layer = CONVS[case]().double()
    x = torch.randn(5, layer.in_channels, 7, 6, dtype=torch.float64) + 0.3
    model = nn.Sequential(layer, nn.ReLU(inplace=True))  # statistics must be taken before the in-place ReLU
    sets = fit_patterns(model, [x[:2], x[2:]], KINDS)
    patches, y = _conv_samples(layer, x)
    bias = np.zeros(y.shape[1]) if layer.bias is None else layer.bias.detach().numpy()
    w = layer.weight.detach().reshape(layer.out_channels, -1).numpy()
    group_size = layer.out_channels // layer.groups
    for kind in KINDS:
        fitted = sets[kind].patterns["0"].reshape(layer.out_channels, -1).numpy()
        stats = sets[kind].stats[0]
        assert (stats.samples, stats.units, stats.degenerate_units) == (y.shape[0], layer.out_channels, 0)
        for j in range(layer.out_channels):
            active = (y[:, j] + bias[j] > 0) if kind == "positive" else None
            expected = _reference_pattern(patches[j // group_size], y[:, j], w[j], active)
            np.testing.assert_allclose(fitted[j], expected, rtol=1e-8, atol=1e-10)
    share = ((y + bias) > 0).mean()
    assert sets["positive"].stats[0].active_share == pytest.approx(share, rel=1e-12)


def _small_net() -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False), nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 16, bias=False), nn.ReLU(), nn.Linear(16, 3),
    )


def test_streaming_fit_equals_one_shot_fit() -> None:
    model = _small_net()
    x = torch.randn(23, 3, 16, 16) + 0.5
    with torch.no_grad():  # centre the logits so that every output unit is active on part of the data
        model[-1].bias -= model(x).median(0).values
    seen: list[tuple[int, int]] = []
    streamed = fit_patterns(model, x.split([5, 8, 10]), KINDS, progress=lambda *call: seen.append(call))
    one_shot = fit_patterns(model, [x], KINDS)
    assert seen == [(1, 5), (1, 8), (1, 10), (2, 5), (2, 8), (2, 10)]
    layers = dict(model.named_modules())
    for kind in KINDS:
        assert streamed[kind].images == one_shot[kind].images == 23
        assert [s.samples for s in streamed[kind].stats] == [s.samples for s in one_shot[kind].stats]
        assert all(2 * s.degenerate_units < s.units for s in streamed[kind].stats)
        for name, pattern in streamed[kind].patterns.items():
            reference = one_shot[kind].patterns[name]
            assert pattern.shape == layers[name].weight.shape and pattern.dtype == torch.float32
            assert float((pattern - reference).norm() / reference.norm()) <= 1e-6, (kind, name)
            # a fitted pattern is normalised so that w_j^T a_j = 1 for every non-degenerate unit
            w_dot_a = (layers[name].weight.detach().double() * pattern.double()).flatten(1).sum(1)
            assert torch.allclose(w_dot_a, torch.ones_like(w_dot_a), atol=1e-4), (kind, name)


def test_sums_held_in_blocks_of_units_give_the_same_patterns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large layers keep their float64 sums in blocks of whole units; blocks of 1-3 units change nothing."""
    model = _small_net()
    x = torch.randn(9, 3, 16, 16) + 0.5
    whole = fit_patterns(model, x.split(4), KINDS)
    monkeypatch.setattr(patterns_module, "_BLOCK", 200)  # 200 // 72 = 2 conv units; 200 // 128 = 1 linear unit
    blocked = fit_patterns(model, x.split(4), KINDS)
    for kind in KINDS:
        assert blocked[kind].stats == whole[kind].stats
        for name, pattern in whole[kind].patterns.items():
            torch.testing.assert_close(blocked[kind].patterns[name], pattern, rtol=1e-6, atol=1e-7)


def test_the_fit_needs_the_same_images_in_both_passes() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(TypeError, match="passes over `batches` twice"):
        fit_patterns(model, iter([torch.randn(4, 3)]), ("all",))

    class Shrinking:
        def __init__(self) -> None:
            self.sizes = [5, 4]

        def __iter__(self) -> Any:
            return iter([torch.randn(self.sizes.pop(0), 3)])

    with pytest.raises(SmadlrpError, match="5 images in the first pass and 4 in the second"):
        fit_patterns(model, Shrinking(), ("all",))


def test_linear_on_sequences_uses_every_position_as_a_sample() -> None:
    torch.manual_seed(3)
    layer = nn.Linear(5, 4)
    x = torch.randn(6, 7, 5)
    on_sequences = fit_patterns(nn.Sequential(layer), [x], KINDS)
    on_rows = fit_patterns(nn.Sequential(layer), [x.reshape(-1, 5)], KINDS)
    for kind in KINDS:
        torch.testing.assert_close(on_sequences[kind].patterns["0"], on_rows[kind].patterns["0"])
        assert on_sequences[kind].stats[0].samples == 42


class _WithUnusedHead(nn.Module):
    def __init__(self, used: nn.Linear) -> None:
        super().__init__()
        self.used = used
        self.unused = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_degenerate_units_are_counted_and_fall_back() -> None:
    rng = np.random.default_rng(4)
    w = rng.normal(size=(4, 4))
    w[0] = 0.0  # zero filter: y = 0, no statistics
    w[1] = [0.0, 0.0, 0.0, 2.0]  # reads only the constant feature: y never varies
    layer = _linear(w, bias=0.0)
    with torch.no_grad():
        layer.bias[2] = -1e3  # never active
    x = torch.from_numpy(rng.normal(size=(300, 4))).float()
    x[:, 3] = 1.5
    model = _WithUnusedHead(layer)
    sets = fit_patterns(model, x.split(100), KINDS)
    fallback = w / np.maximum((w * w).sum(1, keepdims=True), 1e-300)
    expected_degenerate = {"all": [0, 1], "positive": [0, 1, 2]}
    for kind in KINDS:
        stats = {s.name: s for s in sets[kind].stats}
        assert stats["used"].degenerate_units == len(expected_degenerate[kind])
        assert (stats["unused"].samples, stats["unused"].degenerate_units) == (0, 2)
        pattern = sets[kind].patterns["used"].double().numpy()
        for j in expected_degenerate[kind]:
            np.testing.assert_allclose(pattern[j], fallback[j], rtol=1e-6)
        assert not np.allclose(pattern[3], fallback[3])
        unused_w = model.unused.weight.detach()
        unused_fallback = unused_w / (unused_w**2).sum(1, keepdim=True)
        torch.testing.assert_close(sets[kind].patterns["unused"], unused_fallback)
    assert np.all(sets["positive"].patterns["used"][0].numpy() == 0.0)
    out = x.double().numpy() @ w.T + layer.bias.detach().double().numpy()
    assert sets["positive"].stats[0].active_share == pytest.approx((out > 0).mean(), rel=1e-12)


def test_dropout_is_off_during_the_fit_and_modes_are_restored() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5), nn.Linear(6, 2))
    model.train()
    model[2].eval()
    x = torch.randn(40, 6)
    first = fit_patterns(model, [x], ("all",))
    second = fit_patterns(model, [x], ("all",))
    torch.testing.assert_close(first["all"].patterns["2"], second["all"].patterns["2"], rtol=0, atol=0)
    assert [m.training for m in model.modules()] == [True, True, True, False]


_CUDNN: Any = torch.backends.cudnn


class _PrecisionProbe(nn.Linear):
    """A Linear layer that records the CUDA float32 precision settings in force when it runs."""

    seen: list[tuple[str, str]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        settings = (_CUDNN.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
        self.seen.append(settings)
        return super().forward(x)


@pytest.mark.skipif(not hasattr(torch.backends.cudnn, "conv"), reason="torch without per-backend precision")
def test_tensorfloat32_is_off_during_the_fit_and_restored() -> None:
    conv, matmul = _CUDNN.conv, torch.backends.cuda.matmul
    before = (conv.fp32_precision, matmul.fp32_precision)
    conv.fp32_precision, matmul.fp32_precision = "tf32", "tf32"
    try:
        fit_patterns(_PrecisionProbe(3, 2), [torch.randn(4, 3)], ("all",))
        assert _PrecisionProbe.seen == [("ieee", "ieee")] * 2  # one forward pass per statistics pass
        assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")
    finally:
        conv.fp32_precision, matmul.fp32_precision = before


def test_bad_arguments_are_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    for kinds in [("negative",), (), ("all", "all")]:
        with pytest.raises(UsageError, match="pattern kinds"):
            fit_patterns(model, [torch.randn(2, 3)], kinds)
    with pytest.raises(SmadlrpError, match="no images"):
        fit_patterns(model, [], ("all",))
    with pytest.raises(SmadlrpError, match="batches of image tensors"):
        fit_patterns(model, [(torch.randn(2, 3), torch.zeros(2))], ("all",))  # type: ignore[list-item]
    with pytest.raises(SmadlrpError, match="no Conv2d or Linear"):
        fit_patterns(nn.Sequential(nn.ReLU()), [torch.randn(2, 3)])


@pytest.fixture()
def fitted() -> dict[str, PatternSet]:
    return fit_patterns(_small_net(), [torch.randn(4, 3, 16, 16)], KINDS)


def test_save_load_round_trip(tmp_path: Path, fitted: dict[str, PatternSet]) -> None:
    path = tmp_path / "out" / "patterns.safetensors"
    save_patterns(path, fitted, {"weights_fingerprint": "abc", "dataset": "synthetic", "split": "train"})
    sets, meta = load_patterns(path)
    assert meta["schema"] == SCHEMA and meta["kinds"] == list(KINDS) and meta["images"] == 4
    assert (meta["dataset"], meta["split"], meta["weights_fingerprint"]) == ("synthetic", "train", "abc")
    assert "E+[y_j]" in meta["estimators"]["positive"] and "w_j / (w_j^T w_j)" in meta["fallback"]
    assert list(tmp_path.joinpath("out").iterdir()) == [path]  # no temporary file left behind
    for kind in KINDS:
        assert sets[kind].stats == fitted[kind].stats and sets[kind].images == 4
        assert sets[kind].patterns.keys() == fitted[kind].patterns.keys()
        for name, tensor in fitted[kind].patterns.items():
            assert torch.equal(sets[kind].patterns[name], tensor)
    with pytest.raises(ValueError, match="reserved"):
        save_patterns(path, fitted, {"images": 3})


def test_bad_files_are_refused(tmp_path: Path, fitted: dict[str, PatternSet]) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a tensor file at all")
    with pytest.raises(SmadlrpError, match="not a safetensors file"):
        load_patterns(text)
    with pytest.raises(SmadlrpError, match="file not found"):
        load_patterns(tmp_path / "missing.safetensors")
    with pytest.raises(SmadlrpError, match="is a folder"):
        load_patterns(tmp_path)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(SmadlrpError, match="without smadlrp metadata"):
        load_patterns(plain)
    row = {"name": "x", "samples": 1, "active_share": None, "degenerate_units": 0, "units": 1}
    for header, message in [
        ({"kinds": ["all"]}, "without a schema"),
        ({"schema": "smadlrp.detector.checkpoint/1"}, "has schema 'smadlrp.detector.checkpoint/1'"),
        ({"schema": SCHEMA, "kinds": ["all"]}, "damaged pattern file"),
        ({"schema": SCHEMA, "kinds": ["all"], "images": 1, "stats": {"all": [row]}}, "unlisted kind"),
        ({"schema": SCHEMA, "kinds": ["all"], "images": 1, "stats": {"all": []}}, "does not match"),
    ]:
        bad = tmp_path / "bad.safetensors"
        save_file({"all/x": torch.zeros(1), "positive/x": torch.zeros(1)}, str(bad),
                  metadata={"smadlrp": json.dumps(header)})
        with pytest.raises(SmadlrpError, match=message):
            load_patterns(bad)


def test_fingerprint_identifies_weights() -> None:
    state = {"b": torch.arange(6, dtype=torch.float32), "a": torch.ones(2, 3)}
    reference = weights_fingerprint(state)
    assert len(reference) == 64 and reference == weights_fingerprint(dict(reversed(state.items())))
    changed = [
        {**state, "b": state["b"].clone().index_fill_(0, torch.tensor([5]), 5.5)},
        {**state, "b": state["b"].reshape(2, 3)},
        {**state, "b": state["b"].double()},
        {"c": state["b"], "a": state["a"]},
    ]
    assert len({reference, *(weights_fingerprint(s) for s in changed)}) == 5
    check_fingerprint({"weights_fingerprint": reference}, reference)
    with pytest.raises(SmadlrpError, match="fitted on another model.*refit with smadlrp fit-patterns"):
        check_fingerprint({"weights_fingerprint": reference}, weights_fingerprint(changed[0]))
    with pytest.raises(SmadlrpError, match="no weights fingerprint"):
        check_fingerprint({}, reference)


@pytest.mark.cuda
def test_cuda_fit_matches_cpu() -> None:
    model = _small_net()
    x = torch.randn(12, 3, 16, 16) + 0.5
    on_cpu = fit_patterns(model, x.split(5), KINDS)
    on_gpu = fit_patterns(model, x.split(5), KINDS, device=torch.device("cuda"))
    for kind in KINDS:
        for name, pattern in on_cpu[kind].patterns.items():
            gpu = on_gpu[kind].patterns[name]
            assert gpu.device.type == "cpu"
            assert float((gpu - pattern).norm() / pattern.norm()) <= 1e-5, (kind, name)
