"""Composites: which rule explains which layer. Named composites live in one registry.

A method name (`explain(..., rule=...)`) is either a rule key (that rule on every Conv2d/Linear layer, as
TorchLRP did; an input-layer rule such as `zbox` goes on the first layer and LRP-0 on the others) or the name of
a composite below. Layers are counted in the order the forward pass runs them; index 0 is the first layer.

A composite assigns rules by group: `first` (the first layer: a CNN's first convolution, a ViT's patch
embedding), `projection` (the Linear layers of attention: q, k, v and output projections), `conv` and `dense`
(every other Conv2d and Linear layer: in a transformer, the MLPs and the head). A rule parameter prefixed by a
group (`first_gamma=0.25`, `projection_gamma=0.05`) applies to that group's rule only; an unprefixed one to every
rule that takes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from smadlrp.core.errors import UsageError
from smadlrp.lrp.rules import RULES, Rule, Zero, make_rule, rule_parameters

LayerKind = Literal["conv", "dense"]
GROUPS: tuple[str, ...] = ("first", "projection", "conv", "dense")
# How a sum y = a + b of two tensors shares relevance: "z" (R_a = a / y R) or "absolute" (R_a = |a| / (|a| + |b|) R).
SumSplit = Literal["z", "absolute"]
SUM_SPLITS: tuple[str, ...] = ("z", "absolute")
# How attention shares relevance: "cp" (CP-LRP: the attention probabilities are constants, relevance flows to the
# values only) or "attnlrp" (AttnLRP: the softmax rule and the uniform rule on q k^T and A v).
Attention = Literal["cp", "attnlrp"]
ATTENTION_RULES: tuple[str, ...] = ("cp", "attnlrp")
DEFAULT_ATTENTION: Attention = "attnlrp"


@dataclass(frozen=True)
class CompositeSpec:
    """A named rule map: `first` for the first layer (None: no special rule), `conv` for other Conv2d layers,
    `dense` for other Linear layers, `projection` for attention projections (None: as `dense`), and default
    parameters (`defaults`, group-prefixed names allowed) that a user's parameters override."""

    name: str
    summary: str
    first: str | None
    conv: str
    dense: str
    projection: str | None = None
    defaults: tuple[tuple[str, Any], ...] = ()

    def keys(self) -> tuple[str, ...]:
        """The rule keys this composite uses."""
        keys = (self.first, self.conv, self.dense, self.projection)
        return tuple(dict.fromkeys(k for k in keys if k is not None))

    def group_keys(self) -> dict[str, str]:
        """Group -> rule key, for the groups this composite sets."""
        keys = {"first": self.first, "projection": self.projection or self.dense, "conv": self.conv,
                "dense": self.dense}
        return {group: key for group, key in keys.items() if key is not None}


COMPOSITES: dict[str, CompositeSpec] = {
    spec.name: spec
    for spec in (
        CompositeSpec(
            "epsilon-gamma-box", "z^B on the first layer, gamma on convolutions, epsilon on dense layers",
            "zbox", "gamma", "epsilon",
        ),
        CompositeSpec("epsilon-plus", "alpha1beta0 (z+) on convolutions, epsilon on dense layers",
                      None, "alpha1beta0", "epsilon"),
        CompositeSpec("epsilon-plus-flat", "flat on the first layer, then as epsilon-plus",
                      "flat", "alpha1beta0", "epsilon"),
        CompositeSpec("epsilon-alpha2-beta1", "alpha2beta1 on convolutions, epsilon on dense layers",
                      None, "alpha2beta1", "epsilon"),
        CompositeSpec("epsilon-alpha2-beta1-flat", "flat on the first layer, then as epsilon-alpha2-beta1",
                      "flat", "alpha2beta1", "epsilon"),
        CompositeSpec(
            "gamma-transformer", "gamma with its own strength on the patch embedding, the attention projections and "
            "the MLPs", "gamma", "gamma", "gamma", "gamma",
            (("first_gamma", 0.25), ("projection_gamma", 0.0), ("dense_gamma", 0.05)),
        ),
    )
}


@dataclass(frozen=True)
class LayerSlot:
    """An explained layer as a composite sees it: position in the forward pass, qualified name, kind, and
    whether it is an attention projection."""

    index: int
    name: str
    kind: LayerKind
    projection: bool = False


Override = str | Rule


