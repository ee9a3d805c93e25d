"""The model as a torch.fx graph: every call (modules called twice, `F.relu`, `torch.cat`, `out += identity`) is a
node, and every node that carries relevance is given the kind of rule that explains it, or is refused.

    graph = trace_model(model)            # UsageError when torch.fx cannot follow the forward pass
    plan = plan_graph(graph, modules)     # UsageError naming each node without a rule, before any relevance

Kinds (see docs/lrp.md for the maths of each):

- `layer`: Conv2d / Linear, the layer rules of `rules/`;
- `pool`: average pools (modules, `F.avg_pool2d`, `F.adaptive_avg_pool2d`, `mean`): the z-rule on their weights;
- `sum`: `a + b` of two tensors: the z-rule on the sum, `R_a = a / (a + b) R`;
- `shift`: `x + c` for a constant c: the z-rule, `R_x = x / (x + c) R`;
- `scale`: `x * c`, `x / c`, `-x`: relevance unchanged;
- `affine`: a BatchNorm that cannot be folded, `y = s x + t`: the z-rule, `R_x = s x / y R`;
- `activation`: ReLU6, SiLU, Hardswish, GELU, ...: relevance unchanged (the identity rule);
- `relu`: ReLU: the identity rule too, which equals its gradient wherever relevance can arrive; the gradient
  when a rule that gives relevance to zero inputs (flat, wsquare, zbox) explains a layer after the first;
- `gate`: `x * g` with g a sigmoid or hard sigmoid (squeeze-excitation): all relevance to x, none to g;
- `gradient`: ops whose gradient already shares relevance correctly: max pools (winner takes all),
  concatenation, slicing and reshapes (relevance sliced back),
  Dropout and stochastic depth in eval mode, folded BatchNorm (the identity).

Nodes inside a gate's branch carry no relevance and need no rule; `meta` nodes (`x.size(0)`, `x.shape`) carry
no tensor.
"""

from __future__ import annotations

import builtins
import math
import operator
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.ops import stochastic_depth

from smadlrp.core.errors import UsageError

Kind = Literal["layer", "pool", "sum", "shift", "scale", "affine", "activation", "relu", "gate", "gradient"]


class LeafModule:
    """Mixin marking the engine's own modules as leaves of the trace (called, not traced through)."""


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LeafModule) or super().is_leaf_module(m, module_qualified_name)


def trace_model(model: nn.Module) -> fx.Graph:
    """The forward pass of `model` as a torch.fx graph; UsageError with the reason when it cannot be traced."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is a property of the user's model
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"cannot explain {type(model).__name__}: torch.fx cannot trace its forward pass ({reason[:200]}); "
            "LRP needs a forward pass without data-dependent control flow"
        ) from None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UsageError(f"cannot explain {type(model).__name__}: its forward takes {len(placeholders)} inputs, "
                         "LRP explains models of one input tensor")
    return graph


# --- what each op is -------------------------------------------------------------------------------------

_Op = Callable[..., Any] | str
GRADIENT_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Flatten,
    nn.Unflatten, nn.Identity,
)  # fmt: skip
POOL_MODULES: tuple[type[nn.Module], ...] = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)
ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.Mish)
GATE_MODULES: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Hardsigmoid)
LAYER_MODULES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)
NONNEGATIVE_MODULES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid)

_STRUCTURAL: set[_Op] = {
    torch.flatten, torch.reshape, torch.cat, torch.concat, torch.stack, torch.unsqueeze, torch.squeeze,
    torch.transpose, torch.permute, torch.chunk, torch.split, operator.getitem,
    "view", "reshape", "flatten", "contiguous", "unsqueeze", "squeeze", "permute", "transpose", "chunk",
    "split", "clone", "expand", "expand_as",
}  # fmt: skip
_GRADIENT_FUNCTIONS: set[_Op] = {F.max_pool2d, torch.max_pool2d, F.adaptive_max_pool2d}
_RELU_FUNCTIONS: set[_Op] = {F.relu, torch.relu, "relu", "relu_"}
_POOL_FUNCTIONS: set[_Op] = {F.avg_pool2d, F.adaptive_avg_pool2d, torch.mean, "mean"}
_ACTIVATION_FUNCTIONS: set[_Op] = {F.relu6, F.silu, F.hardswish, F.gelu, F.mish}
_GATE_FUNCTIONS: set[_Op] = {torch.sigmoid, F.sigmoid, F.hardsigmoid, "sigmoid"}
_NONNEGATIVE_FUNCTIONS: set[_Op] = {F.relu, torch.relu, "relu", "relu_", F.relu6, *_GATE_FUNCTIONS}
_META: set[_Op] = {"size", "dim", "numel", builtins.getattr, builtins.len}
_ADD: set[_Op] = {operator.add, operator.iadd, torch.add, "add"}
_MUL: set[_Op] = {operator.mul, operator.imul, torch.mul, "mul"}
_DIV: set[_Op] = {operator.truediv, torch.div, "div"}
_SUB: set[_Op] = {operator.sub, operator.isub, torch.sub, "sub"}
# Dropout-like functions: the identity when their `training` argument is False (eval mode).
_EVAL_IDENTITY: dict[_Op, int] = {F.dropout: 2, stochastic_depth: 3}


@dataclass(frozen=True)
class NodePlan:
    """How one node is explained: its `kind`, a readable `name` (qualified module name, or the enclosing
    module's name and the op, e.g. `layer1.0.add`), the `op` as shown in tables, the position of its gate
    operand (gates only), its constant operand (shift and scale), and whether its output is known >= 0."""

    kind: Kind
    name: str
    op: str
    gate_index: int = -1
    constant: float = 0.0
    nonnegative: bool = False


@dataclass(frozen=True)
class GraphPlan:
    """The rule kind of every relevance-carrying node (by fx node name), in forward order."""

    nodes: dict[str, NodePlan]


def _target_key(node: fx.Node) -> _Op | None:
    if node.op == "call_method":
        assert isinstance(node.target, str)
        return node.target
    if node.op == "call_function":
        return node.target  # type: ignore[return-value]
    return None


def _in(key: _Op | None, ops: set[_Op]) -> bool:
    try:
        return key in ops
    except TypeError:  # unhashable target
        return False


def _op_label(node: fx.Node, modules: Mapping[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[str(node.target)]).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", str(target))
    if module in ("_operator", "operator"):
        return f"operator.{name}"
    if module.startswith("torch.nn.functional"):
        return f"F.{name}"
    if module.startswith("torch"):
        return f"torch.{name}"
    return f"{module}.{name}" if module else name


def _short(node: fx.Node) -> str:
    """The op part of a function node's name: `add`, `cat`, `avg_pool2d`."""
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "op")
    return str(name).strip("_")


