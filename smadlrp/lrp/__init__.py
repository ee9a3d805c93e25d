"""Layer-wise Relevance Propagation on the traced graph of a CNN or transformer: rules, op kinds, composites,
canonization, engine, tracing.

    import smadlrp.lrp as lrp
    relevance = lrp.explain(model, x, rule="epsilon")              # (B, C, H, W), one pass for the batch
    explainer = lrp.Explainer(model, "epsilon-gamma-box", mean=mean, std=std)
    result = explainer.explain(x, target="morph")                  # needs class_names=... for names

See docs/lrp.md for the maths of every rule and composite.
"""

from smadlrp.lrp.builtin_ops import pass_through
from smadlrp.lrp.canonize import CANONIZATIONS, AffineBatchNorm, FoldedBatchNorm, canonize
from smadlrp.lrp.composites import (
    ATTENTION_RULES,
    COMPOSITES,
    DEFAULT_ATTENTION,
    SUM_SPLITS,
    Composite,
    CompositeSpec,
    LayerSlot,
    build_composite,
    method_is_signal,
    method_names,
    method_parameters,
)
from smadlrp.lrp.conversion import LRPModel, check_supported, convert
from smadlrp.lrp.explainer import Contrast, Explainer, Relevance, explain, resolve_target
from smadlrp.lrp.op_kinds import OP_KINDS, NodeCall, OpKind, register_op, unregister_op
from smadlrp.lrp.rules import RULES, Rule, make_rule, register, rule_names, rule_parameters
from smadlrp.lrp.trace import TraceRecord, collect_and_disable, enable_and_clean, trace

__all__ = [
    "ATTENTION_RULES",
    "AffineBatchNorm",
    "CANONIZATIONS",
    "COMPOSITES",
    "DEFAULT_ATTENTION",
    "OP_KINDS",
    "NodeCall",
    "OpKind",
    "pass_through",
    "register_op",
    "unregister_op",
    "RULES",
    "SUM_SPLITS",
    "Composite",
    "Contrast",
    "CompositeSpec",
    "Explainer",
    "FoldedBatchNorm",
    "LRPModel",
    "LayerSlot",
    "Relevance",
    "Rule",
    "TraceRecord",
    "build_composite",
    "canonize",
    "check_supported",
    "collect_and_disable",
    "convert",
    "enable_and_clean",
    "explain",
    "make_rule",
    "method_is_signal",
    "method_names",
    "method_parameters",
    "register",
    "resolve_target",
    "rule_names",
    "rule_parameters",
    "trace",
]
