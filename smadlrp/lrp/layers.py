"""The modules that carry LRP rules in a converted model: Conv2d/Linear with their layer rule, and rule nodes.

Conv2d/Linear layers become subclasses whose `torch.autograd.Function` maps the relevance at the layer output to
the relevance at its input with the layer's rule (`smadlrp.lrp.rules`); every other node with a rule of its own
becomes a `RuleNode` that applies its op kind (`op_kinds`); `Term`s make learned additive terms (positional
embeddings, class tokens) inputs of the explanation; `Tap`s let tracing see the relevance arriving at a node. All
of them share one `Switch`: outside a relevance pass they compute the model's ordinary output.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smadlrp.core.device import without_autocast
from smadlrp.core.errors import UsageError
from smadlrp.lrp.composites import Composite, LayerSlot
from smadlrp.lrp.node_rules import alias, mark_recomputable, recomputable
from smadlrp.lrp.op_kinds import NodeCall, NodePlan, OpKind
from smadlrp.lrp.ops import ConvOp, DenseOp, LayerOp, LayerState, Prepared
from smadlrp.lrp.rules import Rule
from smadlrp.lrp.signals import slot_of
from smadlrp.lrp.trace import relevance_hook
from smadlrp.lrp.tracing import LeafModule

_CACHE_SIZE = 16  # prepared rules kept per layer (every rule of the registry, with room for overrides)
_PASS_IDS = itertools.count()


class RelevancePass:
    """One explaining forward pass: the composite, the counter of explained layers, the compute `dtype`
    (float64 for a float64 model, else float32), the `batch` size and the learned terms' leaves (by name)."""

    def __init__(self, composite: Composite, count: int, dtype: torch.dtype, batch: int) -> None:
        self.composite = composite
        self.count = count
        self.dtype, self.batch = dtype, batch
        self.id = next(_PASS_IDS)
        self.explained = 0
        self.terms: dict[str, Tensor] = {}

    def rule_for(self, name: str, kind: Literal["conv", "dense"], projection: bool = False) -> Rule:
        """The rule of the next explained layer `name` (its slot counts the layers explained before it)."""
        rule = self.composite.rule_for(LayerSlot(self.explained, name, kind, projection), self.count)
        self.explained += 1
        return rule


class Switch:
    """Shared by the rule-carrying modules of one converted model: the pass in progress (None: ordinary
    forward)."""

    def __init__(self) -> None:
        self.current: RelevancePass | None = None


class Tap(LeafModule, nn.Module):
    """Identity on a tensor that, during a relevance pass, lets tracing see the relevance arriving at it."""

    def __init__(self, switch: Switch, index: int, name: str, op: str) -> None:
        super().__init__()
        self.switch, self.index, self.node_name, self.op = switch, index, name, op

    def forward(self, x: Any) -> Any:
        current = self.switch.current
        if current is not None and isinstance(x, Tensor) and x.requires_grad:
            x.register_hook(relevance_hook(current.id, self.index, self.node_name, self.op))
        return x


