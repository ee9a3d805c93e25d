"""Every LRP rule on a single Linear and single Conv2d layers against a dense hand-computed reference.

The reference builds the layer's matrix explicitly (the layer applied to identity basis inputs), computes the
rule's formula with plain float64 matrix algebra, and for padding modes other than zeros applies the rule on
the padded input, then the padding map's transpose. The engine runs through the TorchLRP-style convert path
with an arbitrary output relevance `R_out = G * z`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smadlrp.core.device import num_threads
from smadlrp.core.errors import UsageError
from smadlrp.lrp import COMPOSITES, build_composite, convert, make_rule, method_names, rule_names, rule_parameters
from smadlrp.lrp.rules import DEFAULT_STABILIZER, RULES

GEOMETRIES: dict[str, Callable[[], nn.Module]] = {
    "linear": lambda: nn.Linear(7, 5),
    "conv1x1": lambda: nn.Conv2d(3, 4, 1),
    "conv1x1-stride2": lambda: nn.Conv2d(3, 4, 1, stride=2),
    "conv1x1-stride3-groups2": lambda: nn.Conv2d(4, 6, 1, stride=3, groups=2),
    "conv3x3-stride2": lambda: nn.Conv2d(3, 4, 3, stride=2),
    "conv7x7-stride2-pad3": lambda: nn.Conv2d(2, 3, 7, stride=2, padding=3),
    "conv3x3-dilation2": lambda: nn.Conv2d(3, 4, 3, padding=2, dilation=2),
    "conv3x3-groups2": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
    "conv3x3-reflect": lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
    "conv3x3-circular": lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="circular"),
}


def _normalisation(channels: int) -> tuple[Tensor, Tensor]:
    """Per-channel mean/std; zbox bounds from them: low = -mean / std, high = (1 - mean) / std."""
    return 0.4 + 0.05 * torch.arange(channels), 0.2 + 0.03 * torch.arange(channels)


def _sign0(z: Tensor) -> Tensor:
    return torch.where(z >= 0, 1.0, -1.0).double()


def _divide(num: Tensor, den: Tensor, eps: float) -> Tensor:
    """num / (den + eps sign0(den)) with 0 where eps = 0 and den = 0 (columns j of num, entries j of den)."""
    if eps == 0:
        return torch.where(den == 0, 0.0, num / den).double()
    return num / (den + eps * _sign0(den))


def _share(contrib: Tensor, den: Tensor, r: Tensor, eps: float) -> Tensor:
    """R_i = sum_j contrib_ji / stab(den_j) R_j for a (n_out, n_in) contribution matrix."""
    return (_divide(contrib, den[:, None], eps) * r[:, None]).sum(0)


def ref_epsilon(m: Tensor, b: Tensor, a: Tensor, r: Tensor, eps: float) -> Tensor:
    contrib = m * a[None, :]
    return _share(contrib, contrib.sum(1) + b, r, eps)


def ref_gamma(m: Tensor, b: Tensor, a: Tensor, r: Tensor, gamma: float, eps: float) -> Tensor:
    """The contributions of the output's sign amplified: positive ones where z >= 0, negative ones elsewhere."""
    contrib = m * a[None, :]
    negative = (contrib.sum(1) + b < 0)[:, None]
    rho = contrib + gamma * torch.where(negative, contrib.clamp(max=0), contrib.clamp(min=0))
    rho_b = b + gamma * torch.where(negative[:, 0], b.clamp(max=0), b.clamp(min=0))
    return _share(rho, rho.sum(1) + rho_b, r, eps)


def ref_alpha_beta(m: Tensor, b: Tensor, a: Tensor, r: Tensor, alpha: float, beta: float) -> Tensor:
    """Where an output has no negative (positive) contributions, the positive (negative) ones take all of its
    relevance: alpha, beta become 1, 0 (0, -1) there."""
    contrib = m * a[None, :]
    pos, neg = contrib.clamp(min=0), contrib.clamp(max=0)
    z_pos, z_neg = pos.sum(1) + b.clamp(min=0), neg.sum(1) + b.clamp(max=0)
    alphas = torch.where(z_neg == 0, 1.0, torch.where(z_pos == 0, 0.0, alpha)).double()
    betas = torch.where(z_neg == 0, 0.0, torch.where(z_pos == 0, -1.0, beta)).double()
    eps = DEFAULT_STABILIZER
    positive = _share(pos, z_pos, alphas * r, eps)
    negative = _share(neg, z_neg, betas * r, eps)
    return positive - negative