def _node_names(graph: fx.Graph) -> dict[str, str]:
    """Readable, unique names: a module call is its qualified name, a function call `<module>.<op>`; the second
    and later calls with one name get `#2`, `#3`, ..."""
    names, seen = {}, Counter[str]()
    for node in graph.nodes:
        if node.op == "call_module":
            base = str(node.target)
        elif node.op in ("call_function", "call_method"):
            stack = node.meta.get("nn_module_stack") or {}
            scope = next(reversed(stack), "") if stack else ""
            base = f"{scope}.{_short(node)}" if scope else _short(node)
        else:
            continue
        seen[base] += 1
        names[node.name] = base if seen[base] == 1 else f"{base}#{seen[base]}"
    return names


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _tensor_inputs(node: fx.Node, meta: set[str]) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if n.name not in meta]


def plan_graph(graph: fx.Graph, modules: Mapping[str, nn.Module]) -> GraphPlan:
    """The rule kind of every relevance-carrying node of `graph` (`modules`: qualified name -> module).

    UsageError (one line) listing every node that carries relevance but has no rule, and every Conv2d/Linear
    called more than once, before anything is computed.
    """
    names = _node_names(graph)
    nodes = list(graph.nodes)
    meta: set[str] = set()
    for node in nodes:
        key = _target_key(node)
        inputs = node.all_input_nodes
        if _in(key, _META) or (node.op in ("call_function", "call_method") and inputs
                               and all(n.name in meta for n in inputs)):
            meta.add(node.name)
    gate_sources = {
        node.name for node in nodes
        if (node.op == "call_module" and isinstance(modules[str(node.target)], GATE_MODULES))
        or _in(_target_key(node), _GATE_FUNCTIONS)
    }  # fmt: skip

    # Which nodes carry relevance: every node the output depends on, except through a gate operand.
    carries: set[str] = set()
    gate_index: dict[str, int] = {}
    for node in reversed(nodes):
        if node.op == "output":
            carries.update(n.name for n in _tensor_inputs(node, meta))
            continue
        if node.name not in carries:
            continue
        inputs = _tensor_inputs(node, meta)
        if _in(_target_key(node), _MUL) and len(inputs) == 2 and len(node.args) == 2:
            gates = [i for i, arg in enumerate(node.args) if isinstance(arg, fx.Node) and arg.name in gate_sources]
            if len(gates) == 1:
                gate_index[node.name] = gates[0]
                other = node.args[1 - gates[0]]
                assert isinstance(other, fx.Node)
                carries.add(other.name)
                continue
        carries.update(n.name for n in inputs)

    plans: dict[str, NodePlan] = {}
    refused: list[str] = []
    calls = Counter(str(n.target) for n in nodes if n.op == "call_module")
    nonnegative: set[str] = set()
    for node in nodes:
        if node.name not in carries or node.op in ("placeholder", "get_attr", "output"):
            continue
        plan = _plan_node(node, modules, names[node.name], meta, gate_index, nonnegative)
        if isinstance(plan, str):
            refused.append(f"{names[node.name]} ({plan})")
            continue
        if plan.kind == "layer" and calls[str(node.target)] > 1:
            refused.append(f"{names[node.name]} ({plan.op} called {calls[str(node.target)]} times)")
            continue
        plans[node.name] = plan
        if plan.nonnegative:
            nonnegative.add(node.name)
    if refused:
        raise UsageError(f"cannot explain unsupported layer(s): {', '.join(refused)}; supported: {SUPPORTED}")
    return GraphPlan(plans)


