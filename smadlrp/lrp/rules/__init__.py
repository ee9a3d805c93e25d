"""LRP rules: each rule is a small frozen dataclass with validated parameters, registered under one key.

A rule says how the relevance `r` (shape of the layer output `z`) that reaches a Conv2d or Linear layer is shared
back onto its input `a`. Every rule is computed with forward passes of the layer with modified weights and
vector-Jacobian products (`LayerOp.vjp`, see `smadlrp.lrp.ops`) of the real layer operation, so any stride,
padding, dilation and groups works. Modified weights depend only on the model: `Rule.prepare` computes them once
per layer and the engine caches them.

`base` holds the `Rule` class and the registry; each other module one rule family. Adding a rule is one class
and one line: subclass `Rule`, decorate it with `@register`. The import order below is the registry's order.
"""

from smadlrp.lrp.ops import ConvOp, DenseOp, LayerOp, LayerState, Prepared, stabilized_divide
from smadlrp.lrp.rules.base import (
    DEFAULT_STABILIZER,
    RULES,
    Rule,
    make_rule,
    register,
    rule_class,
    rule_names,
    rule_parameters,
)

# The rule families register in this order, which is the order of `rule_names()`.
# isort: off
from smadlrp.lrp.rules.basic import Epsilon, Zero
from smadlrp.lrp.rules.gamma import Gamma, GammaEpsilon
from smadlrp.lrp.rules.alphabeta import Alpha2Beta1, AlphaBeta
from smadlrp.lrp.rules.input_layer import Flat, WSquare, ZBox
from smadlrp.lrp.rules.pattern import FIT_PATTERNS_HINT, PatternAttribution, PatternNet
# isort: on

__all__ = [
    "DEFAULT_STABILIZER",
    "FIT_PATTERNS_HINT",
    "RULES",
    "Alpha2Beta1",
    "AlphaBeta",
    "ConvOp",
    "DenseOp",
    "Epsilon",
    "Flat",
    "Gamma",
    "GammaEpsilon",
    "LayerOp",
    "LayerState",
    "PatternAttribution",
    "PatternNet",
    "Prepared",
    "Rule",
    "WSquare",
    "ZBox",
    "Zero",
    "make_rule",
    "register",
    "rule_class",
    "rule_names",
    "rule_parameters",
    "stabilized_divide",
]
