"""The rules of the graph's relevance-carrying nodes other than Conv2d/Linear, as autograd functions.

Each forward computes the node's ordinary output; each backward maps the relevance `R` at the output to the
relevance at the inputs (not the gradient):

- `SumFunction`, `y = a + b` (a constant term takes part and absorbs its share): `R_a = a / y * R`, or with
  the absolute split `R_a = |a| / (|a| + |b|) * R`;
- `AffineFunction`, `y = s x + t` element-wise: `R_x = s x / y * R = (y - t) / y * R`;
- `PoolFunction`, a linear pool `y = P x`: `R_x = x * P^T (R / y)`;
- `PassFunction`, `y = f(x)` element-wise (ReLU, ReLU6, SiLU, ..., scaling by a constant): `R_x = R`;
- `GateFunction`, `y = x * g` with a gate g (a constant of the forward pass): `R_x = R`, nothing to g;
- `NormFunction`, a normalisation `y = C(x) / sigma * w + b` (LayerNorm, GroupNorm, RMSNorm, ...), with sigma a
  constant of the forward pass: `R_x = x * J^T (R / y)`, J the Jacobian of `x -> C(x) / sigma * w` (the
  centring C is a linear map under the z-rule, the scale passes relevance unchanged, b absorbs its share);
- `SoftmaxFunction`, `s = softmax(x)`: `R_x = x * (R - s * sum(R))` (AttnLRP, Deep Taylor with bias);
- `ProductFunction`, `z = f(u, v)` bilinear (`u * v`, `u @ v`, einsum): `R_u = 1/2 u * J_u^T (R / z)` and the
  same for v (the uniform rule); all of it to the one operand that carries relevance when the other is a
  constant of the pass (CP-LRP's attention probabilities).

Denominators are not stabilised: where `y = 0` the relevance is 0, which loses nothing, because the relevance
arriving at a tensor is `y * c` for every rule of the engine (it is 0 where y is). Outputs are saved for the
backward pass through an alias (see `alias`): a following in-place ReLU may turn y into relu(y), which equals
y wherever relevance can arrive.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from smadlrp.core.device import without_autocast
from smadlrp.lrp.ops import stabilized_divide
from smadlrp.lrp.signals import SignalSlot, open_slot, slot_of, taken


def alias(t: Tensor) -> Tensor:
    """A tensor on `t`'s memory with a version counter of its own, to save an output for the backward pass.

    A following in-place ReLU may overwrite the output with relu(z), which equals z wherever relevance arrives
    (elsewhere the incoming relevance is 0); saved through this alias, autograd keeps the memory exactly as long
    as the graph needs it instead of refusing the in-place change.
    """
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def mark_recomputable(y: Tensor, source: Tensor, f: Callable[[Tensor], Tensor]) -> Tensor:
    """Mark `y = f(source)` so that a rule which needs `y` in its backward pass may keep `source` (which another
    rule keeps anyway: a softmax its logits, a layer its output before an activation) and compute y again
    (`recomputable`), instead of keeping a second tensor of the same size."""
    y._lrp_source = (source, f)  # type: ignore[attr-defined]
    return y


class Recomputed:
    """`f` for a node's output that the rules reading it compute again in the backward pass: computed once, then
    remembered until the node's own rule takes it (`take`) or lets it go (`drop`). Attention probabilities
    computed again by their product's rule go on to the softmax's rule; a norm's output computed again by the
    layers reading it (q, k and v) is computed once for all of them, and for the norm's rule."""

    def __init__(self, f: Callable[[Tensor], Tensor]) -> None:
        self.f = f
        self.last: Tensor | None = None

    def __call__(self, source: Tensor) -> Tensor:
        if self.last is None:
            self.last = self.f(source)
        return self.last

    def take(self, source: Tensor) -> Tensor:
        """The result (forgotten now): remembered, or computed."""
        last, self.last = self.last, None
        return self.f(source) if last is None else last

    def drop(self) -> None:
        """Forget the result."""
        self.last = None


def recomputable(t: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor] | None]:
    """What to keep for `t` in a backward pass, and how to compute `t` from it (None: `t` is kept itself)."""
    marked = getattr(t, "_lrp_source", None)
    return (t, None) if marked is None else (marked[0].detach(), marked[1])


def _vjp(
    f: Callable[..., Tensor], inputs: tuple[Tensor, ...], wanted: tuple[bool, ...],
    vector: Callable[[Tensor], Tensor],
) -> list[Tensor | None]:
    """The vector-Jacobian products `J_k^T v` of `f` at `inputs`, for the inputs marked `wanted`, with
    `v = vector(f(inputs))` (so that a rule dividing by the output need not keep it from the forward pass)."""
    with torch.enable_grad():  # (the callers' backward passes run with autocast off)
        leaves = tuple(t.detach().requires_grad_(w) for t, w in zip(inputs, wanted, strict=True))
        out = f(*leaves)
        grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], vector(out.detach()))
    it = iter(grads)
    return [next(it) if w else None for w in wanted]


