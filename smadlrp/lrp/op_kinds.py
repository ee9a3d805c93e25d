"""The registry of op kinds: one entry per kind of graph node the engine explains.

An `OpKind` names the modules, functions and Tensor methods it matches, states its rule in one line, says what
it knows about the sign of its output, and gives the function that applies its rule during a relevance pass:

    lrp.register_op(lrp.OpKind(
        "my_activation", "identity: R_x = R_y", modules=(MyActivation,), sign="any", apply=lrp.pass_through))

`apply` receives a `NodeCall` (the module or function the model calls, its arguments, the plan and the pass) and
returns the node's output with its rule attached as an autograd function (`node_rules`); `apply=None` leaves
the node to autograd, whose gradient already shares relevance correctly (reshapes, slicing, max pools).
`accepts` refines a match by the node's operands (a product of two tensors, a gate, a constant operand): it
returns True, False (not this kind) or the reason the node cannot be explained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, fx, nn

from smadlrp.core.errors import UsageError

# What a kind knows about its output's sign: always >= 0, >= 0 when every carrying input is, or nothing.
Sign = Literal["nonnegative", "keeps", "any"]


@dataclass(frozen=True)
class NodeView:
    """What planning knows about one node: the fx `node`, its `module` (call_module nodes), its `carrying`
    operands (positions in `node.args` of tensors that carry relevance), its numeric operands, its constant
    tensor operands (parameters, buffers, anything computed from them alone) and, for `x * g` with a gate g,
    the gate's position (else -1), and the traced model's `modules` by qualified name."""

    node: fx.Node
    module: nn.Module | None
    carrying: tuple[int, ...]
    numbers: tuple[float, ...]
    constants: tuple[int, ...]
    gate_index: int = -1
    modules: Mapping[str, nn.Module] = field(default_factory=dict)


@dataclass(frozen=True)
class NodePlan:
    """How one node is explained: its `kind` (an `OpKind` name), a readable `name` (qualified module name, or
    the enclosing module's name and the op, e.g. `layer1.0.add`), the `op` as shown in tables, the positions of
    its carrying operands, the gate's position (gates only), and whether its output is known >= 0."""

    kind: str
    name: str
    op: str
    carrying: tuple[int, ...] = ()
    gate_index: int = -1
    nonnegative: bool = False


@dataclass
class NodeCall:
    """One call of a rule-carrying node in a relevance pass: `plain` (the model's module or function), its
    `args` and `kwargs`, the node's `plan`, the pass's `composite` (rules and options) and compute `dtype`."""

    plain: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    plan: NodePlan
    composite: Any
    dtype: torch.dtype

    def operand(self, k: int = 0) -> Tensor:
        """The k-th carrying operand, in the compute dtype."""
        value = self.args[self.plan.carrying[k]]
        assert isinstance(value, Tensor)
        return value.to(self.dtype)

    def without_operands(self) -> NodeCall:
        """This call with None for its carrying operands: what a rule may keep to call `plain` again."""
        args = tuple(None if i in self.plan.carrying else a for i, a in enumerate(self.args))
        return dataclasses.replace(self, args=args)

    def call_with(self, *tensors: Tensor) -> Any:
        """The node's op with its carrying operands replaced by `tensors` (in order), other arguments as given;
        an `inplace` keyword is dropped (a rule never writes into its input)."""
        return self.operation()(*tensors)

    def operation(self) -> Callable[..., Any]:
        """`call_with` as a function that holds no reference to the operands: what a rule keeps for its
        backward pass (holding the call would keep every operand alive as long as the graph)."""
        carrying, plain = self.plan.carrying, self.plain
        others = [None if i in carrying else a for i, a in enumerate(self.args)]
        kwargs = {k: v for k, v in self.kwargs.items() if k != "inplace"}

        def op(*tensors: Tensor) -> Any:
            args = list(others)
            for position, tensor in zip(carrying, tensors, strict=True):
                args[position] = tensor
            return plain(*args, **kwargs)

        return op


Apply = Callable[[NodeCall], Tensor]
Accepts = Callable[[NodeView], "bool | str"]


@dataclass(frozen=True)
class OpKind:
    """One kind of node: what it matches (`modules`: classes, matched with isinstance; `functions`: torch
    functions and Tensor method names), its `rule` in one line, its `sign`, `apply` for relevance rules (None:
    the gradient), `signal` for signal methods (PatternNet family; None: the plain op), and `accepts`, which
    refines a match (see the module docstring)."""

    name: str
    rule: str
    modules: tuple[type[nn.Module], ...] = ()
    functions: tuple[Any, ...] = ()
    sign: Sign = "any"
    apply: Apply | None = None
    signal: Apply | None = None
    accepts: Accepts | None = None
    _function_set: frozenset[Any] = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_function_set", frozenset(_hashable(self.functions)))

    def matches(self, node: fx.Node, module: nn.Module | None) -> bool:
        """Whether `node` calls one of this kind's modules, functions or methods."""
        if node.op == "call_module":
            return module is not None and isinstance(module, self.modules)
        if node.op in ("call_function", "call_method"):
            try:
                return node.target in self._function_set
            except TypeError:  # an unhashable target
                return False
        return False


def _hashable(items: Sequence[Any]) -> list[Any]:
    out = []
    for item in items:
        try:
            hash(item)
        except TypeError:
            raise UsageError(f"op kind function {item!r} is not hashable") from None
        out.append(item)
    return out


OP_KINDS: dict[str, OpKind] = {}
# Kinds a PatternNet-family signal cannot pass (no signal is defined through them).
NON_SIGNAL_KINDS = ("norm", "softmax", "product", "gmm-head")
_CHANGES = [0]  # registry changes so far: explainable copies built before a change are rebuilt


def registry_version() -> int:
    """A number that changes whenever the registry does."""
    return _CHANGES[0]


def register_op(kind: OpKind, *, before: str | None = None) -> OpKind:
    """Add `kind` to the registry (matched in registry order; `before` places it ahead of an existing kind, so
    that a user's module wins over a built-in kind that would match it too). A kind of the same name is
    replaced. Returns the kind."""
    if not isinstance(kind, OpKind):
        raise UsageError(f"register_op takes an OpKind, got {type(kind).__name__}")
    if before is not None and before not in OP_KINDS:
        raise UsageError(f"no op kind {before!r} to register before; kinds: {', '.join(OP_KINDS)}")
    entries = [(name, k) for name, k in OP_KINDS.items() if name != kind.name]
    at = next((i for i, (name, _) in enumerate(entries) if name == before), len(entries))
    entries.insert(at, (kind.name, kind))
    OP_KINDS.clear()
    OP_KINDS.update(entries)
    _CHANGES[0] += 1
    return kind


def unregister_op(name: str) -> None:
    """Remove the kind `name` from the registry (KeyError when absent)."""
    del OP_KINDS[name]
    _CHANGES[0] += 1
