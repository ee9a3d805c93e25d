"""The op kinds smadlrp explains out of the box, registered in matching order (see `op_kinds` and docs/lrp.md):

- `layer`: Conv2d / Linear, the layer rules of `rules/` (applied by the engine's own layer modules);
- `affine`: a BatchNorm that cannot be folded, `y = s x + t`: the z-rule, `R_x = s x / y R`;
- `norm`: LayerNorm, GroupNorm, RMSNorm, `F.layer_norm`, `F.normalize`, ...: sigma constant, the z-rule on the rest;
- `pool`: average pools (modules, `F.avg_pool2d`, `F.adaptive_avg_pool2d`, `mean`): the z-rule on their weights;
- `relu`: ReLU: the identity rule, which equals its gradient wherever relevance can arrive; the gradient when a
  rule that gives relevance to zero inputs (flat, wsquare, zbox) explains a layer after the first;
- `relu6`, `activation`: ReLU6, SiLU, Hardswish, GELU, Mish, Tanh: relevance unchanged (the identity rule);
- `softmax`: attention probabilities: AttnLRP's rule, or constants of the pass with `attention="cp"` (CP-LRP);
- `gate`: `x * g` with g a sigmoid or hard sigmoid (squeeze-excitation): all relevance to x, none to g;
- `product`: `u * v`, `u @ v`, `matmul`, `bmm`, `einsum` of two tensors that carry relevance: the uniform rule;
- `sum`: `a + b` and `a - b`, tensors or a constant (bias, positional embedding, mask): the z-rule on the sum;
- `scale`: `x * c`, `x / c`, `-x` for a constant c (a number or a parameter such as a layer scale): unchanged;
- `gradient`: ops whose gradient already shares relevance: max pools (winner takes all), concatenation,
  slicing, reshapes, dtype casts, `roll`, `pad`, window partitioning, Dropout and stochastic depth in eval mode;
- `upsample`: nearest upsampling (`nn.Upsample`, `F.interpolate`), explained by its gradient (each output copies
  one input); other modes are refused.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import swin_transformer
from torchvision.ops import stochastic_depth

from smadlrp.lrp.canonize import AffineBatchNorm, FoldedBatchNorm
from smadlrp.lrp.node_rules import (
    AffineFunction,
    GateFunction,
    NormFunction,
    PassFunction,
    PoolFunction,
    ProductFunction,
    Recomputed,
    SoftmaxFunction,
    SumFunction,
    mark_recomputable,
)
from smadlrp.lrp.norms import NORM_FUNCTIONS, NORM_MODULES, freeze
from smadlrp.lrp.op_kinds import NodeCall, NodeView, OpKind, register_op
from smadlrp.lrp.window_ops import STRUCTURAL_FUNCTIONS

META_FUNCTIONS: frozenset[object] = frozenset({"size", "dim", "numel", builtins.getattr, builtins.len})
GATE_MODULES: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Hardsigmoid)
GATE_FUNCTIONS: tuple[object, ...] = (torch.sigmoid, F.sigmoid, F.hardsigmoid, "sigmoid")
_ADD = (operator.add, operator.iadd, torch.add, "add", "add_")
_SUB = (operator.sub, operator.isub, torch.sub, "sub")
MUL_FUNCTIONS = (operator.mul, operator.imul, torch.mul, "mul")
_DIV = (operator.truediv, torch.div, "div")
_MATMUL = (operator.matmul, torch.matmul, "matmul", torch.bmm, "bmm", torch.einsum)
_MATMUL_OPS = ("operator.matmul", "torch.matmul", "Tensor.matmul", "torch.bmm", "Tensor.bmm")  # as plans label them
_STRUCTURAL = (
    torch.flatten, torch.reshape, torch.cat, torch.concat, torch.stack, torch.unsqueeze, torch.squeeze,
    torch.transpose, torch.permute, torch.swapaxes, torch.chunk, torch.split, torch.unbind, torch.roll,
    torch.narrow, operator.getitem, F.pad, F.max_pool2d, torch.max_pool2d, F.adaptive_max_pool2d,
    swin_transformer._patch_merging_pad,
    "view", "reshape", "flatten", "contiguous", "unsqueeze", "squeeze", "permute", "transpose", "swapaxes",
    "chunk", "split", "unbind", "clone", "expand", "expand_as", "roll", "narrow", "to", "float",
    *STRUCTURAL_FUNCTIONS,
)  # fmt: skip
_PASS_MODULES = (nn.Dropout, nn.Identity)  # modules an eval-mode value passes through unchanged
# Dropout-like functions: the identity when their `training` argument (at this position) is False.
_EVAL_IDENTITY: dict[object, int] = {F.dropout: 2, stochastic_depth: 3}


def _inplace(call: NodeCall) -> bool:
    """Whether the model computes this element-wise op in place."""
    flag = getattr(call.plain, "inplace", False) or call.kwargs.get("inplace", False)
    return bool(flag) or call.plan.op.endswith("_")


def pass_through(call: NodeCall) -> Tensor:
    """The identity rule, `R_x = R_y`, for an element-wise op of one carrying operand. An op the model computes
    in place runs on a copy: the layer before it keeps its output for its own rule."""
    copy = _inplace(call)
    return PassFunction.apply(  # type: ignore[no-any-return]
        call.operand(), lambda t: call.call_with(t.clone() if copy else t))


def _relu(call: NodeCall) -> Tensor:
    """ReLU: the identity rule, in place where the model's ReLU is (relu(z) equals z wherever relevance arrives,
    so the layer before keeps a valid output); the gradient when the composite forbids the identity."""
    if not call.composite.relu_identity:
        return call.plain(*call.args, **call.kwargs)  # type: ignore[no-any-return]
    inplace = _inplace(call)
    return PassFunction.apply(call.operand(), torch.relu_ if inplace else torch.relu, inplace)  # type: ignore[no-any-return]


def _sum(call: NodeCall) -> Tensor:
    a, b = (_as_tensor(call, v) for v in call.args[:2])
    if call.plan.op in ("operator.sub", "operator.isub", "torch.sub", "Tensor.sub"):
        b = PassFunction.apply(b, torch.neg) if b.requires_grad else -b
    return SumFunction.apply(a, b, call.composite.sum_split == "absolute")  # type: ignore[no-any-return]


def _as_tensor(call: NodeCall, value: object) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(call.dtype)
    return torch.tensor(value, dtype=call.dtype, device=call.operand().device)


def _scale(call: NodeCall) -> Tensor:
    return PassFunction.apply(call.operand(), lambda t: call.call_with(t))  # type: ignore[no-any-return]


def _affine(call: NodeCall) -> Tensor:
    m, x = call.plain, call.operand()
    assert isinstance(m, AffineBatchNorm)
    shape = (1, -1, *([1] * (x.dim() - 2)))
    return AffineFunction.apply(x, m.scale.to(call.dtype).view(shape), m.shift.to(call.dtype).view(shape))  # type: ignore[no-any-return]


def _pool(call: NodeCall) -> Tensor:
    return PoolFunction.apply(call.operand(), call.operation())  # type: ignore[no-any-return]


def _gate(call: NodeCall) -> Tensor:
    g = call.args[call.plan.gate_index]
    assert isinstance(g, Tensor)
    return GateFunction.apply(call.args[1 - call.plan.gate_index].to(call.dtype), g.detach().to(call.dtype))  # type: ignore[no-any-return]


def _gate_signal(call: NodeCall) -> Tensor:
    g = call.args[call.plan.gate_index]
    x = call.args[1 - call.plan.gate_index]
    assert isinstance(g, Tensor) and isinstance(x, Tensor)
    return x * g.detach()


def _norm(call: NodeCall) -> Tensor:
    bare = call.without_operands()
    recompute = Recomputed(lambda t: freeze(bare, t)[0])
    x = call.operand()
    y = NormFunction.apply(x, lambda t: freeze(call, t), recompute)
    return mark_recomputable(y, x, recompute)  # the layers that read y keep x, which the norm keeps


def _norm_signal(call: NodeCall) -> Tensor:
    """The layer's output with the gradient of its frozen form (sigma constant)."""
    x = call.operand()
    y, frozen = freeze(call, x)
    linear = frozen(x)
    return linear + (y - linear).detach()