def _autocast_off(backward: Callable[[Any, Tensor], tuple[Tensor | None, ...]]) -> Callable[..., Any]:
    """A rule's backward pass with autocast off, so that the products and outputs it computes again are in the
    relevance dtype even when the caller runs the pass under autocast."""

    @functools.wraps(backward)
    def run(ctx: Any, r: Tensor) -> tuple[Tensor | None, ...]:
        with without_autocast(r.device.type):
            return backward(ctx, r)

    return run


class SumFunction(torch.autograd.Function):
    """`y = a + b` with the z-rule, `R_a = a / y R` and `R_b = b / y R`, or with `absolute` the absolute split
    `R_a = |a| / (|a| + |b|) R` (Otsuki et al., ECCV 2024), which hands each term a share of R's sign;
    summed back over broadcast dims.

    With a constant b (a bias, an attention mask) the z-rule keeps b and y, and `a = y - b`; otherwise a, b and y
    (`R_b = R - R_a` would save keeping b, but loses b's share where it is small next to a's).
    """

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor, absolute: bool = False) -> Tensor:  # type: ignore[override]
        y = a + b
        ctx.absolute, ctx.shapes = absolute, (a.shape, b.shape)
        if absolute:
            ctx.save_for_backward(a, b)
            return y
        ctx.constant_b = not ctx.needs_input_grad[1]
        kept = (b,) if ctx.constant_b else (a, b)
        ctx.save_for_backward(*kept, alias(y))
        open_slot(ctx, y)
        ctx.slots = tuple(slot_of(t) if t.shape == y.shape else None for t in (a, b))  # R_t = t s: s goes on
        return y

    @staticmethod
    def backward(ctx: Any, r: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (a_shape, b_shape), (need_a, need_b, _) = ctx.shapes, ctx.needs_input_grad
        if ctx.absolute:
            a, b = (t.abs() for t in ctx.saved_tensors)
            s = stabilized_divide(r, a + b, 0.0, nonnegative=True, overwrite=True)
            r_a = (a * s).sum_to_size(a_shape) if need_a else None
            return r_a, s.mul_(b).sum_to_size(b_shape) if need_b else None, None
        *kept, y = ctx.saved_tensors
        slot_a, slot_b = ctx.slots
        signal = taken(ctx.output_slot, r)
        ours = signal is None and slot_a is None and slot_b is None  # s is a temporary that R_b may take
        s = stabilized_divide(r, y, 0.0) if signal is None else signal
        if ctx.constant_b:  # a = y - b, a temporary
            return _offered(slot_a, (y - kept[0]).mul_(s), s).sum_to_size(a_shape), None, None
        a, b = kept
        r_a = _offered(slot_a, a * s, s).sum_to_size(a_shape) if need_a else None
        r_b = (s.mul_(b) if ours else _offered(slot_b, b * s, s)).sum_to_size(b_shape) if need_b else None
        return r_a, r_b, None


def _output_signal(slot: SignalSlot | None, r: Tensor, y: Tensor) -> Tensor:
    """`R / y` (0 where y is), read-only: the signal the next node's rule left in `slot`, or the division."""
    c = taken(slot, r)
    return stabilized_divide(r, y, 0.0) if c is None else c


def _offered(slot: SignalSlot | None, relevance: Tensor, signal: Tensor) -> Tensor:
    """`relevance`, left in `slot` with its `signal` when there is a slot."""
    return relevance if slot is None else slot.offer(relevance, signal)


class AffineFunction(torch.autograd.Function):
    """`y = scale * x + shift` element-wise (scale, shift broadcast over x) with the z-rule
    `R_x = scale x / y * R`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:  # type: ignore[override]
        y = torch.addcmul(shift, x, scale)
        ctx.save_for_backward(shift, alias(y))
        open_slot(ctx, y)
        return y

    @staticmethod
    def backward(ctx: Any, r: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        shift, y = ctx.saved_tensors
        return (y - shift).mul_(_output_signal(ctx.output_slot, r, y)), None, None


class PoolFunction(torch.autograd.Function):
    """A linear pool `y = pool(a)` (average pools, means) with the z-rule on its own weights:
    `R_a = a * P^T (R / y)`."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, pool: Callable[[Tensor], Tensor]) -> Tensor:  # type: ignore[override]
        y = pool(a)
        ctx.save_for_backward(a, alias(y))
        ctx.pool = pool
        open_slot(ctx, y)
        return y

    @staticmethod
    @_autocast_off
    def backward(ctx: Any, r: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        a, y = ctx.saved_tensors
        s = _output_signal(ctx.output_slot, r, y)
        (c,) = _vjp(ctx.pool, (a,), (True,), lambda _: s)
        assert c is not None
        return c.mul_(a), None


class PassFunction(torch.autograd.Function):
    """`y = f(x)` for an element-wise `f` with the identity rule: `R_x = R` (not R times f's derivative);
    `inplace`: f writes its result into x (an in-place ReLU)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, f: Callable[[Tensor], Tensor], inplace: bool = False
    ) -> Tensor:
        if inplace:
            ctx.mark_dirty(x)
        return f(x)

    @staticmethod
    def backward(ctx: Any, r: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return r, None, None


class GateFunction(torch.autograd.Function):
    """`y = x * g` for a gate `g` (detached by the caller): all relevance to x, `R_x = R`; none to g."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, g: Tensor) -> Tensor:  # type: ignore[override]
        ctx.shape = x.shape
        return x * g

    @staticmethod
    def backward(ctx: Any, r: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return r.sum_to_size(ctx.shape), None


class NormFunction(torch.autograd.Function):
    """A normalisation with sigma constant, `y = C(x) * w / sigma + b` (`norms.FrozenNorm`):
    `R_x = x * J^T (R / y)` with `J^T v = C(v * w / sigma)`. y is not kept: the signal `R / y` comes from the
    next rule (`lrp.signals`), or y is computed again (`norm`) for the division."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, freeze: Callable[[Tensor], tuple[Tensor, Any]], norm: Recomputed
    ) -> Tensor:
        y, frozen = freeze(x)
        ctx.save_for_backward(x)
        ctx.frozen, ctx.norm = frozen, norm
        open_slot(ctx, y)
        return y

    @staticmethod
    @_autocast_off
    def backward(ctx: Any, r: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        c = taken(ctx.output_slot, r)
        if c is None:  # y, as the layers reading it computed it again, or computed now: a temporary
            s = stabilized_divide(r, ctx.norm.take(x), 0.0, overwrite=True)
        else:
            ctx.norm.drop()
            s = c
        return ctx.frozen.vjp(s, overwrite=c is None).mul_(x), None, None


class SoftmaxFunction(torch.autograd.Function):
    """`s = softmax(x)` over `dim` (through `f`) with AttnLRP's rule `R_x = x * J^T (R / s)`
    `= x * (R - s * sum(R))`; masked logits (-inf) get 0. s is not kept: it is taken from the rule of the product
    that computed it again (`Recomputed`), or computed again."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, f: Recomputed, dim: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.f, ctx.dim, ctx.slot = f, dim, slot_of(x)
        return f.f(x)

    @staticmethod
    @_autocast_off
    def backward(ctx: Any, r: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        c = torch.addcmul(r, ctx.f.take(x), r.sum(ctx.dim, keepdim=True), value=-1.0)
        r_x = c.mul_(x) if ctx.slot is None else torch.mul(c, x)
        r_x.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # -inf * 0 where masked
        return _offered(ctx.slot, r_x, c), None, None


class ProductFunction(torch.autograd.Function):
    """`z = f(u, v)` for a bilinear `f` with the uniform rule: `R_u = w u * J_u^T (R / z)`, `R_v` alike, with
    w = 1/2 when both operands carry relevance and 1 when only one does. z is recomputed in the backward pass
    (with the vector-Jacobian product it needs anyway), not kept; so is an operand marked `recomputable`
    (attention probabilities, from the logits their softmax keeps). `matmul`: f is `u @ v` (operands of two or
    more dims), whose vector-Jacobian products are written out instead of taken through autograd."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, u: Tensor, v: Tensor, f: Callable[[Tensor, Tensor], Tensor], matmul: bool = False
    ) -> Tensor:
        (u_kept, ctx.u_from), (v_kept, ctx.v_from) = recomputable(u), recomputable(v)
        ctx.save_for_backward(u_kept, v_kept)
        ctx.f, ctx.matmul = f, matmul and u.dim() >= 2 and v.dim() >= 2
        z = f(u, v)
        open_slot(ctx, z)
        return z

    @staticmethod
    @_autocast_off
    def backward(ctx: Any, r: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        u, v = ctx.saved_tensors
        u = u if ctx.u_from is None else ctx.u_from(u)
        v = v if ctx.v_from is None else ctx.v_from(v)
        wanted = tuple(ctx.needs_input_grad[:2])
        share = 0.5 if all(wanted) else 1.0
        s = taken(ctx.output_slot, r)
        scale = 1.0 if s is None else share  # a signal taken: the share goes into the product by the operand
        if ctx.matmul:  # z = u @ v: J_u^T s = s v^T and J_v^T s = u^T s, without autograd
            if s is None:
                s = stabilized_divide(r, torch.matmul(u, v), 0.0, scale=share, overwrite=True)
            c_u = torch.matmul(s, v.mT).sum_to_size(u.shape) if wanted[0] else None
            c_v = torch.matmul(u.mT, s).sum_to_size(v.shape) if wanted[1] else None
        else:
            signal = s
            c_u, c_v = _vjp(ctx.f, (u, v), wanted,
                            lambda z: stabilized_divide(r, z, 0.0, scale=share) if signal is None else signal)
        r_u = None if c_u is None else _scaled_product(c_u, u, scale)
        r_v = None if c_v is None else _scaled_product(c_v, v, scale)
        return r_u, r_v, None, None


def _scaled_product(c: Tensor, t: Tensor, scale: float) -> Tensor:
    """`scale * c * t` in one pass (c is a temporary)."""
    return c.mul_(t) if scale == 1.0 else torch.addcmul(c.new_zeros(()), c, t, value=scale)