class _RuleFunction(torch.autograd.Function):
    """Forward: the layer. Backward: the rule's relevance at the input from the relevance at the output. With
    `recompute`, an output the rule needs is computed again in the backward pass instead of being kept (for a
    layer whose output nothing else keeps: one followed by an activation that writes a new tensor). With
    `recompute_input`, an input marked `recomputable` (an activation's output, whose input the layer before
    keeps) is computed again from what the mark names instead of being kept."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, a: Tensor, op: LayerOp, rule: Rule, prepared: Prepared, a_nonnegative: bool | None,
        rectified: bool, recompute: bool, recompute_input: bool,
    ) -> Tensor:
        if a_nonnegative is None and rule.sign_sensitive:
            a_nonnegative = not bool(a.numel() and a.min() < 0)
        z = op.forward(a, prepared["weight"], prepared.get("bias"))
        needs_output = rule.needs_output(bool(a_nonnegative))
        kept, ctx.input_from = recomputable(a) if recompute_input else (a, None)
        if needs_output and not recompute:
            ctx.save_for_backward(kept, alias(z))
        else:
            ctx.save_for_backward(kept)
        ctx.op, ctx.rule, ctx.prepared, ctx.a_nonnegative, ctx.rectified = op, rule, prepared, a_nonnegative, rectified
        ctx.recompute = needs_output and recompute
        ctx.slot = slot_of(a)
        return z

    @staticmethod
    def backward(ctx: Any, r: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        a, *z = ctx.saved_tensors
        with without_autocast(r.device.type):
            if ctx.input_from is not None:
                a = ctx.input_from(a)
            if ctx.recompute:
                z = [ctx.op.forward(a, ctx.prepared["weight"], ctx.prepared.get("bias"))]
            state = LayerState(a, z[0] if z else None, ctx.a_nonnegative, ctx.rectified, ctx.slot)
            relevance = ctx.rule.relevance(ctx.op, ctx.prepared, state, r.to(a.dtype))
        return relevance, None, None, None, None, None, None, None


class _Explained(LeafModule):
    """What LRP Conv2d/Linear layers share: the switch, the layer's qualified name, what the graph knows about
    its input and whether it carries relevance (not inside a gate's branch), and a cache of prepared weights
    per rule."""

    _lrp_switch: Switch
    _lrp_name: str
    _lrp_nonnegative: bool
    _lrp_carries: bool
    _lrp_rectified: bool
    _lrp_projection: bool
    _lrp_recompute: bool
    _lrp_input_recompute: bool
    _lrp_cache: OrderedDict[Rule, Prepared]
    _lrp_key: tuple[Any, ...]

    def _lrp_init(self, switch: Switch, name: str, nonnegative: bool, carries: bool) -> None:
        self._lrp_switch, self._lrp_name = switch, name
        self._lrp_nonnegative, self._lrp_carries = nonnegative, carries
        self._lrp_rectified = False
        self._lrp_projection = False
        self._lrp_recompute = False
        self._lrp_input_recompute = False
        self._lrp_cache = OrderedDict()
        self._lrp_key = ()

    def _prepared(self, name: str, rule: Rule, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Prepared:
        """The rule's modified weights for this layer in `dtype`: computed on first use, then cached (until the
        weights change)."""
        key = tuple((t._version, t.data_ptr(), t.device, t.dtype) for t in (weight, bias) if t is not None) + (dtype,)
        if key != self._lrp_key:
            self._lrp_cache.clear()
            self._lrp_key = key
        prepared = self._lrp_cache.get(rule)
        if prepared is None:
            with torch.no_grad():
                weight = weight.detach().to(dtype)
                bias = None if bias is None else bias.detach().to(dtype)
                prepared = {"weight": weight, **({} if bias is None else {"bias": bias})}
                prepared.update(rule.prepare(name, weight, bias))
            self._lrp_cache[rule] = prepared
            if len(self._lrp_cache) > _CACHE_SIZE:
                self._lrp_cache.popitem(last=False)
        else:
            self._lrp_cache.move_to_end(rule)
        return prepared

    def _explain(
        self, input: Tensor, a: Tensor, op: LayerOp, kind: Literal["conv", "dense"], current: RelevancePass,
        params: tuple[Tensor, Any],
    ) -> Tensor:
        """Apply this layer's rule from `current` to `a` (the `input`, padded if the layer pads explicitly);
        `params` are the layer's (weight, bias). Inside a gate's branch (no relevance) the plain layer runs."""
        name = self._lrp_name
        rule = current.rule_for(name, kind, self._lrp_projection)
        if not self._lrp_carries:
            return op.forward(a, *params)
        rule.check(name, op, a)
        prepared = self._prepared(name, rule, *params, current.dtype)
        nonnegative = True if self._lrp_nonnegative else None
        a = a.to(current.dtype)
        recompute_input = self._lrp_input_recompute and a is input
        with without_autocast(a.device.type):
            out = _RuleFunction.apply(a, op, rule, prepared, nonnegative, self._lrp_rectified, self._lrp_recompute,
                                      recompute_input)
        assert isinstance(out, Tensor)
        return out


class LRPConv2d(_Explained, nn.Conv2d):
    """A Conv2d that applies its LRP rule while its model explains; an ordinary Conv2d otherwise."""

    _lrp_op: ConvOp
    _lrp_pad: bool

    @classmethod
    def from_module(cls, conv: nn.Conv2d, switch: Switch, name: str, nonnegative: bool, carries: bool) -> LRPConv2d:
        """Wrap `conv` (qualified name `name`), sharing its parameters; `nonnegative`: its input is known >= 0."""
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,  # type: ignore[arg-type]
            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta",  # type: ignore[arg-type]
        )  # fmt: skip
        new.weight = conv.weight
        if conv.bias is not None:
            new.bias = conv.bias
        new._lrp_init(switch, name, nonnegative, carries)
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
                f"layer {self._lrp_name!r} (Conv2d) expects (B, {self.in_channels}, H, W) input, "
                f"got shape {tuple(input.shape)}"
            )
        a = input
        if self._lrp_pad:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            a = F.pad(input.to(current.dtype), self._reversed_padding_repeated_twice, mode=mode)
        return self._explain(input, a, self._lrp_op, "conv", current, (self.weight, self.bias))


class LRPLinear(_Explained, nn.Linear):
    """A Linear that applies its LRP rule while its model explains; an ordinary Linear otherwise."""

    _OP = DenseOp()

    @classmethod
    def from_module(cls, linear: nn.Linear, switch: Switch, name: str, nonnegative: bool, carries: bool) -> LRPLinear:
        """Wrap `linear` (qualified name `name`), sharing its parameters; `nonnegative`: its input is known >= 0."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        new.weight = linear.weight
        if linear.bias is not None:
            new.bias = linear.bias
        new._lrp_init(switch, name, nonnegative, carries)
        return new

    def forward(self, input: Tensor) -> Tensor:
        current = self._lrp_switch.current
        if current is None:
            return super().forward(input)
        if input.dim() < 1 or input.shape[-1] != self.in_features:
            raise UsageError(
                f"layer {self._lrp_name!r} (Linear) expects {self.in_features} input features, "
                f"got shape {tuple(input.shape)}"
            )
        return self._explain(input, input, self._OP, "dense", current, (self.weight, self.bias))


