"""The public LRP API: `Explainer` and `explain` for batches, targets resolved from indices or class names."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from smadlrp.core.errors import UsageError
from smadlrp.lrp.composites import Composite, Override
from smadlrp.lrp.conversion import LRPModel, build_lrp_model
from smadlrp.lrp.op_kinds import registry_version
from smadlrp.lrp.rules import Rule

ClassTarget = int | str | Tensor | Sequence[int] | Sequence[str] | None


@dataclass(frozen=True)
class Contrast:
    """A contrastive target for a two-class model: explain `z_target - z_other` (for two classes the log-odds of
    P(target)), "what makes this image more `target` than the other class". One relevance pass: the output
    relevance is +z on the target's logit and -z on the other's, so the relevance of every rule linear in it is
    the difference of the two single-logit explanations, and it is conserved against the logit difference.
    `target`: an index or class name, or one per sample."""

    target: ClassTarget


Target = ClassTarget | Contrast


@dataclass(frozen=True)
class Relevance:
    """One relevance pass: `relevance` (shape of the input; float64 for a float64 model, else float32), `logits`
    (B, K), `target` (B,) int64, and `terms`: the relevance that reached each learned additive term (positional
    embedding, class token), summed per sample, name -> (B,). `total()` is the sum over the input and the terms;
    `contrast`: the target's logit minus the other's was explained (`explained` gives what was explained)."""

    relevance: Tensor
    logits: Tensor
    target: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    contrast: bool = False

    @property
    def explained(self) -> Tensor:
        """(B,): the explained output, the target's logit, or with a contrast its difference to the other's."""
        rows = torch.arange(len(self.logits), device=self.logits.device)
        picked = self.logits[rows, self.target]
        return picked - self.logits[rows, 1 - self.target] if self.contrast else picked

    def total(self) -> Tensor:
        """(B,): the relevance of the input and of every learned term, per sample."""
        total = self.relevance.flatten(1).sum(1)
        for term in self.terms.values():
            total = total + term
        return total


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
        """Relevance of `target` (default: the predicted class; an index, a class name, one per sample, or a
        `Contrast`) for the batch `x` ((B, C, H, W) for convolutional models), computed on the model's device in
        float64 for a float64 model, else in float32."""
        if not isinstance(x, Tensor):
            raise UsageError(f"expected an input tensor, got {type(x).__name__}")
        with torch.inference_mode(False), torch.enable_grad():
            leaf = x.detach().to(self.device, self.lrp.dtype).clone().requires_grad_(True)
            logits, term_leaves = self.lrp.run(leaf, self.composite)
            start, target_index, contrast = start_relevance(logits, target, self.class_names)
            names = list(term_leaves)
            relevance, *term_relevance = torch.autograd.grad(
                logits, [leaf, *term_leaves.values()], start, allow_unused=True)
        terms = {name: (r.flatten(1).sum(1) if r is not None else torch.zeros_like(start[:, 0]))
                 for name, r in zip(names, term_relevance, strict=True)}
        if relevance is None:
            relevance = torch.zeros_like(leaf)
        return Relevance(relevance, logits.detach(), target_index, terms, contrast)


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
    changed in place (its version counter), a module is replaced, or the op-kind registry changes."""
    key = (
        registry_version(),
        tuple((name, type(m)) for name, m in model.named_modules()),
        tuple((t.data_ptr(), t._version, t.shape, t.dtype, t.device) for t in itertools.chain(
            model.parameters(), model.buffers())),
    )  # fmt: skip
    cached = _PREPARED.get(model)
    if cached is None or cached[0] != key:
        cached = (key, build_lrp_model(model, share_weights=True))
        _PREPARED[model] = cached
    return cached[1]


def start_relevance(logits: Tensor, target: Target, class_names: Sequence[str] | None = None
                    ) -> tuple[Tensor, Tensor, bool]:
    """The relevance a pass starts from (shape of `logits`): the target's logit at the target (for a `Contrast`
    also minus the other class's logit at the other), 0 elsewhere; the target index per sample (B,); whether it
    is a contrast."""
    contrast = isinstance(target, Contrast)
    target_index = resolve_target(logits, target.target if isinstance(target, Contrast) else target, class_names)
    rows = torch.arange(len(logits), device=logits.device)
    start = torch.zeros_like(logits)
    start[rows, target_index] = logits.detach()[rows, target_index]
    if contrast:
        if logits.shape[1] != 2:
            raise UsageError(f"a contrastive target explains z_target - z_other of a two-class model; this "
                             f"one has {logits.shape[1]} classes")
        start[rows, 1 - target_index] = -logits.detach()[rows, 1 - target_index]
    return start, target_index, contrast


def resolve_target(logits: Tensor, target: ClassTarget, class_names: Sequence[str] | None = None) -> Tensor:
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
