"""Conversion of a model into its explainable `LRPModel`: canonize, trace, give every relevance-carrying node its rule.

The copy is canonized (attention written out, BatchNorm folded or made affine, see `canonize`) and traced with
torch.fx (`graph`). Every node that carries relevance gets an op kind before anything runs, or the model is
refused: Conv2d/Linear layers and nodes with rules of their own become the modules of `layers`; max pools,
concatenations, reshapes and Dropout are left to autograd, whose gradient already shares relevance correctly;
learned additive terms become `Term`s. The backward pass of the target logit, started with one-hot x logit,
then carries relevance (not gradient) to the input and the terms.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from smadlrp.core.errors import UsageError
from smadlrp.lrp.canonize import FoldedBatchNorm, canonize
from smadlrp.lrp.composites import Composite, Override, build_composite
from smadlrp.lrp.graph import plan_graph, trace_model
from smadlrp.lrp.layers import LRPConv2d, LRPLinear, RelevancePass, RuleNode, Switch, Tap, Term
from smadlrp.lrp.op_kinds import NON_SIGNAL_KINDS, OP_KINDS, NodePlan
from smadlrp.lrp.rules import Rule
from smadlrp.lrp.trace import OUTPUT_NAME, OUTPUT_TYPE, relevance_hook

# Kinds through which a PatternNet-family signal is not defined (Kindermans et al. 2018 derive it for linear layers
# and rectifiers): on a transformer it grows from block to block until it overflows.


def check_signal_model(nodes: Mapping[str, NodePlan]) -> None:
    """UsageError (one line) when the planned graph has a node a PatternNet-family signal cannot pass."""
    blocking = [plan for plan in nodes.values() if plan.kind in NON_SIGNAL_KINDS]
    if blocking:
        raise UsageError(
            f"PatternNet and PatternAttribution are defined for linear layers and rectifiers; this model has "
            f"{len(blocking)} normalisation, attention or mixture node(s) (e.g. {blocking[0].name}: "
            f"{blocking[0].op}), through which their signal is not defined: use an LRP rule or composite")


def check_supported(model: nn.Module) -> None:
    """UsageError (one line) naming every node of `model`'s graph that carries relevance but has no LRP rule,
    or why the model cannot be traced; nothing is computed."""
    root = canonize(model, share_weights=True)
    plan_graph(trace_model(root), root)


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


class LRPModel(nn.Module):
    """A model ready for LRP: `lrp_model(x)` is the ordinary forward; `lrp_model(x, explain=True, rule=...)`
    returns logits whose backward pass (from a one-hot) leaves the relevance in `x.grad`.

    The wrapped copy is `.module`; its layers keep the qualified names of the original model.
    """

    def __init__(
        self, module: nn.Module, switch: Switch, explained: dict[str, LRPConv2d | LRPLinear], rows: int,
        plan: Mapping[str, NodePlan],
    ) -> None:
        super().__init__()
        self.module = module
        self._plan = plan
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
        out = _StartFunction.apply(self.run(x, composite)[0])
        assert isinstance(out, Tensor)
        return out

    @property
    def plan(self) -> Mapping[str, NodePlan]:
        """How each relevance-carrying node of the traced graph is explained, by fx node name."""
        return self._plan

    @property
    def switch(self) -> Switch:
        """The switch its rule-carrying modules share (`current`: the relevance pass in progress)."""
        return self._switch

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
        if composite.signal:
            check_signal_model(self._plan)
        composite.check_layers({name: layer.weight for name, layer in self._explained.items()})
        return composite

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of relevance: float64 for a float64 model, else float32."""
        return torch.float64 if next(self.parameters()).dtype == torch.float64 else torch.float32

    def run(self, x: Tensor, composite: Composite) -> tuple[Tensor, dict[str, Tensor]]:
        """The forward pass with `composite`'s rules attached: the logits (B, K) and the leaves of the learned
        additive terms (name -> (B, ...)), whose gradient after the backward pass is their relevance."""
        self._check_input(x)
        if self._switch.current is not None:
            raise RuntimeError("this model is already running a relevance pass")
        current = RelevancePass(composite, len(self._explained), self.dtype, len(x))
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
        return out, current.terms

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


