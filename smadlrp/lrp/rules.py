"""LRP rules: each rule is a small frozen dataclass with validated parameters, registered under one key.

A rule says how the relevance `r` (shape of the layer output `z`) that reaches a Conv2d or Linear layer is shared
back onto its input `a`. Every rule is computed with forward passes of the layer with modified weights and
vector-Jacobian products (`LayerOp.vjp`) of the real layer operation, so any stride, padding, dilation and
groups works. Modified weights depend only on the model: `Rule.prepare` computes them once per layer and the
engine caches them.

Adding a rule is one class and one line: subclass `Rule`, decorate it with `@register`.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from smadlrp.core.errors import UsageError

# Weights a rule prepared for one layer: "weight" and "bias" (float32, the layer's own) plus the rule's own.
Prepared = dict[str, Tensor]

# Denominator stabiliser of the rules without epsilon: 0 means a zero denominator gives 0 (its contributions are
# all zero too); a positive value s turns the denominator z into z + s sign(z) like epsilon does.
DEFAULT_STABILIZER = 0.0
FIT_PATTERNS_HINT = "run `smadlrp fit-patterns` and pass the fitted patterns"


class LayerOp(ABC):
    """The linear map of one Conv2d or Linear layer, applicable with any weights."""

    @abstractmethod
    def forward(self, a: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """`z = a W^T + b` for the given weights; `a` (B, ...) -> `z` (B, ...)."""

    @abstractmethod
    def vjp(self, a: Tensor, weight: Tensor, s: Tensor) -> Tensor:
        """`W^T s`: the vector-Jacobian product of `forward` w.r.t. its input `a` (shape of `a`)."""

    @abstractmethod
    def channels(self, a: Tensor) -> int:
        """Number of input channels (Conv2d) or features (Linear) of `a`."""

    @property
    @abstractmethod
    def channel_dim(self) -> int:
        """The dimension of inputs and outputs that holds channels (Conv2d) or features (Linear)."""

    @property
    @abstractmethod
    def stackable(self) -> bool:
        """Whether inputs (and outputs) stacked along `channel_dim` with weights concatenated to match form one
        layer of the same kind (not for grouped convolutions)."""

    @abstractmethod
    def per_channel(self, values: Tensor, a: Tensor) -> Tensor:
        """Reshape a (C,) vector of per-channel values so that it broadcasts over `a`."""


@dataclass(frozen=True)
class ConvOp(LayerOp):
    """A 2-d convolution with zero padding `padding` (other padding modes are applied to `a` beforehand)."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def forward(self, a: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(a, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def vjp(self, a: Tensor, weight: Tensor, s: Tensor) -> Tensor:
        if self.stride != (1, 1) and weight.shape[-2:] == (1, 1) and self.padding == (0, 0):
            # A strided 1x1 convolution reads only the inputs on its stride grid: W^T s lands there (a 1x1
            # transposed convolution, a matrix product) and is 0 elsewhere. The backward kernel does the same
            # work several times slower (ResNet's downsample branches).
            out = a.new_zeros(a.shape)
            out[..., :: self.stride[0], :: self.stride[1]] = F.conv_transpose2d(s, weight, groups=self.groups)
            return out
        # The real input (not an expanded placeholder, which the backward kernel would first copy in full).
        mask = (True, False, False)
        grads = torch.ops.aten.convolution_backward(
            s, a, weight, None, self.stride, self.padding, self.dilation, False, (0, 0), self.groups, mask
        )
        return grads[0]  # type: ignore[no-any-return]

    def channels(self, a: Tensor) -> int:
        return int(a.shape[1])

    @property
    def channel_dim(self) -> int:
        return 1

    @property
    def stackable(self) -> bool:
        return self.groups == 1

    def per_channel(self, values: Tensor, a: Tensor) -> Tensor:
        return values.view(1, -1, 1, 1)


@dataclass(frozen=True)
class DenseOp(LayerOp):
    """A fully connected layer acting on the last dimension."""

    def forward(self, a: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(a, weight, bias)

    def vjp(self, a: Tensor, weight: Tensor, s: Tensor) -> Tensor:
        return s @ weight

    def channels(self, a: Tensor) -> int:
        return int(a.shape[-1])

    @property
    def channel_dim(self) -> int:
        return -1

    @property
    def stackable(self) -> bool:
        return True

    def per_channel(self, values: Tensor, a: Tensor) -> Tensor:
        return values.view(*([1] * (a.dim() - 1)), -1)


def stabilized_divide(
    numerator: Tensor,
    denominator: Tensor,
    epsilon: float,
    *,
    nonnegative: bool = False,
    scale: float = 1.0,
    overwrite: bool = False,
    out: Tensor | None = None,
) -> Tensor:
    """`scale * numerator / (denominator + epsilon * sign(denominator))` with sign(0) = +1.

    With `epsilon == 0` a zero denominator gives 0 (its numerator is 0 wherever relevance can arrive).
    `nonnegative` promises `denominator >= 0` everywhere, which saves a pass over the data. `overwrite` lets
    the result take the denominator's memory (a temporary the caller no longer needs); `out` receives it.
    """
    fits = denominator.shape == numerator.shape
    reuse = overwrite and fits
    if epsilon != 0.0:  # the stabilised denominator is never zero, and is our own temporary
        if nonnegative:
            denominator = denominator.add_(epsilon) if reuse else torch.add(denominator, epsilon)
        else:
            shift = torch.copysign(denominator.new_tensor(epsilon), denominator)
            denominator = denominator.add_(shift) if reuse else shift.add_(denominator)
        overwrite = True
    if out is None and overwrite and fits:
        out = denominator
    if scale == 1.0:
        result = torch.div(numerator, denominator, out=out)
    else:  # addcdiv scales while it divides: one pass instead of two
        result = torch.addcdiv(numerator.new_zeros(()), numerator, denominator, value=scale, out=out)
    return result.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0) if epsilon == 0.0 else result