def _softmax(call: NodeCall) -> Tensor:
    if call.composite.attention == "cp":
        return call.call_with(call.operand()).detach()  # type: ignore[no-any-return]
    x = call.operand()
    plain = call.plain if isinstance(call.plain, nn.Module) else None
    softmax = Recomputed(call.operation())
    s = SoftmaxFunction.apply(x, softmax, _softmax_dim(plain, call.args, call.kwargs))
    return mark_recomputable(s, x, softmax)  # the products that use s keep x, which the softmax keeps


def _softmax_dim(module: nn.Module | None, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> object:
    """The dimension a softmax node normalises over, as its call gives it (None: implicit)."""
    if isinstance(module, nn.Softmax):
        return module.dim
    return kwargs.get("dim", args[1] if len(args) > 1 else None)


def _softmax_signal(call: NodeCall) -> Tensor:
    return call.call_with(call.operand()).detach()  # type: ignore[no-any-return]


def _product(call: NodeCall) -> Tensor:
    matmul = call.plan.op in _MATMUL_OPS
    return ProductFunction.apply(call.operand(0), call.operand(1), call.operation(), matmul)  # type: ignore[no-any-return]


def _is_gate(view: NodeView) -> bool:
    return view.gate_index >= 0


def _two_carrying(view: NodeView) -> bool:
    return len(view.carrying) == 2 and len(view.node.args) == 2 + (view.node.target is torch.einsum)


def _sum_accepts(view: NodeView) -> bool | str:
    if "alpha" in view.node.kwargs:
        return f"{view.node.target} with alpha has no LRP rule"
    if len(view.node.args) != 2 or not view.carrying:
        return False
    subtracted_constant = view.node.target in _SUB and view.carrying == (1,)
    return "a constant minus a tensor has no LRP rule" if subtracted_constant else True


def _scale_accepts(view: NodeView) -> bool | str:
    node = view.node
    if node.target in ("neg",) or node.target is operator.neg:
        return True
    if len(view.carrying) != 1 or len(node.args) != 2 or view.gate_index >= 0:
        return False
    if node.target in _DIV and view.carrying != (0,):
        return f"dividing by a tensor that carries relevance has no LRP rule ({node.target})"
    if view.numbers and not all(n != 0 and abs(n) != float("inf") and n == n for n in view.numbers):
        return f"a product with {view.numbers[0]:g} has no LRP rule"
    return True


def _eval_identity(view: NodeView) -> bool | str:
    position = _EVAL_IDENTITY.get(view.node.target)
    if position is None:
        return True
    node = view.node
    training = node.kwargs.get("training", node.args[position] if len(node.args) > position else True)
    return True if training is False else f"{getattr(node.target, '__name__', node.target)} in training mode is random"


def _nearest(view: NodeView) -> bool | str:
    """Upsampling is explained by its gradient only in nearest mode, where each output copies one input."""
    mode = view.module.mode if isinstance(view.module, nn.Upsample) else view.node.kwargs.get("mode", "nearest")
    return True if mode == "nearest" else f"upsampling in {mode} mode has no LRP rule (only nearest)"


def _attention_weights(view: NodeView) -> bool | str:
    """A softmax is explained as attention weights: its output must multiply something (`A @ v`), possibly
    after an eval-mode Dropout or Identity module."""
    users, seen = list(view.node.users), []
    while users:
        user = users.pop()
        if user.op == "call_module" and isinstance(view.modules.get(str(user.target)), _PASS_MODULES):
            users += list(user.users)
        else:
            seen.append(user)
    if not isinstance(_softmax_dim(view.module, view.node.args, view.node.kwargs), int):
        return "a softmax without an explicit dim has no LRP rule"
    if seen and all(user.target in _MATMUL + MUL_FUNCTIONS for user in seen):
        return True
    return "a softmax is explained only as attention weights (A @ v), not as an output or a feature"


def _gate_refused(view: NodeView) -> str:
    return "a sigmoid is explained only as the gate g of x * g"


GRADIENT_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Flatten, nn.Unflatten,
    nn.Identity, FoldedBatchNorm,
)  # fmt: skip