def build_lrp_model(model: nn.Module, share_weights: bool) -> LRPModel:
    """Canonize and trace `model`, give every relevance-carrying node its op kind (or refuse), and build the
    explainable graph module."""
    root = canonize(model, share_weights=share_weights)
    graph = trace_model(root)
    planned = plan_graph(graph, root)
    plan, modules = planned.nodes, dict(root.named_modules())
    projections = _attention_projections(graph, plan)
    recomputed = _recomputed_activations(graph, plan, modules)
    recomputing = {name for names in recomputed.values() for name in names} | _norm_readers(graph, plan, modules)
    switch = Switch()
    explained: dict[str, LRPConv2d | LRPLinear] = {}
    taps, nodes, terms = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
    wrapped: dict[str, RuleNode] = {}
    names = {n.name: n for n in graph.nodes}
    for node in list(graph.nodes):
        entering = planned.terms.get(node.name, {})
        for operand, parameter in entering.items():
            like = next(n for n in node.all_input_nodes if n.name not in entering)  # carrying: gives the batch
            terms.append(Term(switch, parameter))
            with graph.inserting_before(node):
                term = graph.call_module(f"lrp_terms.{len(terms) - 1}", (names[operand], like))
            node.replace_input_with(names[operand], term)
        node_plan = plan.get(node.name)
        if node.op == "call_module" and isinstance(modules[str(node.target)], (nn.Conv2d, nn.Linear)):
            # every layer, also inside a gate's branch (which carries no relevance): layers count in composites
            name = str(node.target)
            source = node.args[0] if node.args else None
            nonnegative = isinstance(source, fx.Node) and source.name in plan and plan[source.name].nonnegative
            layer = _lrp_layer(modules[name], switch, name, nonnegative, node_plan is not None)
            layer._lrp_rectified = _rectified(node, modules)
            layer._lrp_projection = node.name in projections
            layer._lrp_recompute = _feeds_a_copy(node, plan) and not any(u.name in recomputed for u in node.users)
            layer._lrp_input_recompute = node.name in recomputing
            _set_submodule(root, name, layer)
            explained[name] = layer
        if node_plan is None:
            continue
        kind = OP_KINDS[node_plan.kind]
        if node_plan.kind != "layer" and (kind.apply is not None or kind.signal is not None):
            if node.op == "call_module":
                name = str(node.target)
                if name not in wrapped:
                    wrapped[name] = RuleNode(switch, node_plan, kind, modules[name])
                    _set_submodule(root, name, wrapped[name])
                wrapped[name].marks_output = node.name in recomputed
            else:
                rule_node = RuleNode(switch, node_plan, kind, _callable(node))
                rule_node.marks_output = node.name in recomputed
                nodes.append(rule_node)
                with graph.inserting_before(node):
                    new = graph.call_module(f"lrp_nodes.{len(nodes) - 1}", tuple(node.args), node.kwargs)
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                node = new
        tap = Tap(switch, len(taps), node_plan.name, node_plan.op)
        taps.append(tap)
        if node_plan.carrying != (0,):  # relevance at the output of a node with several inputs
            with graph.inserting_after(node):
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
    root.add_module("lrp_terms", terms)
    module = fx.GraphModule(root, graph, class_name=type(model).__name__)
    return LRPModel(module.eval(), switch, explained, len(taps), plan)


_PASSING = ("gradient", "scale")  # kinds that only move or scale values