@dataclass
class LayerState:
    """What the forward pass leaves for one layer's relevance step.

    `a`: the layer input (padded, for padding modes other than zeros). `z`: the layer output when the rule
    asked for it; a following in-place ReLU may have overwritten it with relu(z), which equals z wherever
    relevance arrives (elsewhere the relevance is 0). `a_nonnegative`: known from the layers before (None: not
    known). `rectified`: the output goes straight into a ReLU, so no relevance arrives where z < 0.
    """

    a: Tensor
    z: Tensor | None = None
    a_nonnegative: bool | None = None
    rectified: bool = False

    def input_nonnegative(self) -> bool:
        """Whether `a >= 0` everywhere (looked at once when not known)."""
        if self.a_nonnegative is None:
            self.a_nonnegative = not bool(self.a.numel() and self.a.min() < 0)
        return self.a_nonnegative


def _number(rule: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, Tensor) and value.numel() == 1:
            return float(value.item())
        raise UsageError(f"rule {rule}: {name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise UsageError(f"rule {rule}: {name} must be finite, got {number}")
    return number


def _non_negative(rule: str, name: str, value: object) -> float:
    number = _number(rule, name, value)
    if number < 0:
        raise UsageError(f"rule {rule}: {name} must be >= 0, got {number:g}")
    return number


def _numbers(rule: str, name: str, value: object) -> tuple[float, ...] | None:
    """A scalar or a per-channel sequence/tensor as a tuple of floats (None stays None)."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        value = value.detach().flatten().tolist()
    elif hasattr(value, "tolist"):  # numpy arrays and scalars
        value = value.tolist()
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise UsageError(f"rule {rule}: {name} is empty")
    return tuple(_number(rule, name, item) for item in items)


@dataclass(frozen=True)
class Rule(ABC):
    """Base of every rule. Subclasses are frozen dataclasses: equal parameters mean an equal (cacheable) rule."""

    key: ClassVar[str]
    summary: ClassVar[str]
    # Input-layer rules: given alone as `rule=`, they apply to the first layer and LRP-0 to every other one.
    input_layer: ClassVar[bool] = False
    # Signal rules (PatternNet family) propagate a backward signal, not relevance; pools then use the gradient.
    signal: ClassVar[bool] = False
    # Rules that treat inputs of both signs differently from inputs >= 0 (the engine then finds out which).
    sign_sensitive: ClassVar[bool] = False
    # Rules whose relevance is `a_i` times something (none to a zero input): after them a ReLU passes relevance
    # unchanged, which equals its gradient. flat, wsquare and zbox give relevance to zero inputs too.
    zero_for_zero_input: ClassVar[bool] = True

    def needs_output(self, nonnegative_input: bool) -> bool:
        """Whether `relevance` reads the layer output `z` (kept from the forward pass)."""
        return False

    def prepare(self, name: str, weight: Tensor, bias: Tensor | None) -> Prepared:
        """Modified weights for layer `name` (float32 `weight`, `bias`); computed once per layer."""
        return {}

    def check(self, name: str, op: LayerOp, a: Tensor) -> None:
        """Refuse (UsageError) a layer input this rule cannot work with; every input is fine by default."""
        return None

    def check_layers(self, weights: Mapping[str, Tensor]) -> None:
        """Refuse (UsageError) a model whose explained layers (name -> weight) this rule cannot work with."""
        return None

    @abstractmethod
    def relevance(self, op: LayerOp, w: Prepared, state: LayerState, r: Tensor) -> Tensor:
        """Relevance (or signal) at the input, shape of `state.a`, from `r` at the output."""


RULES: dict[str, type[Rule]] = {}


def register(cls: type[Rule]) -> type[Rule]:
    """Class decorator: add a rule class to the registry under its `key`."""
    if cls.key in RULES:
        raise ValueError(f"rule key {cls.key!r} registered twice")
    RULES[cls.key] = cls
    return cls


def rule_names() -> tuple[str, ...]:
    """Every registered rule key, in registration order."""
    return tuple(RULES)


def rule_class(key: str) -> type[Rule]:
    """The rule class registered under `key`; UsageError listing the keys when unknown."""
    try:
        return RULES[key]
    except KeyError:
        raise UsageError(f"unknown rule {key!r}; rules: {', '.join(RULES)}") from None


def rule_parameters(key: str) -> dict[str, Any]:
    """Parameter names of rule `key` with their defaults."""
    return {f.name: f.default for f in dataclasses.fields(rule_class(key)) if f.init}


def make_rule(key: str, **params: Any) -> Rule:
    """Build rule `key` with `params` (validated); UsageError for an unknown key or parameter."""
    cls = rule_class(key)
    accepted = rule_parameters(key)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        have = ", ".join(accepted) or "none"
        raise UsageError(f"rule {key} has no parameter {', '.join(unknown)} (its parameters: {have})")
    return cls(**params)


def _z_rule(op: LayerOp, weight: Tensor, state: LayerState, r: Tensor, epsilon: float) -> Tensor:
    """`R_in = a * W^T (r / (z + eps sign z))`, the LRP-0 / LRP-epsilon redistribution."""
    assert state.z is not None
    s = stabilized_divide(r, state.z, epsilon)
    return op.vjp(state.a, weight, s).mul_(state.a)


def _cached(w: Prepared, key: str, make: Callable[[], Tensor]) -> Tensor:
    """A modified weight computed on first need (e.g. only for a first layer that sees negative inputs), then
    kept with the layer's prepared weights."""
    if key not in w:
        w[key] = make()
    return w[key]


def _signed_parts(a: Tensor) -> list[Tensor]:
    return [a.clamp(min=0), a.clamp(max=0)]


def _forward_parts(op: LayerOp, xs: Sequence[Tensor], ws: Sequence[Tensor], bias: Tensor | None) -> Tensor:
    """`sum_k xs[k] W_k^T + b` for the parts `xs` of a layer input: one call on channel-stacked parts when the
    layer allows it."""
    if op.stackable:
        return op.forward(torch.cat(list(xs), op.channel_dim), torch.cat(list(ws), 1), bias)
    out = op.forward(xs[0], ws[0], bias)
    for x, weight in zip(xs[1:], ws[1:], strict=True):
        out.add_(op.forward(x, weight, None))
    return out


def _share_parts(op: LayerOp, xs: Sequence[Tensor], ws: Sequence[Sequence[Tensor]], s: Tensor) -> Tensor:
    """`sum_k xs[k] * sum_m ws[m][k]^T s_m`: the relevance of the input parts `xs`, given the signals s_m of
    the output blocks m stacked along the channel dimension in `s`; one vjp over stacked parts when the layer
    allows it."""
    dim = op.channel_dim
    if op.stackable:
        rows = [torch.cat(list(row), 1) for row in ws]
        weight = rows[0] if len(rows) == 1 else torch.cat(rows)
        x = torch.cat(list(xs), dim)
        chunks: Sequence[Tensor] = op.vjp(x, weight, s).mul_(x).chunk(len(xs), dim)
        out = chunks[0].clone()
    else:
        signals = s.chunk(len(ws), dim)
        shares: list[Tensor] = []
        for k, x in enumerate(xs):
            products = [op.vjp(x, row[k], sm) for row, sm in zip(ws, signals, strict=True)]
            for product in products[1:]:
                products[0].add_(product)
            shares.append(products[0].mul_(x))
        chunks, out = shares, shares[0]
    for chunk in chunks[1:]:
        out.add_(chunk)
    return out


def _stacked_like(op: LayerOp, t: Tensor, blocks: int) -> Tensor:
    """An empty tensor like `t` with `blocks` times its channels, to stack signals in."""
    shape = list(t.shape)
    shape[op.channel_dim] *= blocks
    return t.new_empty(shape)


@register
@dataclass(frozen=True)
class Zero(Rule):
    """LRP-0: `R_i = sum_j a_i w_ij / z_j R_j`; equals gradient x input on ReLU networks."""

    key = "zero"
    summary = "LRP-0: R_i = sum_j a_i w_ij / z_j R_j (gradient x input on ReLU networks)"

    def needs_output(self, nonnegative_input: bool) -> bool:
        return True

    def relevance(self, op: LayerOp, w: Prepared, state: LayerState, r: Tensor) -> Tensor:
        return _z_rule(op, w["weight"], state, r, 0.0)


@register
@dataclass(frozen=True)
class Epsilon(Rule):
    """LRP-epsilon: the LRP-0 denominator becomes `z_j + epsilon * sign(z_j)` (sign(0) = +1)."""

    key = "epsilon"
    summary = "LRP-epsilon: denominator z_j + epsilon sign(z_j), sign(0) = +1; absorbs weak or contradictory relevance"
    epsilon: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", _non_negative(self.key, "epsilon", self.epsilon))

    def needs_output(self, nonnegative_input: bool) -> bool:
        return True

    def relevance(self, op: LayerOp, w: Prepared, state: LayerState, r: Tensor) -> Tensor:
        return _z_rule(op, w["weight"], state, r, self.epsilon)


@register
@dataclass(frozen=True)
class Gamma(Rule):
    """LRP-gamma: the contributions of the output's sign count (1 + gamma) times.

    At an output with `z_j >= 0`, `rho(z_ij) = z_ij + gamma max(0, z_ij)` and `rho(b) = b + gamma max(0, b)`
    (with `a >= 0`: `rho(w) = w + gamma w+`); at an output with `z_j < 0` the negative contributions are
    amplified instead, `rho(z_ij) = z_ij + gamma min(0, z_ij)`. The denominator `sum_i rho(z_ij)` then has the
    sign of `z_j` and at least its size, so it never comes near zero where `z_j` does not. For inputs of both
    signs, `(a w)+ = a+ w+ + a- w- = (a w + |a| |w|) / 2`, as in alpha-beta.
    """

    key = "gamma"
    summary = "LRP-gamma: contributions of the output's sign count (1 + gamma) times (w + gamma w+ where z >= 0)"
    sign_sensitive = True
    gamma: float = 0.1
    stabilizer: float = DEFAULT_STABILIZER

    def __post_init__(self) -> None:
        object.__setattr__(self, "gamma", _non_negative(self.key, "gamma", self.gamma))
        object.__setattr__(self, "stabilizer", _non_negative(self.key, "stabilizer", self.stabilizer))

    def _denominator_epsilon(self) -> float:
        return self.stabilizer

    def needs_output(self, nonnegative_input: bool) -> bool:
        return True

    def prepare(self, name: str, weight: Tensor, bias: Tensor | None) -> Prepared:
        prepared = {"w_pos": weight.clamp(min=0).mul_(self.gamma).add_(weight)}
        if bias is not None:
            prepared["b"] = bias.clamp(min=0).mul_(self.gamma).add_(bias)
        return prepared

    def relevance(self, op: LayerOp, w: Prepared, state: LayerState, r: Tensor) -> Tensor:
        a, z, eps, gamma = state.a, state.z, self._denominator_epsilon(), self.gamma
        assert z is not None
        nonnegative = state.input_nonnegative()
        if nonnegative:  # the denominator z + gamma z+ with z+ = a W+ + b+
            d_pos = op.forward(a, w["w_pos"], w.get("b"))
        else:  # (a w)+ = (a w + |a| |w|) / 2, so z+ = (z + |a| |W| + |b|) / 2: one product, a is not split
            a_abs = a.abs()
            if state.rectified and op.stackable:  # (the first layer): one product of twice the width each way
                return self._share_stacked(op, w, a, a_abs, r)
            w_abs = _cached(w, "w_abs", lambda: w["weight"].abs())
            b_abs = _cached(w, "b_abs", lambda: w["bias"].abs()) if "bias" in w else None
            d_pos = op.forward(a_abs, w_abs, b_abs).mul_(gamma / 2).add_(z, alpha=1.0 + gamma / 2)
        if state.rectified:  # after a ReLU no relevance arrives where z < 0
            t = stabilized_divide(r, d_pos, eps, overwrite=True)
            if nonnegative:
                return op.vjp(a, w["w_pos"], t).mul_(a)
            return self._share_signed(op, w, a, a_abs, t, t)  # grouped: no stacking
        # Where z < 0 the denominator is z + gamma z- = (2 + gamma) z - d_pos (z- = z - z+). With its magnitude
        # q = d_pos - (2 + gamma) min(z, 0), t = R / q and t- = t sign(min(z, 0)) (-t where z < 0, 0 elsewhere),
        # the relevance is a (rho^T t + (2 + gamma) W^T t-), rho = W + gamma W+, for inputs >= 0. Arithmetic on
        # the sign instead of a mask: a masked select is several times slower.
        low = z.clamp(max=0)
        t = stabilized_divide(r, d_pos.sub_(low, alpha=2.0 + gamma), eps, nonnegative=True, overwrite=True)
        t_neg = low.sign_().mul_(t)
        del low
        if nonnegative:  # two products: stacking them is no faster, and slower on some shapes
            return op.vjp(a, w["w_pos"], t).add_(op.vjp(a, w["weight"], t_neg), alpha=2.0 + gamma).mul_(a)
        return self._share_signed(op, w, a, a_abs, t_neg.mul_(2.0).add_(t), t)

    def _share_stacked(self, op: LayerOp, w: Prepared, a: Tensor, a_abs: Tensor, r: Tensor) -> Tensor:
        """`_share_signed` before a ReLU (s = t) with [a, |a|] stacked against [(1 + gamma/2) W, gamma/2 |W|]:
        the denominator (the rho bias included) in one convolution and the relevance in one vjp, of twice the
        width; on a layer with three input channels that costs about what one of the plain width costs."""
        g = self.gamma / 2
        both = _cached(w, "w_signed", lambda: torch.cat([w["weight"] * (1.0 + g), w["weight"].abs() * g], 1))
        x = torch.cat([a, a_abs], op.channel_dim)
        t = stabilized_divide(r, op.forward(x, both, w.get("b")), self._denominator_epsilon(), overwrite=True)
        first, second = op.vjp(x, both, t).mul_(x).chunk(2, op.channel_dim)
        return torch.add(first, second)

    def _share_signed(self, op: LayerOp, w: Prepared, a: Tensor, a_abs: Tensor, s: Tensor, t: Tensor) -> Tensor:
        """Inputs of both signs: rho(a w) = a w + gamma (a w)+- = (1 + gamma/2) a w +- gamma/2 |a| |w| (+ at
        outputs z >= 0, - elsewhere), so R = (1 + gamma/2) a W^T s + gamma/2 |a| |W|^T t with the signed signal
        s = R / denominator = t + 2 t- and its magnitude t = R / |denominator|."""
        out = op.vjp(a, w["weight"], s).mul_(a).mul_(1.0 + self.gamma / 2)
        return out.add_(op.vjp(a, w["w_abs"], t).mul_(a_abs), alpha=self.gamma / 2)


@register
@dataclass(frozen=True)
class GammaEpsilon(Gamma):
    """LRP-gamma weights with the LRP-epsilon denominator `z_j + epsilon * sign(z_j)`."""

    key = "gamma+epsilon"
    summary = "LRP-gamma weights with the LRP-epsilon denominator z_j + epsilon sign(z_j)"
    gamma: float = 0.1
    epsilon: float = 0.1
    stabilizer: float = dataclasses.field(default=DEFAULT_STABILIZER, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "epsilon", _non_negative(self.key, "epsilon", self.epsilon))

    def _denominator_epsilon(self) -> float:
        return self.epsilon


@register
@dataclass(frozen=True)
class AlphaBeta(Rule):
    """LRP-alpha-beta: positive and negative contributions (biases included) shared separately.

    `R_i = sum_j (alpha (a_i w_ij)+ / z+_j - beta (a_i w_ij)- / z-_j) R_j` with
    `z+_j = sum_i (a_i w_ij)+ + b+_j`, `z-_j = sum_i (a_i w_ij)- + b-_j` and alpha - beta = 1.
    """

    key = "alpha1beta0"
    summary = "LRP-alpha-beta: alpha (a w)+ / z+ - beta (a w)- / z-, biases included, alpha - beta = 1"
    sign_sensitive = True
    alpha: float = 1.0
    beta: float = 0.0
    stabilizer: float = DEFAULT_STABILIZER

    def __post_init__(self) -> None:
        alpha = _non_negative(self.key, "alpha", self.alpha)
        beta = _non_negative(self.key, "beta", self.beta)
        if abs(alpha - beta - 1.0) > 1e-9:
            raise UsageError(f"rule {self.key}: alpha - beta must be 1, got alpha={alpha:g}, beta={beta:g}")
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "beta", beta)
        object.__setattr__(self, "stabilizer", _non_negative(self.key, "stabilizer", self.stabilizer))

    def needs_output(self, nonnegative_input: bool) -> bool:
        return True

    def prepare(self, name: str, weight: Tensor, bias: Tensor | None) -> Prepared:
        prepared = {"w_pos": weight.clamp(min=0)}
        if bias is not None:
            prepared["b_pos"] = bias.clamp(min=0)
        return prepared

    def relevance(self, op: LayerOp, w: Prepared, state: LayerState, r: Tensor) -> Tensor:
        a, w_pos, eps = state.a, w["w_pos"], self.stabilizer
        assert state.z is not None
        if not state.input_nonnegative():
            return self._relevance_signed(op, w, state, r)
        # a >= 0: (a w)+ = a w+, (a w)- = a w-, and z+ = a W+ + b+ >= 0
        z_pos = op.forward(a, w_pos, w.get("b_pos"))
        if self.beta == 0.0:
            dead = _dead_signal(r, z_pos, state.z)
            s = stabilized_divide(r, z_pos, eps, nonnegative=True, scale=self.alpha, overwrite=True)
            c = op.vjp(a, w_pos, s)
            if dead is not None:
                c.add_(op.vjp(a, w["weight"], dead))
            return c.mul_(a)
        t_pos, t_neg = self._signals(r, z_pos, state.z)
        # W-^T t- = W^T t- - W+^T t-: W- is never stored
        c = op.vjp(a, w_pos, t_pos.sub_(t_neg))
        del t_pos  # released before the second product
        return c.add_(op.vjp(a, w["weight"], t_neg)).mul_(a)

    def _signals(self, r: Tensor, z_pos: Tensor, z: Tensor, out: Sequence[Tensor] = ()) -> tuple[Tensor, Tensor]:
        """(t+, t-) with R_i = sum_j (a w)+_ij t+_j + (a w)-_ij t-_j: `alpha R / z+` and `beta R / -z-`, except
        where one side has no contributions: there the other side takes all of R (`R / z+`, or `R / z-` through
        t-), so relevance is conserved at every output. `z_pos` is overwritten; `out`: tensors for (t+, t-)."""
        eps = self.stabilizer
        t_pos, t_neg = out if out else (None, None)
        z_neg = torch.sub(z_pos, z)  # -z- >= 0, also where an in-place ReLU has turned z into relu(z)
        # z- = 0 up to rounding (z- is taken as z+ - z): z_neg <= rtol z+, tested without a temporary
        no_neg = z_neg.sub_(z_pos, alpha=_NO_CONTRIBUTION_RTOL) <= 0
        z_neg.add_(z_pos, alpha=_NO_CONTRIBUTION_RTOL)
        no_pos = z_pos == 0  # z+ is a sum of exact zeros there
        t_pos = stabilized_divide(r, z_pos, eps, nonnegative=True, scale=self.alpha, overwrite=True, out=t_pos)
        # -beta (a w)- / z- = beta (a w)- / (z+ - z): a non-negative denominator
        t_neg = stabilized_divide(r, z_neg, eps, nonnegative=True, scale=self.beta, overwrite=True, out=t_neg)
        if bool(no_neg.any()):  # all of R to the positive side
            t_pos[no_neg] /= self.alpha
            t_neg.masked_fill_(no_neg, 0.0)
        if bool(no_pos.any()):  # all of R to the negative side, R / z- with z- = z there
            t_neg[no_pos] = stabilized_divide(r[no_pos], z[no_pos], eps)
        return t_pos, t_neg

    def _relevance_signed(self, op: LayerOp, w: Prepared, state: LayerState, r: Tensor) -> Tensor:
        """Inputs of both signs: (a w)+ = a+ w+ + a- w-, (a w)- = a+ w- + a- w+, with [a+, a-] stacked along the
        channels before a ReLU (the first layer: few channels, where one product of twice the width costs no
        more than one of the plain width)."""
        if not state.rectified:
            return self._relevance_magnitudes(op, w, state, r)
        w_pos, eps = w["w_pos"], self.stabilizer
        assert state.z is not None
        w_neg = _cached(w, "w_neg", lambda: w["weight"].clamp(max=0))
        parts = _signed_parts(state.a)
        z_pos = _forward_parts(op, parts, [w_pos, w_neg], w.get("b_pos"))  # exactly 0 without positive parts
        if self.beta == 0.0:
            dead = _dead_signal(r, z_pos, state.z)
            s = stabilized_divide(r, z_pos, eps, nonnegative=True, scale=self.alpha, overwrite=True)
            out = _share_parts(op, parts, [[w_pos, w_neg]], s)
            if dead is not None:
                out.add_(op.vjp(state.a, w["weight"], dead).mul_(state.a))
            return out
        t = _stacked_like(op, r, 2)  # [t+, t-], written in place
        self._signals(r, z_pos, state.z, out=t.chunk(2, op.channel_dim))
        del z_pos
        return _share_parts(op, parts, [[w_pos, w_neg], [w_neg, w_pos]], t)


    def _relevance_magnitudes(self, op: LayerOp, w: Prepared, state: LayerState, r: Tensor) -> Tensor:
        """Inputs of both signs, not before a ReLU (every layer after a SiLU or Hardswish): (a w)+- = (a w +-
        |a| |w|) / 2, so 2 z+ = u + z and -2 z- = u - z with u = |a| |W| + |b| (one convolution), and
        R = 1/2 a W^T (t+ + t-) + 1/2 |a| |W|^T (t+ - t-) (two vjps) for the signals of `_signals`. z+ and z-
        come out of a difference here, so an output counts as having no contributions of one sign when they are
        below _NO_CONTRIBUTION_RTOL of the other sign's."""
        a, z, eps = state.a, state.z, 2.0 * self.stabilizer  # (denominators are doubled below)
        assert z is not None
        w_abs = _cached(w, "w_abs", lambda: w["weight"].abs())
        b_abs = _cached(w, "b_abs", lambda: w["bias"].abs()) if "bias" in w else None
        a_abs = a.abs()
        u = op.forward(a_abs, w_abs, b_abs)
        twice_pos = torch.add(u, z)
        twice_neg = u.sub_(z)
        no_pos = twice_pos <= twice_neg * _NO_CONTRIBUTION_RTOL
        no_neg = twice_neg <= twice_pos * _NO_CONTRIBUTION_RTOL if self.beta != 0.0 else None
        t_pos = stabilized_divide(r, twice_pos, eps, nonnegative=True, scale=2.0 * self.alpha, overwrite=True)
        t_neg: Tensor | None = None
        if no_neg is not None:
            t_neg = stabilized_divide(r, twice_neg, eps, nonnegative=True, scale=2.0 * self.beta, overwrite=True)
            if bool(no_neg.any()):  # all of R to the positive side
                t_pos[no_neg] /= self.alpha
                t_neg.masked_fill_(no_neg, 0.0)
        if bool(no_pos.any()):  # all of R to the negative side: R / z- with z- = z there
            t_pos.masked_fill_(no_pos, 0.0)
            t_neg = torch.zeros_like(t_pos) if t_neg is None else t_neg
            t_neg[no_pos] = stabilized_divide(r[no_pos], z[no_pos], self.stabilizer)
        if t_neg is None:  # alpha1beta0 and every output with positive contributions: (a w)+ only
            return op.vjp(a, w["weight"], t_pos).mul_(a).add_(op.vjp(a, w_abs, t_pos).mul_(a_abs)).mul_(0.5)
        total = torch.add(t_pos, t_neg)
        out = op.vjp(a, w["weight"], total).mul_(a)
        del total
        return out.add_(op.vjp(a, w_abs, t_pos.sub_(t_neg)).mul_(a_abs)).mul_(0.5)