def ref_zbox(m: Tensor, a: Tensor, r: Tensor, low: Tensor, high: Tensor) -> Tensor:
    contrib = m * a[None, :] - m.clamp(min=0) * low[None, :] - m.clamp(max=0) * high[None, :]
    return _share(contrib, contrib.sum(1), r, DEFAULT_STABILIZER)


def ref_share_by(v: Tensor, r: Tensor) -> Tensor:
    return _share(v, v.sum(1), r, 0.0)


class Dense:
    """A single layer as matrices: output = M (P a) + b; M (n_out, n_padded), P (n_padded, n_in)."""

    def __init__(self, layer: nn.Module, in_shape: tuple[int, ...]) -> None:
        self.layer, self.in_shape = layer, in_shape
        self.pad = self._padding_matrix()
        weight = layer.weight.detach()
        self.m = self.matrix(weight)
        self.connections = (self.matrix(torch.ones_like(weight)) != 0).double()
        self.b = self._bias()

    def _basis(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> Tensor:
        n = int(torch.tensor(shape).prod())
        return torch.eye(n, dtype=dtype).view(n, *shape)

    def _explicit_padding(self) -> bool:
        return isinstance(self.layer, nn.Conv2d) and self.layer.padding_mode != "zeros"

    def _padding_matrix(self) -> Tensor:
        basis = self._basis(self.in_shape)
        if not self._explicit_padding():
            return basis.view(len(basis), -1).T
        layer = self.layer
        assert isinstance(layer, nn.Conv2d)
        padded = F.pad(basis, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        self.padded_shape = tuple(padded.shape[1:])
        return padded.reshape(len(basis), -1).T

    def matrix(self, weight: Tensor) -> Tensor:
        """The layer's linear map with float32 `weight` (no bias) on the padded input space, (n_out, n_padded),
        float64. Each entry is one kernel tap or 0, so the float32 convolution of 0/1 basis images is exact."""
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return weight.double()
        assert isinstance(layer, nn.Conv2d)
        explicit = self._explicit_padding()
        basis = self._basis(self.padded_shape if explicit else self.in_shape, torch.float32)
        padding = 0 if explicit else layer.padding
        out = F.conv2d(basis, weight, None, layer.stride, padding, layer.dilation, layer.groups)  # type: ignore[arg-type]
        self.out_positions = out[0, 0].numel() if out.dim() == 4 else 1
        return out.reshape(len(basis), -1).T.double()

    def _bias(self) -> Tensor:
        bias = self.layer.bias.detach().double()
        if isinstance(self.layer, nn.Linear):
            return bias
        return bias.repeat_interleave(self.out_positions)

    def per_channel(self, values: tuple[float, ...]) -> Tensor:
        """Per-channel bounds as a vector over the (unpadded) input, then padded like the input."""
        channels = self.in_shape[0]
        spatial = int(torch.tensor(self.in_shape[1:]).prod()) if len(self.in_shape) > 1 else 1
        vec = torch.tensor(values, dtype=torch.float64).expand(channels).repeat_interleave(spatial)
        assert len(vec) == int(torch.tensor(self.in_shape).prod())
        return self.pad @ vec


def reference(key: str, params: dict[str, Any], dense: Dense, a: Tensor, r: Tensor) -> Tensor:
    """The rule `key` on one sample: `a` (n_in,), `r` (n_out,) -> input relevance (n_in,)."""
    m, b, ap = dense.m, dense.b, dense.pad @ a
    if key == "zero":
        out = ref_epsilon(m, b, ap, r, 0.0)
    elif key == "epsilon":
        out = ref_epsilon(m, b, ap, r, params["epsilon"])
    elif key in ("gamma", "gamma+epsilon"):
        out = ref_gamma(m, b, ap, r, params["gamma"], params.get("epsilon", DEFAULT_STABILIZER))
    elif key in ("alpha1beta0", "alpha2beta1"):
        alpha, beta = (1.0, 0.0) if key == "alpha1beta0" else (2.0, 1.0)
        out = ref_alpha_beta(m, b, ap, r, alpha, beta)
    elif key == "zbox":
        low, high = _bounds(params)
        out = ref_zbox(m, ap, r, dense.per_channel(low), dense.per_channel(high))
    elif key == "flat":
        out = ref_share_by(dense.connections, r)
    elif key == "wsquare":
        out = ref_share_by(m.square(), r)
    elif key == "patternnet":
        out = dense.matrix(params["patterns"]["0"]).T @ r
    elif key == "patternattribution":  # one kernel tap per matrix entry: matrix(A * W) = matrix(A) * matrix(W)
        out = (dense.matrix(params["patterns"]["0"]) * m).T @ r
    else:
        raise AssertionError(f"no reference for rule {key}")
    return dense.pad.T @ out


SIGN_PATHS = ("gamma", "gamma+epsilon", "alpha1beta0", "alpha2beta1")
REFERENCE_KEYS = (
    "zero", "epsilon", "gamma", "gamma+epsilon", "alpha1beta0", "alpha2beta1", "zbox", "flat", "wsquare",
    "patternnet", "patternattribution",
)  # fmt: skip


def _bounds(params: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if "low" in params:
        return (params["low"],), (params["high"],)
    mean, std = params["mean"], params["std"]
    return tuple((-mean / std).tolist()), tuple(((1 - mean) / std).tolist())


def _params(key: str, layer: nn.Module, channels: int) -> dict[str, Any]:
    if key == "epsilon":
        return {"epsilon": 0.3}
    if key == "gamma":
        return {"gamma": 0.25}
    if key == "gamma+epsilon":
        return {"gamma": 0.25, "epsilon": 0.2}
    if key == "zbox":
        if isinstance(layer, nn.Linear):
            return {"low": -1.5, "high": 2.0}
        mean, std = _normalisation(channels)
        return {"mean": mean, "std": std}
    if key in ("patternnet", "patternattribution"):
        return {"patterns": {"0": torch.randn_like(layer.weight)}}
    return {}


def test_every_registered_rule_has_a_reference() -> None:
    assert set(RULES) == set(REFERENCE_KEYS)


# Rules with a separate code path for inputs without negative values (after a ReLU) run on both kinds of input.
CASES = [(key, sign) for key in rule_names() for sign in ("mixed", "nonnegative")[: 2 if key in SIGN_PATHS else 1]]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors run fastest on one thread, and the CPU is shared."""
    with num_threads(1):
        yield


def assert_matches_reference(key: str, params: dict[str, Any], layer: nn.Module, x: Tensor, relu: bool = False) -> None:
    """The relevance the engine gives the input `x` (B, ...) of `layer` (followed by a ReLU with `relu`) for a
    random relevance at the output equals the dense reference's, image by image."""
    x = x.clone().requires_grad_(True)
    after = [nn.ReLU(), nn.Flatten()] if relu else [nn.Flatten()]
    y = convert(nn.Sequential(layer, *after))(x, explain=True, rule=key, **params)
    g = torch.randn_like(y)
    y.backward(g)
    assert x.grad is not None
    dense = Dense(layer, tuple(x.shape[1:]))
    z = layer(x.detach()).flatten(1).double()
    z = z.clamp(min=0) if relu else z
    expected = torch.stack([
        reference(key, params, dense, x[i].detach().flatten().double(), g[i].double() * z[i]) for i in range(len(x))
    ])
    torch.testing.assert_close(x.grad.flatten(1).double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize(("key", "sign"), CASES)
def test_rule_matches_dense_reference(key: str, geometry: str, sign: str) -> None:
    torch.manual_seed(zlib.crc32(f"{key}/{geometry}/{sign}".encode()))
    layer = GEOMETRIES[geometry]()
    in_shape = (7,) if isinstance(layer, nn.Linear) else (layer.in_channels, 6, 6)  # type: ignore[attr-defined]
    x = torch.randn(2, *in_shape)
    if key == "zbox":  # inputs inside the box
        if isinstance(layer, nn.Linear):
            x = x.clamp(-1.5, 2.0)
        else:
            mean, std = _normalisation(in_shape[0])
            x = (torch.rand(2, *in_shape) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    if sign == "nonnegative":
        x = x.abs()
    assert_matches_reference(key, _params(key, layer, in_shape[0]), layer, x)


@pytest.mark.parametrize("geometry", ["linear", "conv1x1-stride2", "conv3x3-groups2"])
@pytest.mark.parametrize("sign", ["mixed", "nonnegative"])
@pytest.mark.parametrize("key", SIGN_PATHS)
def test_rule_before_a_relu_matches_dense_reference(key: str, sign: str, geometry: str) -> None:
    """A layer whose output goes straight into a ReLU gets relevance only where z > 0 (the rules take a
    shorter path there): R_out = G * relu(z)."""
    torch.manual_seed(zlib.crc32(f"relu/{key}/{sign}/{geometry}".encode()))
    layer = GEOMETRIES[geometry]()
    in_shape = (7,) if isinstance(layer, nn.Linear) else (layer.in_channels, 6, 6)  # type: ignore[attr-defined]
    x = torch.randn(2, *in_shape)
    x = x.abs() if sign == "nonnegative" else x
    assert_matches_reference(key, _params(key, layer, in_shape[0]), layer, x, relu=True)


@pytest.mark.parametrize("key", ["alpha1beta0", "alpha2beta1"])
def test_alpha_beta_outputs_with_contributions_of_one_sign_on_inputs_of_both_signs(key: str) -> None:
    """An output whose contributions are all positive (all negative) gives all of its relevance to them, also
    when the input has both signs and z+, z- are computed from |a| |W|."""
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.bias.zero_()
        layer.weight.copy_(torch.tensor([[1.0, -1.0, 2.0, -3.0], [-1.0, 1.0, -1.0, 1.0], [0.5, 0.5, -1.0, 2.0]]))
    x = torch.tensor([[1.0, -2.0, 3.0, -1.0]], requires_grad=True)  # contributions: all > 0, all < 0, mixed
    y = convert(nn.Sequential(layer))(x, explain=True, rule=key)
    g = torch.tensor([[0.7, -1.3, 0.4]])
    y.backward(g)
    assert x.grad is not None
    dense = Dense(layer, (4,))
    z = layer(x.detach())[0].double()
    expected = reference(key, {}, dense, x[0].detach().double(), g[0].double() * z)
    torch.testing.assert_close(x.grad[0].double(), expected, rtol=1e-5, atol=1e-6)


def test_pattern_attribution_on_linear_is_closed_form() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    pattern = torch.randn(3, 6)
    x = torch.randn(4, 6)
    target = torch.tensor([0, 2, 1, 2])
    from smadlrp.lrp import explain

    got = explain(nn.Sequential(layer), x, "patternattribution", target, patterns={"0": pattern})
    logits = layer(x).detach()
    start = torch.zeros_like(logits)
    start[torch.arange(4), target] = logits[torch.arange(4), target]
    expected = start @ (pattern * layer.weight.detach())
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    ("key", "params", "message"),
    [
        ("epsilon", {"epsilon": -1}, "epsilon must be >= 0"),
        ("epsilon", {"epsilon": "big"}, "epsilon must be a number"),
        ("gamma", {"gamma": -0.1}, "gamma must be >= 0"),
        ("gamma+epsilon", {"epsilon": -0.1}, "epsilon must be >= 0"),
        ("alpha1beta0", {"alpha": 3, "beta": 1}, "alpha - beta must be 1"),
        ("alpha2beta1", {"beta": -1, "alpha": 0}, "beta must be >= 0"),
        ("zbox", {}, "needs input bounds"),
        ("zbox", {"low": 0, "high": 1, "mean": 0.5, "std": 0.2}, "either low and high"),
        ("zbox", {"low": 1, "high": 0}, "low must be <= high"),
        ("zbox", {"low": [0, 0, 2], "high": 1}, "low must be <= high"),
        ("zbox", {"mean": [0.5, 0.5], "std": [0.2, 0.0]}, "std must be > 0"),
        ("zbox", {"mean": [0.5, 0.5], "std": [0.2, 0.2, 0.2]}, "mean has 2 channels but std has 3"),
        ("patternnet", {}, "smadlrp fit-patterns"),
        ("zero", {"epsilon": 0.1}, "has no parameter epsilon"),
    ],
)
def test_invalid_parameters_are_one_line_usage_errors(key: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        make_rule(key, **params)
    assert "\n" not in str(info.value)


def test_defaults_are_documented_values() -> None:
    assert make_rule("epsilon").epsilon == 0.1  # type: ignore[attr-defined]
    gamma = make_rule("gamma+epsilon")
    assert (gamma.gamma, gamma.epsilon) == (0.1, 0.1)  # type: ignore[attr-defined]
    assert make_rule("gamma").gamma == 0.1  # type: ignore[attr-defined]
    alpha_beta = make_rule("alpha2beta1")
    assert (alpha_beta.alpha, alpha_beta.beta) == (2.0, 1.0)  # type: ignore[attr-defined]


def test_zbox_bounds_from_mean_and_std() -> None:
    rule = make_rule("zbox", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    low, high = rule.bounds()  # type: ignore[attr-defined]
    assert low == pytest.approx([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225])
    assert high == pytest.approx([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225])


def test_unknown_method_lists_the_valid_ones() -> None:
    with pytest.raises(UsageError) as info:
        build_composite("epsilonn")
    for name in method_names():
        assert name in str(info.value)


def test_composite_parameters_go_to_the_rules_that_take_them() -> None:
    composite = build_composite("epsilon-gamma-box", {"epsilon": 0.01, "gamma": 0.5, "low": -2, "high": 2})
    assert composite.first == make_rule("zbox", low=-2, high=2)
    assert composite.conv == make_rule("gamma", gamma=0.5)
    assert composite.dense == make_rule("epsilon", epsilon=0.01)
    with pytest.raises(UsageError, match="does not use parameter"):
        build_composite("epsilon-plus", {"gamma": 0.5})


def test_rule_and_composite_names_do_not_collide() -> None:
    assert not set(RULES) & set(COMPOSITES)


def test_pattern_rules_do_not_mix_with_relevance_rules() -> None:
    with pytest.raises(UsageError, match="cannot be mixed"):
        build_composite("epsilon", overrides={0: make_rule("patternnet", patterns={})})


def test_docs_describe_every_rule_and_composite_with_its_defaults() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "lrp.md").read_text(encoding="utf-8")
    rule_rows = {line.split("|")[1].strip().strip("`"): line for line in text.splitlines() if line.startswith("| `")}
    for key in rule_names():
        assert key in rule_rows, f"docs/lrp.md has no table row for rule {key}"
        for name, default in rule_parameters(key).items():
            assert f"`{name}`" in rule_rows[key], f"docs/lrp.md: row {key} does not name {name}"
            if isinstance(default, float):
                assert f"({default:g})" in rule_rows[key], f"docs/lrp.md: row {key} lacks default {name}={default:g}"
    for name, spec in COMPOSITES.items():
        row = rule_rows.get(name)
        assert row is not None, f"docs/lrp.md has no table row for composite {name}"
        assert all(f"`{key}`" in row for key in (spec.conv, spec.dense) + ((spec.first,) if spec.first else ()))


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("key", ["gamma", "gamma+epsilon"])
def test_gamma_zero_matches_dense_reference(key: str, geometry: str) -> None:
    """gamma = 0 (a transformer composite's attention projections) takes the z-rule's path: the dense reference
    with gamma = 0 still holds on inputs of both signs."""
    torch.manual_seed(zlib.crc32(f"{key}/{geometry}/zero".encode()))
    layer = GEOMETRIES[geometry]()
    in_shape = (7,) if isinstance(layer, nn.Linear) else (layer.in_channels, 6, 6)  # type: ignore[attr-defined]
    params = {"gamma": 0.0, **({"epsilon": 0.2} if key == "gamma+epsilon" else {})}
    assert_matches_reference(key, params, layer, torch.randn(2, *in_shape))


@pytest.mark.parametrize("sign", ["mixed", "nonnegative"])
def test_gamma_on_many_rows_makes_its_weights_per_call(sign: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On inputs of many rows (a transformer's layers on a batch) gamma makes its modified weight for each call
    instead of keeping a copy of the weights; the relevance is the same as with the kept copy."""
    torch.manual_seed(11)
    layer = nn.Linear(7, 5)
    x = torch.randn(3, 4, 7)
    x = x.abs() if sign == "nonnegative" else x

    def run() -> tuple[Tensor, set[str]]:
        model = convert(nn.Sequential(layer, nn.Flatten()))
        leaf = x.clone().requires_grad_(True)
        y = model(leaf, explain=True, rule="gamma", gamma=0.25)
        y.backward(torch.linspace(-1.0, 1.0, y.numel()).view_as(y))
        kept = {key for m in model.modules() for prepared in getattr(m, "_lrp_cache", {}).values() for key in prepared}
        assert leaf.grad is not None
        return leaf.grad, kept

    kept_relevance, kept_keys = run()
    monkeypatch.setattr("smadlrp.lrp.ops.MADE_PER_CALL_ROWS", 12)  # 3 x 4 rows
    per_call_relevance, per_call_keys = run()
    modified = {"mixed": "w_abs_k", "nonnegative": "w_rho"}[sign]
    assert modified in kept_keys and modified not in per_call_keys
    torch.testing.assert_close(per_call_relevance, kept_relevance, rtol=1e-6, atol=1e-7)
