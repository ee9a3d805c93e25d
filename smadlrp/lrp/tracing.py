"""The model's forward pass as a torch.fx graph, with the engine's own modules kept as leaves.

    graph = trace_model(model)    # UsageError when torch.fx cannot follow the forward pass
"""

from __future__ import annotations

import inspect

from torch import fx, nn

from smadlrp.core.errors import UsageError
from smadlrp.lrp.op_kinds import OP_KINDS


class LeafModule:
    """Mixin marking the engine's own modules as leaves of the trace (called, not traced through)."""


class _Tracer(fx.Tracer):
    """Keeps as single calls: torch.nn's modules, the engine's own, and every module class an op kind names
    exactly (a user's registered module; a subclass is traced through, as it may compute something else)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, LeafModule) or any(type(m) in kind.modules for kind in OP_KINDS.values()):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _optional_arguments(model: nn.Module) -> dict[str, object]:
    """The forward's arguments after the first that have defaults (e.g. timm's `attn_mask=None`), fixed to them."""
    parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    return {p.name: p.default for p in parameters
            if p.default is not inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_KEYWORD}


def trace_model(model: nn.Module) -> fx.Graph:
    """The forward pass of `model` as a torch.fx graph, optional forward arguments at their defaults; UsageError
    with the reason when it cannot be traced."""
    fixed = _optional_arguments(model)
    try:
        graph = _Tracer().trace(model, concrete_args=fixed or None)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is a property of the user's model
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"cannot explain {type(model).__name__}: torch.fx cannot trace its forward pass ({reason[:200]}); "
            "LRP needs a forward pass without data-dependent control flow"
        ) from None
    placeholders = [n for n in graph.nodes if n.op == "placeholder" and not n.args]  # args: a fixed default
    if len(placeholders) != 1:
        raise UsageError(f"cannot explain {type(model).__name__}: its forward takes {len(placeholders)} inputs, "
                         "LRP explains models of one input tensor")
    return graph