# alpha-beta: an output whose negative contributions are below this share of its positive ones has none.
_NO_CONTRIBUTION_RTOL = 1e-5


def _dead_signal(r: Tensor, z_pos: Tensor, z: Tensor) -> Tensor | None:
    """For alpha1beta0: `R / z` at the outputs without positive contributions (z+ = 0, so every contribution
    is negative and z = z-), 0 elsewhere; None when there are none. There the negative contributions take
    the relevance, which is otherwise lost."""
    dead = z_pos == 0
    if not bool(dead.any()):
        return None
    return stabilized_divide(r, z, 0.0).mul_(dead)


@register
@dataclass(frozen=True)
class Alpha2Beta1(AlphaBeta):
    """LRP-alpha-beta with alpha = 2, beta = 1 by default."""

    key = "alpha2beta1"
    summary = "LRP-alpha-beta with alpha = 2, beta = 1"
    alpha: float = 2.0
    beta: float = 1.0


@register
@dataclass(frozen=True)
class ZBox(Rule):
    """z^B for inputs bounded per channel by `low <= a <= high`.

    `R_i = sum_j (a_i w_ij - l_i w+_ij - h_i w-_ij) / sum_i (...) R_j` (bias excluded). Bounds are given as
    `low`/`high` (scalar or per channel) or derived from the normalisation `mean`/`std`: the pixel range [0, 1]
    maps to `low = (0 - mean) / std`, `high = (1 - mean) / std`.
    """

    key = "zbox"
    summary = "z^B (input layer): (a w - l w+ - h w-) / sum(...), bounds low/high or from normalisation mean/std"
    input_layer = True
    zero_for_zero_input = False
    low: float | tuple[float, ...] | None = None
    high: float | tuple[float, ...] | None = None
    mean: float | tuple[float, ...] | None = None
    std: float | tuple[float, ...] | None = None
    stabilizer: float = DEFAULT_STABILIZER

    def __post_init__(self) -> None:
        for name in ("low", "high", "mean", "std"):
            object.__setattr__(self, name, _numbers(self.key, name, getattr(self, name)))
        object.__setattr__(self, "stabilizer", _non_negative(self.key, "stabilizer", self.stabilizer))
        low, high = self.bounds()
        if len(low) != len(high) and 1 not in (len(low), len(high)):
            raise UsageError(f"rule zbox: low has {len(low)} channels but high has {len(high)}")
        if any(lo > hi for lo, hi in zip(_broadcast(low, len(high)), _broadcast(high, len(low)), strict=True)):
            raise UsageError(f"rule zbox: low must be <= high in every channel, got low={low}, high={high}")

    def bounds(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(low, high) per channel, from low/high or from mean/std."""
        given = {name for name in ("low", "high", "mean", "std") if getattr(self, name) is not None}
        if given == {"low", "high"}:
            assert isinstance(self.low, tuple) and isinstance(self.high, tuple)
            return self.low, self.high
        if given == {"mean", "std"}:
            assert isinstance(self.mean, tuple) and isinstance(self.std, tuple)
            if len(self.mean) != len(self.std) and 1 not in (len(self.mean), len(self.std)):
                raise UsageError(f"rule zbox: mean has {len(self.mean)} channels but std has {len(self.std)}")
            if any(s <= 0 for s in self.std):
                raise UsageError(f"rule zbox: std must be > 0, got {self.std}")
            n = max(len(self.mean), len(self.std))
            pairs = list(zip(_broadcast(self.mean, n), _broadcast(self.std, n), strict=True))
            return tuple(-m / s for m, s in pairs), tuple((1.0 - m) / s for m, s in pairs)
        raise UsageError(
            "rule zbox needs input bounds: pass either low and high (scalar or per channel) or the "
            f"normalisation mean and std (got {', '.join(sorted(given)) or 'none of them'})"
        )

    def check(self, name: str, op: LayerOp, a: Tensor) -> None:
        low, high = self.bounds()
        n, channels = max(len(low), len(high)), op.channels(a)
        if n not in (1, channels):
            raise UsageError(f"rule zbox: bounds have {n} channels but layer {name!r} has {channels} input channels")

    def needs_output(self, nonnegative_input: bool) -> bool:
        return True

    def prepare(self, name: str, weight: Tensor, bias: Tensor | None) -> Prepared:
        return {"w_abs": weight.abs()}

    def relevance(self, op: LayerOp, w: Prepared, state: LayerState, r: Tensor) -> Tensor:
        # With w+ = (w + |w|) / 2 and w- = (w - |w|) / 2: l w+ + h w- = m w + d |w| for the box's middle
        # m = (l + h) / 2 and half-width d = (l - h) / 2, so z^B = (z - b) - (m W + d |W|) and
        # R = (a - m) W^T s - d |W|^T s with s = r / z^B.
        a, (low, high) = state.a, self.bounds()
        assert state.z is not None
        one = (1, *a.shape[1:])  # the bounds are the same for every sample: compute on one and broadcast
        lo, hi = a.new_tensor(low), a.new_tensor(high)
        mid = op.per_channel((lo + hi) / 2, a).expand(one)
        half = op.per_channel((lo - hi) / 2, a).expand(one)
        shift = op.forward(mid, w["weight"], w.get("bias")).add_(op.forward(half, w["w_abs"], None))
        s = stabilized_divide(r, torch.sub(state.z, shift), self.stabilizer, overwrite=True)
        return _share_parts(op, [a - mid, half.neg().expand(a.shape)], [[w["weight"], w["w_abs"]]], s)


def _broadcast(values: tuple[float, ...], n: int) -> tuple[float, ...]:
    return values * n if len(values) == 1 else values


@register
@dataclass(frozen=True)
class Flat(Rule):
    """Flat: `R_i = sum_j 1 / n_j R_j`, `n_j` the number of inputs connected to output j; ignores `a`."""

    key = "flat"
    summary = "flat (input layer): R_i = sum_j R_j / n_j, n_j = number of inputs connected to j"
    input_layer = True
    zero_for_zero_input = False

    def prepare(self, name: str, weight: Tensor, bias: Tensor | None) -> Prepared:
        return {"w_flat": torch.ones_like(weight)}

    def relevance(self, op: LayerOp, w: Prepared, state: LayerState, r: Tensor) -> Tensor:
        return _share_by_weight(op, w["w_flat"], state.a, r)


@register
@dataclass(frozen=True)
class WSquare(Rule):
    """w^2: `R_i = sum_j w_ij^2 / sum_i w_ij^2 R_j`; ignores `a`."""

    key = "wsquare"
    summary = "w^2 (input layer): R_i = sum_j w_ij^2 / sum_i w_ij^2 R_j"
    input_layer = True
    zero_for_zero_input = False

    def prepare(self, name: str, weight: Tensor, bias: Tensor | None) -> Prepared:
        return {"w_sq": weight.square()}

    def relevance(self, op: LayerOp, w: Prepared, state: LayerState, r: Tensor) -> Tensor:
        return _share_by_weight(op, w["w_sq"], state.a, r)


def _share_by_weight(op: LayerOp, v: Tensor, a: Tensor, r: Tensor) -> Tensor:
    """`R_i = sum_j v_ij / sum_i v_ij R_j` for non-negative weights `v`, independent of the input values."""
    total = op.forward(a.new_ones((1, *a.shape[1:])), v, None)
    return op.vjp(a, v, stabilized_divide(r, total, 0.0))


@dataclass(frozen=True, eq=False)
class _PatternRule(Rule):
    """Shared parts of PatternNet/PatternAttribution: one pattern per layer, of the layer's weight shape.

    Equality (the engine's cache key) is the identity of the `patterns` mapping: treat it as read-only.
    """

    signal = True
    patterns: Mapping[str, Tensor] | None = None

    def __post_init__(self) -> None:
        if self.patterns is None:
            raise UsageError(f"rule {self.key} needs fitted patterns: {FIT_PATTERNS_HINT} (patterns=...)")
        if not isinstance(self.patterns, Mapping):
            raise UsageError(f"rule {self.key}: patterns must map layer names to tensors")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.patterns is self.patterns  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), id(self.patterns)))

    def check_layers(self, weights: Mapping[str, Tensor]) -> None:
        assert self.patterns is not None
        missing = [name for name in weights if name not in self.patterns]
        if missing:
            raise UsageError(f"rule {self.key}: no pattern for layer(s) {', '.join(missing)}; {FIT_PATTERNS_HINT}")
        for name, weight in weights.items():
            shape = tuple(self.patterns[name].shape)
            if shape != tuple(weight.shape):
                raise UsageError(
                    f"rule {self.key}: the pattern for {name!r} has shape {shape}, the layer's weight "
                    f"{tuple(weight.shape)}; {FIT_PATTERNS_HINT} for this model"
                )

    def pattern(self, name: str, weight: Tensor) -> Tensor:
        """The pattern of layer `name` as float32 on the weight's device."""
        self.check_layers({name: weight})
        assert self.patterns is not None
        return self.patterns[name].detach().to(device=weight.device, dtype=torch.float32)


@register
@dataclass(frozen=True, eq=False)
class PatternNet(_PatternRule):
    """PatternNet: the backward signal with each weight W replaced by its pattern A; no multiplication by `a`."""

    key = "patternnet"
    summary = "PatternNet signal: backward pass with W replaced by the fitted pattern A (needs patterns=...)"

    def prepare(self, name: str, weight: Tensor, bias: Tensor | None) -> Prepared:
        return {"pattern": self.pattern(name, weight)}

    def relevance(self, op: LayerOp, w: Prepared, state: LayerState, r: Tensor) -> Tensor:
        return op.vjp(state.a, w["pattern"], r)


@register
@dataclass(frozen=True, eq=False)
class PatternAttribution(_PatternRule):
    """PatternAttribution: the backward signal with each weight W replaced by `A * W` (element-wise)."""

    key = "patternattribution"
    summary = "PatternAttribution: backward pass with W replaced by A * W (element-wise; needs patterns=...)"

    def prepare(self, name: str, weight: Tensor, bias: Tensor | None) -> Prepared:
        return {"pattern_w": self.pattern(name, weight) * weight}

    def relevance(self, op: LayerOp, w: Prepared, state: LayerState, r: Tensor) -> Tensor:
        return op.vjp(state.a, w["pattern_w"], r)