for _kind in (
    OpKind("layer", "the layer rule the composite assigns (rules/)", modules=(nn.Conv2d, nn.Linear)),
    OpKind("affine", "z-rule on y = s x + t: R_x = s x / y R", modules=(AffineBatchNorm,), apply=_affine),
    OpKind("norm", "sigma constant, centring by the z-rule: R_x = x * J^T (R / y)", modules=NORM_MODULES,
           functions=NORM_FUNCTIONS, apply=_norm, signal=_norm_signal),
    OpKind("pool", "z-rule on the pool's weights: R_x = x * P^T (R / y)", modules=(nn.AvgPool2d, nn.AdaptiveAvgPool2d),
           functions=(F.avg_pool2d, F.adaptive_avg_pool2d, torch.mean, "mean"), sign="keeps", apply=_pool),
    OpKind("relu", "identity: R_x = R_y", modules=(nn.ReLU,), functions=(F.relu, torch.relu, "relu", "relu_"),
           sign="nonnegative", apply=_relu),
    OpKind("relu6", "identity: R_x = R_y", modules=(nn.ReLU6,), functions=(F.relu6,), sign="nonnegative",
           apply=pass_through),
    OpKind("activation", "identity: R_x = R_y", modules=(nn.SiLU, nn.Hardswish, nn.GELU, nn.Mish, nn.Tanh),
           functions=(F.silu, F.hardswish, F.gelu, F.mish, torch.tanh, F.tanh, "tanh"), apply=pass_through),
    OpKind("softmax", "AttnLRP: R_x = x * (R - s sum(R)); CP-LRP: a constant", modules=(nn.Softmax,),
           functions=(F.softmax, torch.softmax, "softmax"), apply=_softmax, signal=_softmax_signal,
           accepts=_attention_weights),
    OpKind("gate", "all relevance to x, none to the gate g", functions=MUL_FUNCTIONS, apply=_gate, signal=_gate_signal,
           accepts=_is_gate),
    OpKind("product", "uniform: half of the z-rule's relevance to each operand", functions=MUL_FUNCTIONS + _MATMUL,
           apply=_product, accepts=_two_carrying),
    OpKind("sum", "z-rule on the sum: R_a = a / y R", functions=_ADD + _SUB, sign="keeps", apply=_sum,
           accepts=_sum_accepts),
    OpKind("scale", "identity: R_x = R_y", functions=(*MUL_FUNCTIONS, *_DIV, operator.neg, "neg"), apply=_scale,
           accepts=_scale_accepts),
    OpKind("gradient", "the gradient (relevance sliced back, or winner takes all)", modules=GRADIENT_MODULES,
           functions=(*_STRUCTURAL, *_EVAL_IDENTITY), sign="keeps", accepts=_eval_identity),
    OpKind("upsample", "the gradient: nearest upsampling copies each input", modules=(nn.Upsample,),
           functions=(F.interpolate,), sign="keeps", accepts=_nearest),
    OpKind("sigmoid", "refused outside a gate", modules=GATE_MODULES, functions=GATE_FUNCTIONS,
           accepts=_gate_refused),
):
    register_op(_kind)