class RuleNode(LeafModule, nn.Module):
    """One graph node with a rule of its own: `plain` (a module or function) computes the node's output as the
    model does; during a relevance pass the op `kind` computes the same output with its rule attached
    (`OpKind.apply`, or `OpKind.signal` for signal methods; None: the plain op, whose gradient passes).
    `marks_output`: the output is marked `recomputable` from the input (an activation between two layers)."""

    def __init__(self, switch: Switch, plan: NodePlan, kind: OpKind, plain: Callable[..., Any]) -> None:
        super().__init__()
        self.switch, self.plan, self.op_kind = switch, plan, kind
        self.marks_output = False  # set by conversion: the layer after it recomputes this output (see layers)
        if isinstance(plain, nn.Module):
            self.plain: Callable[..., Any] = plain
        else:
            self.__dict__["plain"] = plain  # a function, not a submodule

    def extra_repr(self) -> str:
        return f"{self.plan.kind}, {self.plan.name}: {self.plan.op}"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        current = self.switch.current
        apply = None if current is None else (
            self.op_kind.signal if current.composite.signal else self.op_kind.apply)
        if apply is None:
            return self.plain(*args, **kwargs)
        assert current is not None
        call = NodeCall(self.plain, args, kwargs, self.plan, current.composite, current.dtype)
        device = next(a for a in args if isinstance(a, Tensor)).device
        with without_autocast(device.type):
            out = apply(call)
        if self.marks_output:
            mark_recomputable(out, call.operand(), call.operation())
        return out


class Term(LeafModule, nn.Module):
    """A learned additive term (positional embedding, class token) where it enters a sum or concatenation with
    a carrying operand `like` (B, ...): during a relevance pass, a leaf of shape (B, ...) (the term broadcast to
    the batch, unless it already is per sample) whose relevance the explainer collects under `name`; the term
    itself otherwise."""

    def __init__(self, switch: Switch, name: str) -> None:
        super().__init__()
        self.switch, self.term_name = switch, name

    def forward(self, p: Tensor, like: Tensor) -> Tensor:
        current = self.switch.current
        if current is None:
            return p
        leaf = p.detach().to(current.dtype)
        if not (leaf.dim() == like.dim() and leaf.shape[0] == current.batch):
            leaf = leaf.reshape((1,) * max(like.dim() - leaf.dim(), 0) + tuple(leaf.shape))
            leaf = leaf.expand(current.batch, *leaf.shape[1:])
        leaf = leaf.clone().requires_grad_(True)
        name, copy = self.term_name, 2
        while name in current.terms:  # the same parameter entering twice
            name, copy = f"{self.term_name}#{copy}", copy + 1
        current.terms[name] = leaf
        return leaf