SUPPORTED = (
    "Conv2d, Linear, BatchNorm (folded, or affine), ReLU, ReLU6, SiLU, Hardswish, GELU, Mish, max and average "
    "pools, sums, concatenation, reshapes, Dropout, stochastic depth, gates x * sigmoid(...) (see docs/lrp.md)"
)


def _plan_node(
    node: fx.Node, modules: Mapping[str, nn.Module], name: str, meta: set[str], gate_index: Mapping[str, int],
    nonnegative: set[str],
) -> NodePlan | str:
    """The plan for one relevance-carrying node, or why it has no rule."""
    op = _op_label(node, modules)
    inputs = _tensor_inputs(node, meta)
    keeps_sign = bool(inputs) and all(n.name in nonnegative for n in inputs)

    def plan(kind: Kind, **extra: Any) -> NodePlan:
        return NodePlan(kind, name, op, **extra)

    if node.op == "call_module":
        module = modules[str(node.target)]
        if isinstance(module, LAYER_MODULES):
            return plan("layer")
        if getattr(module, "lrp_kind", None) == "affine":
            return plan("affine")
        if isinstance(module, POOL_MODULES):
            return plan("pool", nonnegative=keeps_sign)
        if isinstance(module, nn.ReLU):
            return plan("relu", nonnegative=True)
        if isinstance(module, ACTIVATION_MODULES):
            return plan("activation", nonnegative=isinstance(module, NONNEGATIVE_MODULES))
        if isinstance(module, GRADIENT_MODULES):
            return plan("gradient", nonnegative=isinstance(module, NONNEGATIVE_MODULES) or keeps_sign)
        if isinstance(module, GATE_MODULES):
            return f"{op}: a sigmoid is explained only as the gate g of x * g"
        return op
    key = _target_key(node)
    if key in _EVAL_IDENTITY:
        position = _EVAL_IDENTITY[key]  # type: ignore[index]
        training = node.kwargs.get("training", node.args[position] if len(node.args) > position else True)
        if training is not False:
            return f"{op} in training mode is random"
        return plan("gradient", nonnegative=keeps_sign)
    if _in(key, _STRUCTURAL):
        return plan("gradient", nonnegative=keeps_sign)
    if _in(key, _RELU_FUNCTIONS):
        return plan("relu", nonnegative=True)
    if _in(key, _GRADIENT_FUNCTIONS):
        return plan("gradient", nonnegative=keeps_sign)
    if _in(key, _POOL_FUNCTIONS):
        return plan("pool", nonnegative=keeps_sign)
    if _in(key, _ACTIVATION_FUNCTIONS):
        return plan("activation", nonnegative=_in(key, _NONNEGATIVE_FUNCTIONS))
    if _in(key, _GATE_FUNCTIONS):
        return f"{op}: a sigmoid is explained only as the gate g of x * g"
    constants = [_number(a) for a in node.args if not isinstance(a, fx.Node)]
    operands = [a for a in node.args if isinstance(a, fx.Node) and a.name not in meta]  # x * x: two operands
    constant = constants[0] if len(operands) == 1 and len(node.args) == 2 and len(constants) == 1 else None
    first_is_tensor = isinstance(node.args[0], fx.Node) if node.args else False
    if _in(key, _ADD) and "alpha" not in node.kwargs:
        if len(operands) == 2 and len(node.args) == 2:
            return plan("sum", nonnegative=keeps_sign)
        if constant is not None:
            return plan("shift", constant=constant)
    if _in(key, _SUB) and "alpha" not in node.kwargs and constant is not None and first_is_tensor:
        return plan("shift", constant=-constant)
    if node.name in gate_index:
        x = node.args[1 - gate_index[node.name]]
        return plan("gate", gate_index=gate_index[node.name], nonnegative=getattr(x, "name", "") in nonnegative)
    if key is operator.neg or key == "neg":
        return plan("scale", constant=-1.0)
    if (_in(key, _MUL) or (_in(key, _DIV) and first_is_tensor)) and constant is not None:
        if constant == 0 or not math.isfinite(constant):
            return f"{op} by {constant:g} has no LRP rule"
        value = 1.0 / constant if _in(key, _DIV) else constant
        return plan("scale", constant=value, nonnegative=keeps_sign and value > 0)
    if _in(key, _MUL) and len(operands) == 2:
        return f"{op} of two tensors has no LRP rule (a product is explained only as a gate x * sigmoid(...))"
    return f"{op}: no LRP rule for this operation"
