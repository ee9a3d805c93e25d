"""Planning on the traced graph: every node that carries relevance is given the op kind that explains it
(`op_kinds.OP_KINDS`, the built-in kinds in `builtin_ops`), or the model is refused.

    graph = trace_model(model)          # UsageError when torch.fx cannot follow the forward pass
    plan = plan_graph(graph, model)     # UsageError naming each node without a rule, before any relevance

What needs no rule: `meta` nodes (`x.size(0)`, `x.shape`) carry no tensor; constants (parameters, buffers, and
anything computed from them and from shapes alone: a relative position bias, an attention mask) carry no
relevance; nodes inside a gate's branch carry none either. A learned parameter that enters the computation as an
additive term with a leading batch dimension of 1 (a positional embedding, a class token) is an input of the
explanation: its relevance is reported as its own term (`GraphPlan.terms`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from torch import fx, nn

import smadlrp.lrp.builtin_ops as builtin
from smadlrp.core.errors import UsageError
from smadlrp.lrp.op_kinds import OP_KINDS, NodePlan, NodeView, OpKind
from smadlrp.lrp.tracing import LeafModule, trace_model

__all__ = ["GraphPlan", "LeafModule", "NodePlan", "plan_graph", "trace_model"]


@dataclass(frozen=True)
class GraphPlan:
    """The op kind of every relevance-carrying node (by fx node name), in forward order, and the learned
    additive terms (consumer node name -> {constant input node name -> parameter name})."""

    nodes: dict[str, NodePlan]
    terms: dict[str, dict[str, str]]


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


def _classify(nodes: list[fx.Node]) -> tuple[set[str], set[str]]:
    """(meta, constants): nodes that carry no tensor (sizes, shapes, asserts), and tensors that do not depend on
    the input (parameters, buffers, and what is computed from them and from meta nodes alone)."""
    meta: set[str] = set()
    constants: set[str] = set()
    for node in nodes:
        if node.op == "get_attr":
            constants.add(node.name)
            continue
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        inputs = node.all_input_nodes
        if node.target in builtin.META_FUNCTIONS or (inputs and all(n.name in meta for n in inputs)):
            meta.add(node.name)
        elif all(n.name in meta or n.name in constants for n in inputs):
            constants.add(node.name)
    return meta, constants


def _is_gate_source(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], builtin.GATE_MODULES)
    return node.op in ("call_function", "call_method") and node.target in builtin.GATE_FUNCTIONS


def plan_graph(graph: fx.Graph, root: nn.Module) -> GraphPlan:
    """The op kind of every relevance-carrying node of `graph` (traced from `root`).

    UsageError (one line) listing every node that carries relevance but has no rule, and every Conv2d/Linear
    called more than once, before anything is computed.
    """
    modules = dict(root.named_modules())
    names = _node_names(graph)
    nodes = list(graph.nodes)
    meta, constants = _classify(nodes)
    quiet = meta | constants
    gate_sources = {node.name for node in nodes if _is_gate_source(node, modules)}

    # Which nodes carry relevance: every node the output depends on, except through a gate operand.
    carries: set[str] = set()
    gate_index: dict[str, int] = {}
    for node in reversed(nodes):
        if node.op == "output":
            carries.update(n.name for n in node.all_input_nodes if n.name not in quiet)
        if node.name not in carries or node.op == "output":
            continue
        operands = [i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and a.name not in quiet]
        gates = [i for i in operands if node.args[i].name in gate_sources]  # type: ignore[union-attr]
        if node.target in builtin.MUL_FUNCTIONS and len(operands) == 2 and len(node.args) == 2 and len(gates) == 1:
            gate_index[node.name] = gates[0]
            other = node.args[1 - gates[0]]
            assert isinstance(other, fx.Node)
            carries.add(other.name)
            continue
        carries.update(n.name for n in node.all_input_nodes if n.name not in quiet)

    plans: dict[str, NodePlan] = {}
    refused: list[str] = []
    calls = Counter(str(n.target) for n in nodes if n.op == "call_module")
    nonnegative: set[str] = set()
    for node in nodes:
        if node.name not in carries or node.op in ("placeholder", "get_attr", "output"):
            continue
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        carrying = tuple(i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and a.name in carries)
        if node.name in gate_index:
            carrying = (1 - gate_index[node.name],)
        view = NodeView(
            node, module, carrying,
            numbers=tuple(n for n in (_number(a) for a in node.args) if n is not None),
            constants=tuple(i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and a.name in quiet),
            gate_index=gate_index.get(node.name, -1), modules=modules,
        )  # fmt: skip
        op = _op_label(node, modules)
        found = _find_kind(view)
        if isinstance(found, str):
            refused.append(f"{names[node.name]} ({op}{': ' + found if found else ': no LRP rule for this operation'})")
            continue
        if found.name == "layer" and calls[str(node.target)] > 1:
            refused.append(f"{names[node.name]} ({op} called {calls[str(node.target)]} times)")
            continue
        inputs_nonnegative = bool(carrying) and all(
            node.args[i].name in nonnegative for i in carrying  # type: ignore[union-attr]
        ) and not any(isinstance(a, (list, tuple)) for a in node.args)
        positive = found.sign == "nonnegative" or (found.sign == "keeps" and inputs_nonnegative)
        plans[node.name] = NodePlan(found.name, names[node.name], op, carrying, view.gate_index, positive)
        if positive:
            nonnegative.add(node.name)
    if refused:
        raise UsageError(f"cannot explain unsupported layer(s): {', '.join(refused)}; supported: {supported()}")
    return GraphPlan(plans, _terms(nodes, carries, meta, constants, root, plans))


def _find_kind(view: NodeView) -> OpKind | str:
    """The first registered kind that matches `view` and accepts it, or the reason none does ('' for none)."""
    reason = ""
    for kind in OP_KINDS.values():
        if not kind.matches(view.node, view.module):
            continue
        verdict = True if kind.accepts is None else kind.accepts(view)
        if verdict is True:
            return kind
        if isinstance(verdict, str) and not reason:
            reason = verdict
    return reason


def _terms(nodes: list[fx.Node], carries: set[str], meta: set[str], constants: set[str], root: nn.Module,
           plans: Mapping[str, NodePlan]) -> dict[str, dict[str, str]]:
    """Learned additive terms: parameters that reach a relevance-carrying sum or concatenation through constants
    of one tensor input each (`expand(B, -1, -1)`, `view`, `to`), as consumer node -> {constant input node ->
    parameter name}; any shape (a class token (1, 1, D) or (D,), a positional embedding (1, N, D) or (N, D))."""
    terms: dict[str, dict[str, str]] = {}
    for node in nodes:
        if node.name not in carries or node.name not in plans or plans[node.name].kind not in ("sum", "gradient"):
            continue
        for operand in node.all_input_nodes:
            if operand.name not in constants:
                continue
            source = operand
            while source.op != "get_attr":
                tensors = [n for n in source.all_input_nodes if n.name not in meta]
                if len(tensors) != 1 or tensors[0].name not in constants:
                    break
                source = tensors[0]
            if source.op == "get_attr" and isinstance(_attribute(root, str(source.target)), nn.Parameter):
                terms.setdefault(node.name, {})[operand.name] = str(source.target)
    return terms


def _attribute(root: nn.Module, target: str) -> object:
    owner, _, attr = target.rpartition(".")
    return getattr(root.get_submodule(owner), attr, None)


def supported() -> str:
    """The op kinds of the registry, for messages."""
    return f"op kinds {', '.join(OP_KINDS)} (docs/lrp.md lists what each matches)"
