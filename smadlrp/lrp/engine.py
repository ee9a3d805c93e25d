"""The LRP engine: rules attached to an eval-mode copy of a model, one relevance pass per batch.

The copy (BatchNorm folded, see `canonize`) has its Conv2d/Linear layers replaced by subclasses whose
`torch.autograd.Function` maps the relevance at the layer output to the relevance at its input with the layer's
rule; average pools use the z-rule on their own weights. ReLU, MaxPool, Dropout and reshapes are left to
autograd: their gradient already redistributes relevance correctly (ReLU passes it where the unit was active,
MaxPool gives it to the winner). The backward pass of the target logit, started with one-hot x logit, then
carries relevance (not gradient) down to the input.
"""

from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smadlrp.core.errors import UsageError
from smadlrp.lrp.canonize import FoldedBatchNorm, canonize
from smadlrp.lrp.composites import Composite, LayerSlot, Override, build_composite
from smadlrp.lrp.rules import ConvOp, DenseOp, LayerOp, LayerState, Prepared, Rule, stabilized_divide
from smadlrp.lrp.trace import OUTPUT_NAME, OUTPUT_TYPE, relevance_hook

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout, nn.Flatten, nn.Identity, FoldedBatchNorm,
)  # fmt: skip
Target = int | str | Tensor | Sequence[int] | Sequence[str] | None
_CACHE_SIZE = 8  # prepared rules kept per layer
# Layers whose output is non-negative when their input is (ReLU's output always is).
_KEEP_SIGN = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Flatten, nn.Identity)
_PASS_IDS = itertools.count()


def check_supported(model: nn.Module) -> None:
    """UsageError listing every layer the engine cannot explain (leaf layers of other types, or containers
    with parameters of their own)."""
    unsupported, seen = [], set()
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen:
            unsupported.append(f"{name} ({type(module).__name__} used a second time)")
            continue
        seen.add(id(module))
        leaf = next(module.children(), None) is None
        if leaf and type(module) not in SUPPORTED_LAYERS:
            unsupported.append(f"{name or '<model>'} ({type(module).__name__})")
        elif not leaf and next(module.parameters(recurse=False), None) is not None:
            unsupported.append(f"{name or '<model>'} ({type(module).__name__} with parameters of its own)")
    if unsupported:
        supported = ", ".join(t.__name__ for t in SUPPORTED_LAYERS if t is not FoldedBatchNorm)
        raise UsageError(f"cannot explain unsupported layer(s): {', '.join(unsupported)}; supported: {supported}")


class _Pass:
    """One explaining forward pass: the composite and counters for explained layers and traced layers."""

    def __init__(self, composite: Composite, count: int) -> None:
        self.composite = composite
        self.count = count
        self.id = next(_PASS_IDS)
        self.explained = 0
        self.traced = 0
        self._nonnegative: dict[int, weakref.ref[Tensor]] = {}

    def mark_nonnegative(self, t: Tensor) -> None:
        self._nonnegative[id(t)] = weakref.ref(t)

    def is_nonnegative(self, t: object) -> bool:
        """Whether `t` is known to be >= 0: the output of a ReLU, or of a sign-keeping layer fed such a tensor."""
        known = self._nonnegative.get(id(t))
        return known is not None and known() is t

    def rule_for(self, name: str, kind: Literal["conv", "dense"]) -> Rule:
        rule = self.composite.rule_for(LayerSlot(self.explained, name, kind), self.count)
        self.explained += 1
        return rule