def _attention_projections(graph: fx.Graph, plan: Mapping[str, NodePlan]) -> set[str]:
    """The layer nodes that are attention projections: their output reaches a product (q, k, v) or their input
    comes from one (the output projection) through reshapes and scalings only."""

    def reaches(node: fx.Node, forward: bool) -> bool:
        seen, todo = set(), [node]
        while todo:
            current = todo.pop()
            for other in (current.users if forward else current.all_input_nodes):
                kind = plan[other.name].kind if other.name in plan else None
                if kind == "product":
                    return True
                if kind in _PASSING and other.name not in seen:
                    seen.add(other.name)
                    todo.append(other)
        return False

    layers = [n for n in graph.nodes if n.name in plan and plan[n.name].kind == "layer"]
    return {n.name for n in layers if reaches(n, True) or reaches(n, False)}


def _module(node: fx.Node, modules: Mapping[str, nn.Module]) -> nn.Module | None:
    return modules.get(str(node.target)) if node.op == "call_module" else None


def _plain_layer(node: fx.Node, plan: Mapping[str, NodePlan], modules: Mapping[str, nn.Module]) -> bool:
    """A Conv2d (zero padding) or Linear layer node that carries relevance."""
    m = _module(node, modules)
    if isinstance(m, nn.Conv2d):
        return m.padding_mode == "zeros" and not isinstance(m.padding, str) and node.name in plan
    return isinstance(m, nn.Linear) and node.name in plan


def _layers_after(node: fx.Node, plan: Mapping[str, NodePlan], modules: Mapping[str, nn.Module]) -> list[str]:
    """The layer nodes reading `node`'s output as their input (through eval-mode Dropout or Identity), when
    nothing else reads it; [] otherwise."""
    found: list[str] = []
    for user in node.users:
        if isinstance(_module(user, modules), (nn.Dropout, nn.Identity)):  # eval mode: the same tensor passes
            below = _layers_after(user, plan, modules)
            if not below:
                return []
            found += below
        elif _plain_layer(user, plan, modules) and user.args[0] is node:
            found.append(user.name)
        else:
            return []
    return found


def _recomputed_activations(graph: fx.Graph, plan: Mapping[str, NodePlan], modules: Mapping[str, nn.Module]
                            ) -> dict[str, list[str]]:
    """The activations between layers, `layer -> activation [-> Dropout] -> layers` (the MLP of a ViT, Swin or
    ConvNeXt), whose output the layers after them (listed by node name) compute again from the layer before's
    output instead of keeping it: that layer then keeps its own output, which it would otherwise compute again
    (a product costs more than an activation)."""
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    chains: dict[str, list[str]] = {}
    for node in graph.nodes:
        if node.name not in plan or plan[node.name].kind != "activation" or len(node.args) != 1:
            continue
        inplace = getattr(_module(node, modules), "inplace", False) or node.kwargs.get("inplace")
        if inplace or calls[str(node.target)] > 1:
            continue
        (source,) = node.args
        if isinstance(source, fx.Node) and _plain_layer(source, plan, modules) and list(source.users) == [node]:
            after = _layers_after(node, plan, modules)
            if after:
                chains[node.name] = after
    return chains


def _norm_readers(graph: fx.Graph, plan: Mapping[str, NodePlan], modules: Mapping[str, nn.Module]) -> set[str]:
    """The layers that read a normalisation's output and nothing else does (a transformer's norm before its
    attention projections or MLP): they compute their input again from the norm's input, which the norm keeps
    (see `builtin_ops`), instead of keeping it."""
    norms = (n for n in graph.nodes if n.name in plan and plan[n.name].kind == "norm")
    return {name for n in norms for name in _layers_after(n, plan, modules)}


def _feeds_a_copy(node: fx.Node, plan: Mapping[str, NodePlan]) -> bool:
    """Whether `node`'s output reaches nothing but an element-wise activation that writes a new tensor (through
    folded BatchNorms), so that no other node keeps it."""
    while len(node.users) == 1:
        (node,) = node.users
        kind = plan[node.name].kind if node.name in plan else None
        if kind in ("activation", "relu6"):
            return True
        if kind != "gradient" or node.op != "call_module":  # FoldedBatchNorm, Identity, Dropout
            return False
    return False


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
    module: nn.Module, switch: Switch, name: str, nonnegative: bool, carries: bool
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
    return build_lrp_model(model, share_weights=False)