@dataclass(frozen=True, eq=False)
class Composite:
    """A resolved rule map. `overrides` keys are qualified layer names or indices (negative: from the end);
    `sum_split` is how sums of two tensors share relevance (see `SumSplit`), `attention` how attention does
    (see `Attention`)."""

    name: str
    first: Rule | None
    conv: Rule
    dense: Rule
    overrides: Mapping[str | int, Rule] = dataclasses.field(default_factory=dict)
    sum_split: SumSplit = "z"
    attention: Attention = DEFAULT_ATTENTION
    projection: Rule | None = None

    def rule_for(self, slot: LayerSlot, count: int) -> Rule:
        """The rule for `slot` in a model with `count` explained layers."""
        for key in (slot.name, slot.index, slot.index - count):
            if key in self.overrides:
                return self.overrides[key]
        if slot.index == 0 and self.first is not None:
            return self.first
        if slot.projection and self.projection is not None:
            return self.projection
        return self.conv if slot.kind == "conv" else self.dense

    def rules(self) -> Iterator[Rule]:
        """Every rule this composite can assign."""
        yield from (r for r in (self.first, self.conv, self.dense, self.projection) if r is not None)
        yield from self.overrides.values()

    @property
    def relu_identity(self) -> bool:
        """Whether ReLUs may pass relevance unchanged (the identity rule): every rule that can explain a layer
        after the first gives no relevance to zero inputs, so relevance reaches a ReLU's output only where the
        output is not 0, and the identity equals the ReLU's gradient."""
        rest = (self.conv, self.dense, *([self.projection] if self.projection else []), *self.overrides.values())
        return all(r.zero_for_zero_input for r in rest)

    @property
    def signal(self) -> bool:
        """True for signal methods (PatternNet family), whose pools propagate the plain gradient."""
        return self.conv.signal

    def check_layers(self, weights: Mapping[str, Any]) -> None:
        """Refuse overrides naming no explained layer, and rules that cannot explain these layers."""
        names, count = list(weights), len(weights)
        for key in self.overrides:
            if isinstance(key, str) and key not in weights:
                shown = ", ".join(names[:12]) + (", ..." if count > 12 else "")
                raise UsageError(f"override {key!r} names no Conv2d/Linear layer; layers: {shown}")
            if isinstance(key, int) and not -count <= key < count:
                raise UsageError(f"override index {key} is out of range for {count} explained layers")
        for rule in self.rules():
            rule.check_layers(weights)


def method_names() -> tuple[str, ...]:
    """Everything `explain(..., rule=...)` accepts by name: rule keys, then composite names."""
    return (*RULES, *COMPOSITES)


def method_is_signal(method: str) -> bool:
    """Whether `method` is a signal method (PatternNet family): its sums and pools pass the gradient."""
    return any(RULES[key].signal for key in _method_keys(method))


def method_parameters(method: str) -> tuple[str, ...]:
    """Parameter names accepted by the rule or composite `method` (a composite's also prefixed by group)."""
    names = [p for key in _method_keys(method) for p in rule_parameters(key)]
    if method in COMPOSITES:
        names += [f"{g}_{p}" for g, key in COMPOSITES[method].group_keys().items() for p in rule_parameters(key)]
    return tuple(dict.fromkeys(names))


def _method_keys(method: str) -> tuple[str, ...]:
    if method in COMPOSITES:
        return COMPOSITES[method].keys()
    if method in RULES:
        return (method, Zero.key) if RULES[method].input_layer else (method,)
    raise UsageError(f"unknown rule {method!r}; choose one of: {', '.join(method_names())}")