class _Switch:
    """Shared by the layers of one converted model: the pass in progress (None: ordinary forward), and the
    forward pre-hook of every layer, which lets tracing see the relevance arriving at the layer's input."""

    def __init__(self) -> None:
        self.current: _Pass | None = None
        self.layers: dict[nn.Module, tuple[str, str]] = {}  # module -> (qualified name, layer type)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        current = self.current
        if current is None:
            return
        index, current.traced = current.traced, current.traced + 1
        if args and isinstance(args[0], Tensor) and args[0].requires_grad:
            args[0].register_hook(relevance_hook(current.id, index, *self.layers[module]))

    def after(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """Forward hook: remember which outputs are known to be non-negative."""
        current = self.current
        if current is None or not isinstance(output, Tensor):
            return
        if isinstance(module, nn.ReLU) or (isinstance(module, _KEEP_SIGN) and args and current.is_nonnegative(args[0])):
            current.mark_nonnegative(output)

    def name(self, module: nn.Module) -> str:
        return self.layers[module][0]


def _alias(t: Tensor) -> Tensor:
    """A tensor on `t`'s memory with a version counter of its own, to save a layer output for the backward pass.

    A following in-place ReLU may overwrite the output with relu(z), which equals z wherever relevance arrives
    (elsewhere the incoming relevance is 0); saved through this alias, autograd keeps the memory exactly as long
    as the graph needs it instead of refusing the in-place change.
    """
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


class _RuleFunction(torch.autograd.Function):
    """Forward: the layer. Backward: the rule's relevance at the input from the relevance at the output."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, a: Tensor, op: LayerOp, rule: Rule, prepared: Prepared, a_nonnegative: bool | None
    ) -> Tensor:
        if a_nonnegative is None and rule.sign_sensitive:
            a_nonnegative = not bool(a.numel() and a.min() < 0)
        z = op.forward(a, prepared["weight"], prepared.get("bias"))
        if rule.needs_output(bool(a_nonnegative)):
            ctx.save_for_backward(a, _alias(z))
        else:
            ctx.save_for_backward(a)
        ctx.op, ctx.rule, ctx.prepared, ctx.a_nonnegative = op, rule, prepared, a_nonnegative
        return z

    @staticmethod
    def backward(ctx: Any, r: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        a, *z = ctx.saved_tensors
        state = LayerState(a, z[0] if z else None, ctx.a_nonnegative)
        with torch.autocast(r.device.type, enabled=False):
            relevance = ctx.rule.relevance(ctx.op, ctx.prepared, state, r.float())
        return relevance, None, None, None, None


class _PoolFunction(torch.autograd.Function):
    """An average pool with the z-rule on its own weights: `R_in = a * P^T (R / (P a))`."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, pool: Callable[[Tensor], Tensor]) -> Tensor:  # type: ignore[override]
        y = pool(a)
        ctx.save_for_backward(a, _alias(y))
        ctx.pool = pool
        return y

    @staticmethod
    def backward(ctx: Any, r: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        a, y = ctx.saved_tensors
        with torch.autocast(r.device.type, enabled=False), torch.enable_grad():
            leaf = a.detach().requires_grad_(True)
            (c,) = torch.autograd.grad(ctx.pool(leaf), leaf, stabilized_divide(r.float(), y, 0.0))
        return c.mul_(a), None


class _StartFunction(torch.autograd.Function):
    """Identity on the logits whose backward multiplies the incoming gradient by the logits, so that
    backpropagating a one-hot starts the relevance pass with one-hot x logit."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(logits)
        return logits.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        (logits,) = ctx.saved_tensors
        return grad * logits


class _Explained:
    """What LRP Conv2d/Linear layers share: the switch and a cache of prepared weights per rule."""

    _lrp_switch: _Switch
    _lrp_cache: OrderedDict[Rule, Prepared]
    _lrp_key: tuple[Any, ...]

    def _lrp_init(self, switch: _Switch) -> None:
        self._lrp_switch = switch
        self._lrp_cache = OrderedDict()
        self._lrp_key = ()

    def _prepared(self, name: str, rule: Rule, weight: Tensor, bias: Tensor | None) -> Prepared:
        """The rule's modified weights for this layer: computed on first use, then cached (until the weights
        change)."""
        key = tuple((t._version, t.data_ptr(), t.device, t.dtype) for t in (weight, bias) if t is not None)
        if key != self._lrp_key:
            self._lrp_cache.clear()
            self._lrp_key = key
        prepared = self._lrp_cache.get(rule)
        if prepared is None:
            with torch.no_grad():
                weight = weight.detach().float()
                bias = None if bias is None else bias.detach().float()
                prepared = {"weight": weight, **({} if bias is None else {"bias": bias})}
                prepared.update(rule.prepare(name, weight, bias))
            self._lrp_cache[rule] = prepared
            if len(self._lrp_cache) > _CACHE_SIZE:
                self._lrp_cache.popitem(last=False)
        else:
            self._lrp_cache.move_to_end(rule)
        return prepared

    def _explain(
        self, input: Tensor, a: Tensor, op: LayerOp, kind: Literal["conv", "dense"], current: _Pass,
        params: tuple[Tensor, Any],
    ) -> Tensor:
        """Apply this layer's rule from `current` to `a` (the `input`, padded if the layer pads explicitly);
        `params` are the layer's (weight, bias)."""
        name = self._lrp_switch.name(self)  # type: ignore[arg-type]
        rule = current.rule_for(name, kind)
        rule.check(name, op, a)
        prepared = self._prepared(name, rule, *params)
        nonnegative = True if current.is_nonnegative(input) else None
        with torch.autocast(a.device.type, enabled=False):
            out = _RuleFunction.apply(a.float(), op, rule, prepared, nonnegative)
        assert isinstance(out, Tensor)
        return out


class LRPConv2d(_Explained, nn.Conv2d):
    """A Conv2d that applies its LRP rule while its model explains; an ordinary Conv2d otherwise."""

    _lrp_op: ConvOp
    _lrp_pad: bool

    @classmethod
    def from_module(cls, conv: nn.Conv2d, switch: _Switch) -> LRPConv2d:
        """Wrap `conv`, sharing its parameters."""
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,  # type: ignore[arg-type]
            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta",  # type: ignore[arg-type]
        )  # fmt: skip
        new.weight = conv.weight
        if conv.bias is not None:
            new.bias = conv.bias
        new._lrp_init(switch)
        explicit = conv.padding_mode != "zeros" or isinstance(conv.padding, str)
        padding = (0, 0) if explicit else tuple(conv.padding)
        new._lrp_op = ConvOp(tuple(conv.stride), padding, tuple(conv.dilation), conv.groups)  # type: ignore[arg-type]
        new._lrp_pad = explicit
        return new

    def forward(self, input: Tensor) -> Tensor:
        current = self._lrp_switch.current
        if current is None:
            return super().forward(input)
        if input.dim() != 4 or input.shape[1] != self.in_channels:
            raise UsageError(
                f"layer {self._lrp_switch.name(self)!r} (Conv2d) expects (B, {self.in_channels}, H, W) input, "
                f"got shape {tuple(input.shape)}"
            )
        a = input
        if self._lrp_pad:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            a = F.pad(input.float(), self._reversed_padding_repeated_twice, mode=mode)
        return self._explain(input, a, self._lrp_op, "conv", current, (self.weight, self.bias))


