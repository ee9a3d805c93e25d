"""Layer operations and numeric kernels of the LRP layer rules: Conv2d/Linear maps, stabilised division, parts.

A layer rule computes relevance with forward passes of the layer with modified weights and vector-Jacobian
products (`LayerOp.vjp`) of the real layer operation, so any stride, padding, dilation and groups works. The
kernels here share those passes between rules: splitting inputs into parts, stacking them along the channels
when the layer allows it, and caching modified weights with a layer's prepared weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from smadlrp.lrp.signals import SignalSlot

# Weights a rule prepared for one layer: "weight" and "bias" (float32, the layer's own) plus the rule's own.
Prepared = dict[str, Tensor]


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
        if self.stride != (1, 1) and weight.shape[-2:] == (1, 1) and self.padding == (0, 0) and not batched(s):
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


def batched(t: Tensor) -> bool:
    """Whether `t` is a batched tensor of a vmap, as in a batched relevance pass (`torch.autograd.grad` with
    `is_grads_batched`, see `lrp.conditional`): kernels then avoid out= variants and in-place writes of batched
    values into the unbatched tensors the forward pass saved."""
    functorch = torch._C._functorch
    return bool(functorch.is_legacy_batchedtensor(t) or functorch.is_batchedtensor(t))


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
    if batched(numerator):
        return _divide_batched(numerator, denominator, epsilon, nonnegative, scale, out)
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


def _divide_batched(numerator: Tensor, denominator: Tensor, epsilon: float, nonnegative: bool, scale: float,
                    out: Tensor | None) -> Tensor:
    """`stabilized_divide` in a batched relevance pass: out of place (out= kernels have no batching rule, and the
    denominator may be a tensor the forward pass saved)."""
    if epsilon != 0.0:
        shift = epsilon if nonnegative else torch.copysign(denominator.new_tensor(epsilon), denominator)
        denominator = denominator + shift
    result = torch.div(numerator, denominator)
    if scale != 1.0:
        result = result * scale
    if epsilon == 0.0:
        result = result.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return result if out is None else out.copy_(result)


@dataclass
class LayerState:
    """What the forward pass leaves for one layer's relevance step.

    `a`: the layer input (padded, for padding modes other than zeros). `z`: the layer output when the rule
    asked for it; a following in-place ReLU may have overwritten it with relu(z), which equals z wherever
    relevance arrives (elsewhere the relevance is 0). `a_nonnegative`: known from the layers before (None: not
    known). `rectified`: the output goes straight into a ReLU, so no relevance arrives where z < 0. `slot`:
    where a rule whose relevance is `a * c` may leave c for the node that computed `a` (see `lrp.signals`).
    """

    a: Tensor
    z: Tensor | None = None
    a_nonnegative: bool | None = None
    rectified: bool = False
    slot: SignalSlot | None = None

    def input_nonnegative(self) -> bool:
        """Whether `a >= 0` everywhere (looked at once when not known)."""
        if self.a_nonnegative is None:
            self.a_nonnegative = not bool(self.a.numel() and self.a.min() < 0)
        return self.a_nonnegative


def z_rule(op: LayerOp, weight: Tensor, state: LayerState, r: Tensor, epsilon: float) -> Tensor:
    """`R_in = a * W^T (r / (z + eps sign z))`, the LRP-0 / LRP-epsilon redistribution."""
    assert state.z is not None
    c = op.vjp(state.a, weight, stabilized_divide(r, state.z, epsilon))
    return c.mul_(state.a) if state.slot is None else state.slot.offer(torch.mul(c, state.a), c)


def cached(w: Prepared, key: str, make: Callable[[], Tensor]) -> Tensor:
    """A modified weight computed on first need (e.g. only for a first layer that sees negative inputs), then
    kept with the layer's prepared weights."""
    if key not in w:
        w[key] = make()
    return w[key]


# From this many rows (batch x positions) of a layer's input on, a modified weight is made for each call rather
# than kept: making it is one pass over the weight, under 5 % of a product with that many rows, while keeping it
# costs a copy of the weights (330 MB for a ViT-B's MLPs).
MADE_PER_CALL_ROWS = 1024


def modified(w: Prepared, key: str, make: Callable[[], Tensor], op: LayerOp, a: Tensor) -> Tensor:
    """A modified weight for the input `a`: `cached` for inputs of few rows (a small batch, a dense head), made
    for this call only for inputs of `MADE_PER_CALL_ROWS` rows or more (transformer layers on a batch)."""
    if key in w or a.numel() // max(op.channels(a), 1) < MADE_PER_CALL_ROWS:
        return cached(w, key, make)
    return make()


def signed_parts(a: Tensor) -> list[Tensor]:
    """[a+, a-]: the positive and negative parts of `a`, each of `a`'s shape."""
    return [a.clamp(min=0), a.clamp(max=0)]


def forward_parts(op: LayerOp, xs: Sequence[Tensor], ws: Sequence[Tensor], bias: Tensor | None) -> Tensor:
    """`sum_k xs[k] W_k^T + b` for the parts `xs` of a layer input: one call on channel-stacked parts when the
    layer allows it."""
    if op.stackable:
        return op.forward(torch.cat(list(xs), op.channel_dim), torch.cat(list(ws), 1), bias)
    out = op.forward(xs[0], ws[0], bias)
    for x, weight in zip(xs[1:], ws[1:], strict=True):
        out.add_(op.forward(x, weight, None))
    return out


def share_parts(op: LayerOp, xs: Sequence[Tensor], ws: Sequence[Sequence[Tensor]], s: Tensor) -> Tensor:
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


def stacked_like(op: LayerOp, t: Tensor, blocks: int) -> Tensor:
    """An empty tensor like `t` with `blocks` times its channels, to stack signals in."""
    shape = list(t.shape)
    shape[op.channel_dim] *= blocks
    return t.new_empty(shape)


def share_by_weight(op: LayerOp, v: Tensor, a: Tensor, r: Tensor) -> Tensor:
    """`R_i = sum_j v_ij / sum_i v_ij R_j` for non-negative weights `v`, independent of the input values."""
    total = op.forward(a.new_ones((1, *a.shape[1:])), v, None)
    return op.vjp(a, v, stabilized_divide(r, total, 0.0))