def build_composite(
    method: str | Rule | Composite,
    params: Mapping[str, Any] | None = None,
    overrides: Mapping[str | int, Override] | None = None,
) -> Composite:
    """Resolve a rule key, composite name, Rule or Composite with rule `params` and per-layer `overrides`.

    Each rule receives the parameters it accepts; a parameter no rule accepts is a UsageError. `sum_split` (in
    `params`) chooses how sums share relevance. Override values are rule keys (built with the same parameters)
    or Rule objects.
    """
    params = dict(params or {})
    sum_split = params.pop("sum_split", "z")
    if sum_split not in SUM_SPLITS:
        raise UsageError(f"sum_split must be {' or '.join(SUM_SPLITS)}, got {sum_split!r}")
    attention = params.pop("attention", DEFAULT_ATTENTION)
    if attention not in ATTENTION_RULES:
        raise UsageError(f"attention must be {' or '.join(ATTENTION_RULES)}, got {attention!r}")
    if not isinstance(method, (str, Rule, Composite)):
        raise UsageError(f"rule must be a rule key, composite name, Rule or Composite, got {method!r}")
    if isinstance(method, Composite):
        if params or overrides or sum_split != "z" or attention != DEFAULT_ATTENTION:
            raise UsageError("pass rule parameters and overrides when building the Composite, not with it")
        return method
    override_keys = [v for v in (overrides or {}).values() if isinstance(v, str)]
    keys = (_method_keys(method) if isinstance(method, str) else ()) + tuple(override_keys)
    spec = COMPOSITES.get(method) if isinstance(method, str) else None
    if spec is not None:
        params = {**dict(spec.defaults), **params}
    shared, grouped = _split_groups(params, spec)
    _check_unused(method, keys, shared, grouped)
    built = {key: make_rule(key, **_accepted(key, shared)) for key in dict.fromkeys(keys)}
    resolved = {k: built[v] if isinstance(v, str) else _as_rule(v) for k, v in (overrides or {}).items()}
    options = {"sum_split": sum_split, "attention": attention}
    if isinstance(method, Rule):
        rest_rule = Zero() if method.input_layer else method
        composite = Composite(method.key, method if method.input_layer else None, rest_rule, rest_rule, resolved,
                              **options)  # type: ignore[arg-type]
    elif spec is not None:
        rules = {group: make_rule(key, **_accepted(key, {**shared, **grouped.get(group, {})}))
                 for group, key in spec.group_keys().items()}
        composite = Composite(method, rules.get("first"), rules["conv"], rules["dense"], resolved,
                              projection=rules["projection"], **options)  # type: ignore[arg-type]
    else:
        rule = built[method]
        rest = built[Zero.key] if rule.input_layer else rule
        composite = Composite(method, rule if rule.input_layer else None, rest, rest, resolved,
                              **options)  # type: ignore[arg-type]
    if len({r.signal for r in composite.rules()}) > 1:
        raise UsageError("PatternNet-family rules cannot be mixed with relevance rules in one explanation")
    if composite.signal and sum_split != "z":
        raise UsageError(f"sum_split applies to relevance rules; {composite.name} is a signal, which passes sums "
                         "by the gradient")
    return composite


def _as_rule(value: object) -> Rule:
    if not isinstance(value, Rule):
        raise UsageError(f"an override must be a rule key or a Rule, got {value!r}")
    return value


def _accepted(key: str, params: Mapping[str, Any]) -> dict[str, Any]:
    accepted = rule_parameters(key)
    return {k: v for k, v in params.items() if k in accepted}


def _split_groups(
    params: Mapping[str, Any], spec: CompositeSpec | None
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(parameters for every rule, group -> parameters for that group's rule only): `projection_gamma=0.05` is
    `gamma=0.05` for the projection group. Group prefixes apply to named composites only."""
    shared: dict[str, Any] = {}
    grouped: dict[str, dict[str, Any]] = {}
    for name, value in params.items():
        group = next((g for g in GROUPS if name.startswith(f"{g}_")), None) if spec is not None else None
        if group is None:
            shared[name] = value
        else:
            grouped.setdefault(group, {})[name.removeprefix(f"{group}_")] = value
    return shared, grouped


def _check_unused(method: str | Rule, keys: Sequence[str], params: Mapping[str, Any],
                  grouped: Mapping[str, Mapping[str, Any]]) -> None:
    accepted = {p for key in keys for p in rule_parameters(key)}
    unused = sorted(set(params) - accepted)
    spec = COMPOSITES.get(method) if isinstance(method, str) else None
    group_keys = spec.group_keys() if spec is not None else {}
    for group, values in grouped.items():
        if group not in group_keys:
            unused += [f"{group}_{name} ({method} sets no {group} rule)" for name in values]
            continue
        taken = set(rule_parameters(group_keys[group]))
        unused += [f"{group}_{name}" for name in sorted(set(values) - taken)]
    if unused:
        label = method.key if isinstance(method, Rule) else method
        have = sorted(accepted) + [f"{g}_{p}" for g, k in group_keys.items() for p in rule_parameters(k)]
        raise UsageError(f"{label} does not use parameter(s) {', '.join(unused)} (its parameters: "
                         f"{', '.join(have) or 'none'})")