class LRPLinear(_Explained, nn.Linear):
    """A Linear that applies its LRP rule while its model explains; an ordinary Linear otherwise."""

    _OP = DenseOp()

    @classmethod
    def from_module(cls, linear: nn.Linear, switch: _Switch) -> LRPLinear:
        """Wrap `linear`, sharing its parameters."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        new.weight = linear.weight
        if linear.bias is not None:
            new.bias = linear.bias
        new._lrp_init(switch)
        return new

    def forward(self, input: Tensor) -> Tensor:
        current = self._lrp_switch.current
        if current is None:
            return super().forward(input)
        if input.dim() < 1 or input.shape[-1] != self.in_features:
            raise UsageError(
                f"layer {self._lrp_switch.name(self)!r} (Linear) expects {self.in_features} input features, "
                f"got shape {tuple(input.shape)}"
            )
        return self._explain(input, input, self._OP, "dense", current, (self.weight, self.bias))


def _pool_relevance(switch: _Switch, pool: Callable[[Tensor], Tensor], input: Tensor) -> Tensor:
    """The pool's z-rule during a relevance pass; the plain pool otherwise (and for signal methods)."""
    current = switch.current
    if current is None or current.composite.signal:
        return pool(input)
    with torch.autocast(input.device.type, enabled=False):
        out = _PoolFunction.apply(input.float(), pool)
    assert isinstance(out, Tensor)
    return out


