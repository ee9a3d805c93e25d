"""The LRP engine: rules attached to the traced graph of an eval-mode copy of a model, one relevance pass per batch.

The copy is canonized (BatchNorm folded or made affine, see `canonize`) and traced with torch.fx (`graph`).
Every node that carries relevance gets a rule before anything runs, or the model is refused: Conv2d/Linear
layers become subclasses whose `torch.autograd.Function` maps the relevance at the layer output to the
relevance at its input with the layer's rule; sums, unfoldable BatchNorms, average pools, element-wise
activations and gates become `RuleNode`s with the rules of `node_rules`; ReLU, max pools, concatenations,
reshapes and Dropout are left to autograd, whose gradient already shares relevance correctly. The backward
pass of the target logit, started with one-hot x logit, then carries relevance (not gradient) to the input.
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
from torch import Tensor, fx, nn

from smadlrp.core.errors import UsageError
from smadlrp.lrp.canonize import AffineBatchNorm, FoldedBatchNorm, canonize
from smadlrp.lrp.composites import Composite, LayerSlot, Override, build_composite
from smadlrp.lrp.graph import LeafModule, NodePlan, plan_graph, trace_model
from smadlrp.lrp.node_rules import AffineFunction, GateFunction, PassFunction, PoolFunction, SumFunction, alias
from smadlrp.lrp.rules import ConvOp, DenseOp, LayerOp, LayerState, Prepared, Rule
from smadlrp.lrp.trace import OUTPUT_NAME, OUTPUT_TYPE, relevance_hook

Target = int | str | Tensor | Sequence[int] | Sequence[str] | None
_CACHE_SIZE = 16  # prepared rules kept per layer (every rule of the registry, with room for overrides)
_PASS_IDS = itertools.count()


def check_supported(model: nn.Module) -> None:
    """UsageError (one line) naming every node of `model`'s graph that carries relevance but has no LRP rule,
    or why the model cannot be traced; nothing is computed."""
    root = canonize(model, share_weights=True)
    plan_graph(trace_model(root), dict(root.named_modules()))


class _Pass:
    """One explaining forward pass: the composite and the counter of explained layers."""

    def __init__(self, composite: Composite, count: int) -> None:
        self.composite = composite
        self.count = count
        self.id = next(_PASS_IDS)
        self.explained = 0

    def rule_for(self, name: str, kind: Literal["conv", "dense"]) -> Rule:
        rule = self.composite.rule_for(LayerSlot(self.explained, name, kind), self.count)
        self.explained += 1
        return rule


class _Switch:
    """Shared by the rule-carrying modules of one converted model: the pass in progress (None: ordinary
    forward)."""

    def __init__(self) -> None:
        self.current: _Pass | None = None


class _Tap(LeafModule, nn.Module):
    """Identity on a tensor that, during a relevance pass, lets tracing see the relevance arriving at it."""

    def __init__(self, switch: _Switch, index: int, name: str, op: str) -> None:
        super().__init__()
        self.switch, self.index, self.node_name, self.op = switch, index, name, op

    def forward(self, x: Any) -> Any:
        current = self.switch.current
        if current is not None and isinstance(x, Tensor) and x.requires_grad:
            x.register_hook(relevance_hook(current.id, self.index, self.node_name, self.op))
        return x


class _RuleFunction(torch.autograd.Function):
    """Forward: the layer. Backward: the rule's relevance at the input from the relevance at the output."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, a: Tensor, op: LayerOp, rule: Rule, prepared: Prepared, a_nonnegative: bool | None,
        rectified: bool,
    ) -> Tensor:
        if a_nonnegative is None and rule.sign_sensitive:
            a_nonnegative = not bool(a.numel() and a.min() < 0)
        z = op.forward(a, prepared["weight"], prepared.get("bias"))
        if rule.needs_output(bool(a_nonnegative)):
            ctx.save_for_backward(a, alias(z))
        else:
            ctx.save_for_backward(a)
        ctx.op, ctx.rule, ctx.prepared, ctx.a_nonnegative, ctx.rectified = op, rule, prepared, a_nonnegative, rectified
        return z

    @staticmethod
    def backward(ctx: Any, r: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        a, *z = ctx.saved_tensors
        state = LayerState(a, z[0] if z else None, ctx.a_nonnegative, ctx.rectified)
        with torch.autocast(r.device.type, enabled=False):
            relevance = ctx.rule.relevance(ctx.op, ctx.prepared, state, r.float())
        return relevance, None, None, None, None, None


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


class _Explained(LeafModule):
    """What LRP Conv2d/Linear layers share: the switch, the layer's qualified name, what the graph knows about
    its input and whether it carries relevance (not inside a gate's branch), and a cache of prepared weights
    per rule."""

    _lrp_switch: _Switch
    _lrp_name: str
    _lrp_nonnegative: bool
    _lrp_carries: bool
    _lrp_rectified: bool
    _lrp_cache: OrderedDict[Rule, Prepared]
    _lrp_key: tuple[Any, ...]

    def _lrp_init(self, switch: _Switch, name: str, nonnegative: bool, carries: bool) -> None:
        self._lrp_switch, self._lrp_name = switch, name
        self._lrp_nonnegative, self._lrp_carries = nonnegative, carries
        self._lrp_rectified = False
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
        `params` are the layer's (weight, bias). Inside a gate's branch (no relevance) the plain layer runs."""
        name = self._lrp_name
        rule = current.rule_for(name, kind)
        if not self._lrp_carries:
            return op.forward(a, *params)
        rule.check(name, op, a)
        prepared = self._prepared(name, rule, *params)
        nonnegative = True if self._lrp_nonnegative else None
        with torch.autocast(a.device.type, enabled=False):
            out = _RuleFunction.apply(a.float(), op, rule, prepared, nonnegative, self._lrp_rectified)
        assert isinstance(out, Tensor)
        return out


class LRPConv2d(_Explained, nn.Conv2d):
    """A Conv2d that applies its LRP rule while its model explains; an ordinary Conv2d otherwise."""

    _lrp_op: ConvOp
    _lrp_pad: bool

    @classmethod
    def from_module(cls, conv: nn.Conv2d, switch: _Switch, name: str, nonnegative: bool, carries: bool) -> LRPConv2d:
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
            a = F.pad(input.float(), self._reversed_padding_repeated_twice, mode=mode)
        return self._explain(input, a, self._lrp_op, "conv", current, (self.weight, self.bias))


class LRPLinear(_Explained, nn.Linear):
    """A Linear that applies its LRP rule while its model explains; an ordinary Linear otherwise."""

    _OP = DenseOp()

    @classmethod
    def from_module(cls, linear: nn.Linear, switch: _Switch, name: str, nonnegative: bool, carries: bool) -> LRPLinear:
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


_OUT_OF_PLACE: dict[type[nn.Module], Callable[[Any, Tensor], Tensor]] = {
    nn.ReLU6: lambda m, x: F.relu6(x), nn.SiLU: lambda m, x: F.silu(x), nn.Hardswish: lambda m, x: F.hardswish(x),
    nn.GELU: lambda m, x: F.gelu(x, approximate=m.approximate), nn.Mish: lambda m, x: F.mish(x),
}  # fmt: skip


class RuleNode(LeafModule, nn.Module):
    """One graph node with an LRP rule of its own (`node_rules`): `plain` (a module or function) computes the
    node's output as the model does; during a relevance pass with an LRP rule the same output is computed with
    the node's rule in the backward pass. Signal methods (PatternNet family) use the gradient instead, except
    at gates, which are constants of the forward pass for every method."""

    def __init__(self, switch: _Switch, plan: NodePlan, plain: Callable[..., Any]) -> None:
        super().__init__()
        self.switch, self.kind, self.constant, self.gate_index = switch, plan.kind, plan.constant, plan.gate_index
        self.op, self.label = plan.op, f"{plan.name}: {plan.op}"
        if isinstance(plain, nn.Module):
            self.plain: Callable[..., Any] = plain
        else:
            self.__dict__["plain"] = plain  # a function, not a submodule

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.label}"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        current = self.switch.current
        if self.kind == "gate":
            x, g = args[1 - self.gate_index], args[self.gate_index]
            if current is None:
                return self.plain(*args, **kwargs)
            if current.composite.signal:
                return x * g.detach()
            return GateFunction.apply(x, g.detach())
        if current is None or current.composite.signal:
            return self.plain(*args, **kwargs)
        x = next(a for a in args if isinstance(a, Tensor))
        with torch.autocast(x.device.type, enabled=False):
            return self._explained(x.float(), args, kwargs)

    def _explained(self, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """The node's output with its LRP rule attached; `x` is its (first) tensor input in float32."""
        if self.kind == "sum":
            current = self.switch.current
            assert current is not None
            absolute = current.composite.sum_split == "absolute"
            return SumFunction.apply(args[0].float(), args[1].float(), absolute)  # type: ignore[no-any-return]
        if self.kind == "shift":
            return SumFunction.apply(x, x.new_tensor(self.constant), False)  # type: ignore[no-any-return]
        if self.kind == "affine":
            shape = (1, -1, *([1] * (x.dim() - 2)))
            m = self.plain
            assert isinstance(m, AffineBatchNorm)
            scale, shift = m.scale.float().view(shape), m.shift.float().view(shape)
            return AffineFunction.apply(x, scale, shift)  # type: ignore[no-any-return]
        rest = {k: v for k, v in kwargs.items() if k != "inplace"}
        if self.kind == "pool":
            return PoolFunction.apply(x, lambda t: self.plain(t, *args[1:], **rest))  # type: ignore[no-any-return]
        if self.kind == "scale":
            return PassFunction.apply(x, lambda t: t * self.constant)  # type: ignore[no-any-return]
        if self.kind == "relu":
            return self._relu(x, args, kwargs)
        assert self.kind == "activation", self.kind
        plain = self.plain
        if isinstance(plain, nn.Module):
            out_of_place = _OUT_OF_PLACE[next(t for t in _OUT_OF_PLACE if isinstance(plain, t))]
            return PassFunction.apply(x, lambda t: out_of_place(plain, t))  # type: ignore[no-any-return]
        return PassFunction.apply(x, lambda t: plain(t, *args[1:], **rest))  # type: ignore[no-any-return]

    def _relu(self, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """ReLU with the identity rule: the relevance reaching a ReLU's output is 0 wherever the output is 0
        for every rule that gives no relevance to zero inputs, so there it equals the gradient without its
        masking pass. Otherwise (flat, wsquare or zbox after the first layer) the gradient."""
        current = self.switch.current
        assert current is not None
        if not current.composite.relu_identity:
            return self.plain(*args, **kwargs)  # type: ignore[no-any-return]
        if isinstance(self.plain, nn.ReLU):
            inplace = self.plain.inplace
        else:  # F.relu(x, inplace), torch.relu(x), x.relu(), x.relu_()
            inplace = self.op == "Tensor.relu_" or bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
        return PassFunction.apply(x, torch.relu_ if inplace else torch.relu, inplace)  # type: ignore[no-any-return]


class LRPModel(nn.Module):
    """A model ready for LRP: `lrp_model(x)` is the ordinary forward; `lrp_model(x, explain=True, rule=...)`
    returns logits whose backward pass (from a one-hot) leaves the relevance in `x.grad`.

    The wrapped copy is `.module`; its layers keep the qualified names of the original model.
    """

    def __init__(
        self, module: nn.Module, switch: _Switch, explained: dict[str, LRPConv2d | LRPLinear], rows: int
    ) -> None:
        super().__init__()
        self.module = module
        self._rows = rows  # traced nodes; the output's record comes after them
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
            out.register_hook(relevance_hook(current.id, self._rows, OUTPUT_NAME, OUTPUT_TYPE))
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


_MULTI_INPUT = ("sum", "gate")


def _convert(model: nn.Module, share_weights: bool) -> LRPModel:
    """Canonize and trace `model`, give every relevance-carrying node its rule (or refuse), and build the
    explainable graph module."""
    root = canonize(model, share_weights=share_weights)
    graph = trace_model(root)
    modules = dict(root.named_modules())
    plan = plan_graph(graph, modules).nodes
    switch = _Switch()
    explained: dict[str, LRPConv2d | LRPLinear] = {}
    taps, nodes = nn.ModuleList(), nn.ModuleList()
    wrapped: dict[str, RuleNode] = {}
    for node in list(graph.nodes):
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        node_plan = plan.get(node.name)
        if node.op == "call_module" and type(modules[str(node.target)]) in (nn.Conv2d, nn.Linear):
            name = str(node.target)
            source = node.args[0] if node.args else None
            nonnegative = isinstance(source, fx.Node) and source.name in plan and plan[source.name].nonnegative
            layer = _lrp_layer(modules[name], switch, name, nonnegative, node_plan is not None)
            layer._lrp_rectified = _rectified(node, modules)
            _set_submodule(root, name, layer)
            explained[name] = layer
        elif node_plan is not None and node_plan.kind != "gradient":
            if node.op == "call_module":
                name = str(node.target)
                if name not in wrapped:
                    wrapped[name] = RuleNode(switch, node_plan, modules[name])
                    _set_submodule(root, name, wrapped[name])
            else:
                rule_node = RuleNode(switch, node_plan, _callable(node))
                nodes.append(rule_node)
                with graph.inserting_before(node):
                    new = graph.call_module(f"lrp_nodes.{len(nodes) - 1}", tuple(node.args), node.kwargs)
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                node = new
        if node_plan is None:
            continue
        tap = _Tap(switch, len(taps), node_plan.name, node_plan.op)
        taps.append(tap)
        if node_plan.kind in _MULTI_INPUT or not node.args or not isinstance(node.args[0], fx.Node):
            with graph.inserting_after(node):  # relevance at the output of a node with several inputs
                tapped = graph.call_module(f"lrp_taps.{tap.index}", (node,))
            node.replace_all_uses_with(tapped, delete_user_cb=lambda user, tap_node=tapped: user is not tap_node)
        else:
            with graph.inserting_before(node):
                tapped = graph.call_module(f"lrp_taps.{tap.index}", (node.args[0],))
            node.args = (tapped, *node.args[1:])
    if not explained:
        raise UsageError("the model has no Conv2d or Linear layer to explain")
    root.add_module("lrp_taps", taps)
    root.add_module("lrp_nodes", nodes)
    module = fx.GraphModule(root, graph, class_name=type(model).__name__)
    return LRPModel(module.eval(), switch, explained, len(taps))


def _rectified(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """Whether `node`'s output reaches nothing but a ReLU (through folded BatchNorms)."""
    while len(node.users) == 1:
        (node,) = node.users
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if isinstance(module, nn.ReLU) or node.target in (F.relu, torch.relu, "relu", "relu_"):
            return True
        if not isinstance(module, FoldedBatchNorm):
            return False
    return False


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, module)


def _callable(node: fx.Node) -> Callable[..., Any]:
    """The function a call_function node calls, or for a call_method node a function of the tensor."""
    if node.op == "call_method":
        method = str(node.target)
        return lambda x, *args, **kwargs: getattr(x, method)(*args, **kwargs)
    return node.target  # type: ignore[return-value]


def _lrp_layer(
    module: nn.Module, switch: _Switch, name: str, nonnegative: bool, carries: bool
) -> LRPConv2d | LRPLinear:
    """The LRP version of a Conv2d or Linear, sharing its parameters."""
    if isinstance(module, nn.Conv2d):
        return LRPConv2d.from_module(module, switch, name, nonnegative, carries)
    assert isinstance(module, nn.Linear)
    return LRPLinear.from_module(module, switch, name, nonnegative, carries)


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

    The explainer shares the model's weight storage (read-only), and the explainable copy with every other
    explainer of the same model: build a new one after changing the model.
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
        self.lrp = _kept_model(model)
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
    rule `params`, e.g. `explain(model, x, "epsilon-gamma-box", gamma=0.25, mean=..., std=...)`.

    The canonized, traced copy and its prepared weights are kept with `model` (until its weights or modules
    change, or it is deleted), so a loop over `explain` costs what a kept `Explainer` costs.
    """
    explainer = Explainer(model, rule, class_names=class_names, overrides=overrides, **params)
    return explainer.explain(x, target).relevance


_PREPARED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], LRPModel]] = weakref.WeakKeyDictionary()


def _kept_model(model: nn.Module) -> LRPModel:
    """The explainable copy of `model` that its explainers share (one copy of the folded weights and of each
    rule's modified weights, however many rules explain it), rebuilt when a parameter or buffer is replaced or
    changed in place (its version counter), or a module is replaced."""
    key = (
        tuple((name, type(m)) for name, m in model.named_modules()),
        tuple((t.data_ptr(), t._version, t.shape, t.dtype, t.device) for t in itertools.chain(
            model.parameters(), model.buffers())),
    )  # fmt: skip
    cached = _PREPARED.get(model)
    if cached is None or cached[0] != key:
        cached = (key, _convert(model, share_weights=True))
        _PREPARED[model] = cached
    return cached[1]


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