class LRPAvgPool2d(nn.AvgPool2d):
    """An AvgPool2d that uses the z-rule on its own weights while its model explains."""

    _lrp_switch: _Switch

    def forward(self, input: Tensor) -> Tensor:
        return _pool_relevance(self._lrp_switch, super().forward, input)


class LRPAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """An AdaptiveAvgPool2d that uses the z-rule on its own weights while its model explains."""

    _lrp_switch: _Switch

    def forward(self, input: Tensor) -> Tensor:
        return _pool_relevance(self._lrp_switch, super().forward, input)


def _lrp_layer(module: nn.Module, switch: _Switch) -> nn.Module:
    """The LRP version of `module` sharing its parameters, or `module` itself when autograd already does LRP."""
    kind = type(module)
    if kind is nn.Conv2d:
        assert isinstance(module, nn.Conv2d)
        return LRPConv2d.from_module(module, switch)
    if kind is nn.Linear:
        assert isinstance(module, nn.Linear)
        return LRPLinear.from_module(module, switch)
    pool: LRPAvgPool2d | LRPAdaptiveAvgPool2d
    if kind is nn.AvgPool2d:
        assert isinstance(module, nn.AvgPool2d)
        pool = LRPAvgPool2d(
            module.kernel_size, module.stride, module.padding, module.ceil_mode,  # type: ignore[arg-type]
            module.count_include_pad, module.divisor_override,
        )  # fmt: skip
    elif kind is nn.AdaptiveAvgPool2d:
        assert isinstance(module, nn.AdaptiveAvgPool2d)
        pool = LRPAdaptiveAvgPool2d(module.output_size)
    else:
        return module
    pool._lrp_switch = switch
    return pool


class LRPModel(nn.Module):
    """A model ready for LRP: `lrp_model(x)` is the ordinary forward; `lrp_model(x, explain=True, rule=...)`
    returns logits whose backward pass (from a one-hot) leaves the relevance in `x.grad`.

    The wrapped copy is `.module`; its layers keep the qualified names of the original model.
    """

    def __init__(self, module: nn.Module, switch: _Switch, explained: dict[str, LRPConv2d | LRPLinear]) -> None:
        super().__init__()
        self.module = module
        self._switch = switch
        self._explained = explained

    def forward(
        self,
        x: Tensor,
        explain: bool = False,
        rule: str | Rule | Composite = "epsilon",
        pattern: Mapping[str, Tensor] | Sequence[Tensor] | None = None,
        *,
        overrides: Mapping[str | int, Override] | None = None,
        **params: Any,
    ) -> Tensor:
        """Logits (B, K). With `explain`, their backward pass computes relevance with `rule` (a rule key,
        composite name, Rule or Composite), rule `params`, per-layer `overrides` and, for PatternNet rules,
        `pattern` (qualified layer name -> pattern, or a sequence in layer order as TorchLRP took it)."""
        if not explain:
            out = self.module(x)
            assert isinstance(out, Tensor)
            return out
        if pattern is not None:
            params["patterns"] = self._pattern_map(pattern)
        composite = self.composite(rule, params, overrides)
        out = _StartFunction.apply(self.run(x, composite))
        assert isinstance(out, Tensor)
        return out

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Qualified names of the explained Conv2d/Linear layers, in definition order."""
        return tuple(self._explained)

    def composite(
        self,
        rule: str | Rule | Composite,
        params: Mapping[str, Any] | None = None,
        overrides: Mapping[str | int, Override] | None = None,
    ) -> Composite:
        """Resolve `rule` with `params` and `overrides`, checked against this model's layers."""
        composite = build_composite(rule, params, overrides)
        composite.check_layers({name: layer.weight for name, layer in self._explained.items()})
        return composite

    def run(self, x: Tensor, composite: Composite) -> Tensor:
        """The forward pass with `composite`'s rules attached; returns the logits (B, K)."""
        self._check_input(x)
        if self._switch.current is not None:
            raise RuntimeError("this model is already running a relevance pass")
        current = _Pass(composite, len(self._explained))
        self._switch.current = current
        try:
            # A fresh non-leaf input, so per-pass tracing hooks never stay on the caller's tensor.
            out = self.module(x.clone() if x.requires_grad else x)
        finally:
            self._switch.current = None
        if not isinstance(out, Tensor) or out.dim() != 2:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise UsageError(f"the model must return (B, K) logits to be explained, got {shape}")
        if out.requires_grad:
            out.register_hook(relevance_hook(current.id, current.traced, OUTPUT_NAME, OUTPUT_TYPE))
        return out

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise UsageError(f"expected an input tensor, got {type(x).__name__}")
        convolutional = any(isinstance(layer, nn.Conv2d) for layer in self._explained.values())
        if convolutional and x.dim() != 4:
            raise UsageError(f"expected a (B, C, H, W) image batch, got shape {tuple(x.shape)}")
        if x.dim() < 2:
            raise UsageError(f"expected a batch (B, ...), got shape {tuple(x.shape)}")

    def _pattern_map(self, pattern: Mapping[str, Tensor] | Sequence[Tensor]) -> Mapping[str, Tensor]:
        if isinstance(pattern, Mapping):
            return pattern
        if len(pattern) != len(self._explained):
            raise UsageError(f"got {len(pattern)} patterns for {len(self._explained)} Conv2d/Linear layers")
        return dict(zip(self._explained, pattern, strict=True))


def _convert(model: nn.Module, share_weights: bool) -> LRPModel:
    check_supported(model)
    root = canonize(model, share_weights=share_weights)
    switch = _Switch()
    explained: dict[str, LRPConv2d | LRPLinear] = {}
    for name, module in list(root.named_modules()):
        if next(module.children(), None) is not None:
            continue
        layer = _lrp_layer(module, switch)
        if layer is not module:
            if name:
                parent, _, child = name.rpartition(".")
                setattr(root.get_submodule(parent), child, layer)
            else:
                root = layer
        if isinstance(layer, (LRPConv2d, LRPLinear)):
            explained[name] = layer
        switch.layers[layer] = (name, type(module).__name__)
        layer.register_forward_pre_hook(switch)
        layer.register_forward_hook(switch.after)
    if not explained:
        raise UsageError("the model has no Conv2d or Linear layer to explain")
    return LRPModel(root.eval(), switch, explained)


def convert(model: nn.Module) -> LRPModel:
    """A TorchLRP-style explainable copy of `model` (deep copy, BatchNorm folded; `model` is not modified).

        lrp_model = convert(model)
        x.requires_grad_(True)
        y = lrp_model(x, explain=True, rule="epsilon")
        y[torch.arange(len(y)), target].sum().backward()   # relevance now in x.grad (it accumulates)
    """
    return _convert(model, share_weights=False)


@dataclass(frozen=True)
class Relevance:
    """One relevance pass: `relevance` (shape of the input, float32), `logits` (B, K), `target` (B,) int64."""

    relevance: Tensor
    logits: Tensor
    target: Tensor


class Explainer:
    """Explains batches with one rule or composite; canonizes the model once and prepares modified weights
    once (on first use), so repeated calls only run the relevance pass.

    The explainer shares the model's weight storage (read-only): build a new one after changing the model.
    """

    def __init__(
        self,
        model: nn.Module,
        rule: str | Rule | Composite = "epsilon",
        *,
        class_names: Sequence[str] | None = None,
        overrides: Mapping[str | int, Override] | None = None,
        **params: Any,
    ) -> None:
        self.lrp = _convert(model, share_weights=True)
        self.composite = self.lrp.composite(rule, params, overrides)
        self.class_names = None if class_names is None else tuple(class_names)
        self.device = next(self.lrp.parameters()).device

    def explain(self, x: Tensor, target: Target = None) -> Relevance:
        """Relevance of `target` (default: the predicted class; an index, a class name, or one per sample)
        for the batch `x` ((B, C, H, W) for convolutional models), computed in float32 on the model's device."""
        if not isinstance(x, Tensor):
            raise UsageError(f"expected an input tensor, got {type(x).__name__}")
        with torch.inference_mode(False), torch.enable_grad():
            leaf = x.detach().to(self.device, torch.float32).clone().requires_grad_(True)
            logits = self.lrp.run(leaf, self.composite)
            target_index = resolve_target(logits, target, self.class_names)
            rows = torch.arange(len(logits), device=logits.device)
            start = torch.zeros_like(logits)
            start[rows, target_index] = logits.detach()[rows, target_index]
            (relevance,) = torch.autograd.grad(logits, leaf, start)
        return Relevance(relevance, logits.detach(), target_index)


def explain(
    model: nn.Module,
    x: Tensor,
    rule: str | Rule | Composite = "epsilon",
    target: Target = None,
    *,
    class_names: Sequence[str] | None = None,
    overrides: Mapping[str | int, Override] | None = None,
    **params: Any,
) -> Tensor:
    """Input relevance (shape of `x`) of `target` for `model` with `rule` (rule key or composite name) and
    rule `params`, e.g. `explain(model, x, "epsilon-gamma-box", gamma=0.25, mean=..., std=...)`."""
    explainer = Explainer(model, rule, class_names=class_names, overrides=overrides, **params)
    return explainer.explain(x, target).relevance


def resolve_target(logits: Tensor, target: Target, class_names: Sequence[str] | None = None) -> Tensor:
    """Target class per sample, (B,) int64 on the logits' device: the predicted class for None, else an index
    or class name for every sample, or one per sample. UsageError when out of range or unknown."""
    batch, classes = logits.shape
    if class_names is not None and len(class_names) != classes:
        raise UsageError(f"got {len(class_names)} class names for a model with {classes} outputs")
    if target is None:
        return logits.argmax(dim=1)
    if isinstance(target, (str, int)) or (isinstance(target, Tensor) and target.dim() == 0):
        items: list[object] = [target] * batch
    elif isinstance(target, Tensor):
        items = target.flatten().tolist() if target.dim() == 1 else [target]
    else:
        items = list(target)
    if len(items) != batch:
        raise UsageError(f"got {len(items)} targets for a batch of {batch}")
    indices = [_class_index(item, classes, class_names) for item in items]
    return torch.tensor(indices, dtype=torch.int64, device=logits.device)


def _class_index(item: object, classes: int, class_names: Sequence[str] | None) -> int:
    if isinstance(item, Tensor) and item.numel() == 1 and not item.is_floating_point():
        item = int(item.item())
    if isinstance(item, str):
        if class_names is None:
            raise UsageError(f"target {item!r} is a class name, but no class names were given")
        if item not in class_names:
            raise UsageError(f"unknown class {item!r}; classes: {', '.join(class_names)}")
        return list(class_names).index(item)
    if isinstance(item, bool) or not isinstance(item, int):
        raise UsageError(f"a target must be a class index or name, got {item!r}")
    if not 0 <= item < classes:
        raise UsageError(f"target class {item} is out of range for a model with {classes} classes (0..{classes - 1})")
    return item
