"""Conditional relevance (CRP, Achtibat et al. 2023): the relevance that passes through one channel (concept) of a
layer, for many concepts at once.

    concepts = ConceptExplainer(explainer, x[:1], layer=None)       # default: last conv / last block output
    scan = concepts.layer_relevance(x, target="morph")               # (B, C) relevance per channel at the layer
    cond = concepts.conditional(x, images=[0, 0, 1], channels=[3, 7, 3], target="morph")
    cond.relevance                                                   # (3, C_in, H, W): one input map per row

The layer is a node of the traced graph that every path from the input to the output passes through (a "cut":
a convolution of a plain CNN, a residual block's sum, a dense block's concatenation, a transformer block's
output), so the conditional relevances of all its channels add up to the whole explanation.

One forward pass serves a batch of concepts: each image runs once, and a `Cut` module inserted after the layer's
node makes its output a fresh leaf for the graph above. The relevance above the layer is computed once per image;
each (image, concept) row gets a copy of it masked to the row's channel, and one batched backward pass carries all
rows below the layer: the masked copies are a batch of gradients (`torch.autograd.grad(..., is_grads_batched=True)`,
a vmap over the backward pass), so the activations and each rule's modified forward products are computed once and
only the per-concept products run once per row. Where a rule meets an op without a batching rule, the stacked pass
serves instead: below the layer one row per (image, concept) in the forward pass too. Either way a further concept
costs at most one relevance pass below the layer, never a pass above it.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from smadlrp.core.errors import UsageError, shorten
from smadlrp.lrp.conversion import LRPModel
from smadlrp.lrp.explainer import Contrast, Explainer, start_relevance
from smadlrp.lrp.layers import RuleNode
from smadlrp.lrp.op_kinds import NodePlan
from smadlrp.lrp.tracing import LeafModule

ConceptTarget = int | str | Contrast | None
_UNBATCHABLE = ("vmap", "Batching rule", "batched", "Batched")  # a batched pass met an op it cannot batch
CANDIDATE_KINDS = ("layer", "sum")  # and concatenations: the nodes offered as concept layers
ATTENTION_KINDS = ("product", "softmax")  # a graph with these is a transformer: its default is the last block


@dataclass(frozen=True)
class ConceptLayer:
    """A node whose output channels can be concepts: its readable `name` (as `smadlrp trace` lists it), `op`,
    op `kind`, the fx node in the explainable graph, the per-sample output `shape` (no batch dimension) and the
    dimension of a batch (B, *shape) that holds the channels."""

    name: str
    op: str
    kind: str
    node: str
    shape: tuple[int, ...]
    channel_dim: int

    @property
    def channels(self) -> int:
        """Number of concepts (channels) of the layer."""
        return self.shape[self.channel_dim - 1]

    @property
    def unit(self) -> str:
        """What one concept is, in words: e.g. `channel of the (512, 14, 14) output, relevance summed over its
        14 x 14 positions`, or for a transformer block `feature (last dimension) of the (197, 768) output, relevance
        summed over its 197 tokens`."""
        shape = tuple(self.shape)
        rest = " x ".join(str(n) for d, n in enumerate(self.shape, start=1) if d != self.channel_dim)
        if len(shape) == 1:
            return f"feature of the {shape} output"
        if self.channel_dim == 1:
            return f"channel of the {shape} output, relevance summed over its {rest} positions"
        where = "tokens" if len(shape) == 2 else "positions"
        return f"{'feature' if len(shape) == 2 else 'channel'} (last dimension) of the {shape} output, relevance " \
               f"summed over its {rest} {where}"

    def per_channel(self, values: Tensor) -> Tensor:
        """(N, *shape) -> (N, C): each channel's sum over every other dimension."""
        return values.movedim(self.channel_dim, 1).flatten(2).sum(2) if values.dim() > 2 else values

    def mask(self, channels: Tensor) -> Tensor:
        """(R,) channel indices -> (R, ...) one-hot masks that broadcast over a (R, *shape) relevance."""
        shape = [len(channels)] + [1] * len(self.shape)
        shape[self.channel_dim] = self.channels
        return torch.nn.functional.one_hot(channels, self.channels).view(shape)


_LAYERS: weakref.WeakKeyDictionary[LRPModel, dict[tuple[int, ...], dict[str, ConceptLayer]]] = (
    weakref.WeakKeyDictionary())
_CUTS: weakref.WeakKeyDictionary[LRPModel, dict[str, Cut]] = weakref.WeakKeyDictionary()


def _node_plan(lrp: LRPModel, node: fx.Node, modules: dict[str, nn.Module]) -> NodePlan | None:
    plan = lrp.plan.get(node.name)
    module = modules.get(str(node.target)) if node.op == "call_module" else None
    if plan is None and isinstance(module, RuleNode):
        return module.plan  # a function node the engine replaced by a rule node
    return plan


def _carrying_inputs(node: fx.Node, plan: NodePlan | None, carriers: set[str]) -> list[fx.Node]:
    """The inputs relevance flows to: those that carry relevance (not sizes, constants or a gate's branch), and of a
    gate only the gated operand."""
    if plan is not None and plan.gate_index >= 0:
        other = node.args[1 - plan.gate_index]
        return [other] if isinstance(other, fx.Node) else []
    return [i for i in node.all_input_nodes if i.name in carriers]


def _cuts(nodes: list[fx.Node], inputs: dict[str, list[fx.Node]]) -> set[str]:
    """The nodes every path from the input to the output passes through. In topological order a node at position
    p is one unless an edge of an input-to-output path jumps over p."""
    position = {n.name: i for i, n in enumerate(nodes)}
    reached = {n.name for n in nodes if n.op == "placeholder"}
    for node in nodes:
        if any(i.name in reached for i in inputs[node.name]):
            reached.add(node.name)
    useful = {n.name for n in nodes if n.op == "output"}
    for node in reversed(nodes):
        if node.name in useful:
            useful.update(i.name for i in inputs[node.name])
    live = reached & useful
    cover = [0] * (len(nodes) + 1)
    for node in nodes:
        for i in inputs[node.name]:
            if node.name in live and i.name in live and position[node.name] - position[i.name] > 1:
                cover[position[i.name] + 1] += 1
                cover[position[node.name]] -= 1
    running, cuts = 0, set()
    for node in nodes:
        running += cover[position[node.name]]
        if running == 0 and node.name in live and node.op not in ("placeholder", "output"):
            cuts.add(node.name)
    return cuts


def _nearest_layer(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The Conv2d or Linear closest above `node` in the data flow (itself included)."""
    todo, seen = [node], {node.name}
    while todo:
        current = todo.pop(0)
        module = modules.get(str(current.target)) if current.op == "call_module" else None
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            return module
        for i in current.all_input_nodes:
            if i.name not in seen:
                seen.add(i.name)
                todo.append(i)
    return None


def _channel_dim(shape: tuple[int, ...], layer: nn.Module | None) -> int:
    """The channel dimension of a (B, *shape) output: 1 after a convolution (channels first) unless the shape says
    otherwise, the last after a Linear (tokens, channels last) unless its width sits at dimension 1."""
    if len(shape) <= 1:
        return 1
    if isinstance(layer, nn.Conv2d):
        return 1 if shape[0] == layer.out_channels or shape[-1] != layer.out_channels else len(shape)
    width = layer.out_features if isinstance(layer, nn.Linear) else -1
    if shape[-1] != width and shape[0] == width:
        return 1
    return len(shape)


def concept_layers(lrp: LRPModel, example: Tensor) -> dict[str, ConceptLayer]:
    """The concept layers of `lrp` in forward order, by readable name: nodes every input-to-output path passes
    through that are a Conv2d/Linear, a sum or a concatenation and feed more than the output; `example` (one input,
    (1, ...)) gives their shapes (one ordinary forward pass, kept per input shape)."""
    key = tuple(example.shape[1:])
    known = _LAYERS.setdefault(lrp, {})
    if key in known:
        return known[key]
    module = lrp.module
    assert isinstance(module, fx.GraphModule)
    modules = dict(module.named_modules())
    nodes = list(module.graph.nodes)
    plans = {n.name: _node_plan(lrp, n, modules) for n in nodes}
    carriers = {n.name for n in nodes if n.op == "placeholder" or plans[n.name] is not None or (
        n.op == "call_module" and isinstance(modules[str(n.target)], LeafModule))}  # taps, terms, cuts
    inputs = {n.name: _carrying_inputs(n, plans[n.name], carriers) for n in nodes}
    cuts = _cuts(nodes, inputs)
    with torch.no_grad():
        ShapeProp(module).propagate(example[:1].to(next(lrp.parameters()).device, lrp.dtype))
    found: dict[str, ConceptLayer] = {}
    for node in nodes:
        plan, meta = plans[node.name], node.meta.get("tensor_meta")
        if node.name not in cuts or plan is None or not hasattr(meta, "shape"):
            continue
        if plan.kind not in CANDIDATE_KINDS and plan.op != "torch.cat":
            continue
        if all(user.op == "output" for user in node.users):
            continue  # the logits
        shape = tuple(int(n) for n in meta.shape[1:])
        dim = _channel_dim(shape, _nearest_layer(node, modules))
        found[plan.name] = ConceptLayer(plan.name, plan.op, plan.kind, node.name, shape, dim)
    known[key] = found
    return found


def default_layer(layers: dict[str, ConceptLayer], lrp: LRPModel) -> ConceptLayer:
    """The last block's output (a sum) of a transformer; else the last concept layer with a channels-first
    feature map (a plain CNN's last convolution, a ResNet's or DenseNet's last block); else the last one."""
    if not layers:
        raise UsageError("this model has no layer that all relevance passes through, so no concept layer")
    ordered = list(layers.values())
    transformer = any(plan.kind in ATTENTION_KINDS for plan in lrp.plan.values())
    if transformer:
        chosen = [layer for layer in ordered if layer.kind == "sum"]
    else:
        chosen = [layer for layer in ordered if len(layer.shape) == 3 and layer.channel_dim == 1]
    return (chosen or ordered)[-1]


def _slots(inverse: Tensor) -> Tensor:
    """For rows of images `inverse` (R,): each row's position among the rows of its image (0, 1, ...)."""
    seen: dict[int, int] = {}
    slots = []
    for image in inverse.tolist():
        slots.append(seen.get(image, 0))
        seen[image] = slots[-1] + 1
    return torch.tensor(slots, dtype=torch.int64, device=inverse.device)


class Cut(LeafModule, nn.Module):
    """Identity on a layer's output, except in a conditional pass: there it keeps the output (one row per image
    and concept) as the start of the pass below the layer, and passes one row per image on as a new leaf, so that
    the graph above the layer runs, and its relevance is computed, once per image."""

    explainable: LRPModel

    def __init__(self, explainable: LRPModel, name: str) -> None:
        super().__init__()
        self.__dict__["explainable"] = explainable  # not a submodule: the model owns this module
        self.layer_name = name
        self.request: _Request | None = None

    def forward(self, h: Any) -> Any:
        request, current = self.request, self.explainable.switch.current
        if request is None or current is None or not isinstance(h, Tensor):
            return h
        request.below = h
        leaf = h.detach()[request.first].requires_grad_(True)
        request.top = leaf
        current.batch = len(leaf)  # learned terms above the layer: one per image
        return leaf.clone()  # a non-leaf, so that an in-place op above the layer is allowed


@dataclass
class _Request:
    first: Tensor  # (U,) the row that stands for each image above the layer
    below: Tensor | None = None
    top: Tensor | None = None


def _cut(lrp: LRPModel, layer: ConceptLayer) -> Cut:
    """The `Cut` after `layer`'s node, inserted into the explainable graph on first use."""
    cuts = _CUTS.setdefault(lrp, {})
    if layer.name in cuts:
        return cuts[layer.name]
    module = lrp.module
    assert isinstance(module, fx.GraphModule)
    node = next(n for n in module.graph.nodes if n.name == layer.node)
    cut = Cut(lrp, layer.name)
    target = f"lrp_cut_{len(cuts)}"
    module.add_submodule(target, cut)
    with module.graph.inserting_after(node):
        cut_node = module.graph.call_module(target, (node,))
    node.replace_all_uses_with(cut_node, delete_user_cb=lambda user: user is not cut_node)
    module.recompile()
    cuts[layer.name] = cut
    return cut


@dataclass(frozen=True)
class LayerRelevance:
    """Relevance at a concept layer: `relevance` (B, *layer shape), `channels` (B, C) its per-channel sums (the
    concepts' relevance), the `logits` (B, K) and the explained `target` (B,)."""

    relevance: Tensor
    channels: Tensor
    logits: Tensor
    target: Tensor


@dataclass(frozen=True)
class Conditional:
    """Conditional relevance of R rows (image, concept): `relevance` (R, *input shape) the input relevance of each
    row's concept, `terms` (name -> (R,)) what reached each learned additive term below the layer, `layer` (R,) the
    row's channel relevance at the layer (what the row conserves), and per image used (`images`, (U,) positions in
    the batch) the relevance `above` at the layer (U, *layer shape), the `logits` (U, K) and `target` (U,)."""

    relevance: Tensor
    terms: dict[str, Tensor]
    layer: Tensor
    above: Tensor
    logits: Tensor
    target: Tensor
    images: Tensor

    def total(self) -> Tensor:
        """(R,): each row's relevance at the input and at the learned terms."""
        total = self.relevance.flatten(1).sum(1)
        for term in self.terms.values():
            total = total + term
        return total


class ConceptExplainer:
    """Conditional relevance at one concept layer with an `Explainer`'s rule or composite.

    `example` is one input (1, ...) of the size the model sees; `layer` a name of `concept_layers` (None: the
    default). UsageError naming the available layers for an unknown name, and for a signal method (PatternNet),
    which carries no relevance to condition."""

    def __init__(self, explainer: Explainer, example: Tensor, layer: str | None = None) -> None:
        if explainer.composite.signal:
            raise UsageError("concepts condition relevance; a signal method (PatternNet) carries none: use an LRP "
                             "rule or composite")
        self.explainer = explainer
        self.lrp = explainer.lrp
        self.layers = concept_layers(self.lrp, example)
        if layer is None:
            self.layer = default_layer(self.layers, self.lrp)
        elif layer in self.layers:
            self.layer = self.layers[layer]
        else:
            raise UsageError(f"--layer {layer!r} is not a concept layer of this model; layers: "
                             f"{', '.join(self.layers) or 'none'}")
        self._cut = _cut(self.lrp, self.layer)
        self.batched: bool | str = True  # False, or why not: the stacked pass then serves every call

    def layer_relevance(self, x: Tensor, target: ConceptTarget = None) -> LayerRelevance:
        """Relevance at the layer for the batch `x`: a forward pass and the relevance pass above the layer only."""
        with torch.inference_mode(False), torch.enable_grad():
            leaf = x.detach().to(self.explainer.device, self.lrp.dtype)
            request = _Request(torch.arange(len(x), device=leaf.device))
            logits, _ = self._run(leaf, request)
            start, target_index, _ = start_relevance(logits, target, self.explainer.class_names)
            assert request.top is not None
            (above,) = torch.autograd.grad(logits, request.top, start)
        return LayerRelevance(above, self.layer.per_channel(above), logits.detach(), target_index)

    def conditional(self, x: Tensor, images: Sequence[int] | Tensor, channels: Sequence[int] | Tensor,
                    target: ConceptTarget = None) -> Conditional:
        """Conditional relevance of concept `channels[i]` of the layer in image `x[images[i]]`, every row at once:
        one forward pass of the images used, the relevance above the layer once per image, and one batched
        relevance pass below it for all rows (vmap over the rows; where a rule has no batching rule, the stacked
        pass instead: `batched` then says why)."""
        device = self.explainer.device
        rows = torch.as_tensor(images, dtype=torch.int64, device=device).flatten()
        chosen = torch.as_tensor(channels, dtype=torch.int64, device=device).flatten()
        self._check_rows(rows, chosen, len(x))
        used, inverse = torch.unique(rows, return_inverse=True)
        leaf = x.detach().to(device, self.lrp.dtype)
        with torch.inference_mode(False), torch.enable_grad():
            if self.batched is True:
                try:
                    return self._batched(leaf[used], inverse, chosen, target, used)
                except RuntimeError as exc:
                    if not any(mark in str(exc) for mark in _UNBATCHABLE):
                        raise
                    self.batched = f"stacked pass: {shorten(str(exc))}"
            return self._stacked(leaf[rows].requires_grad_(True), inverse, chosen, target, used)

    def _batched(self, leaf: Tensor, inverse: Tensor, chosen: Tensor, target: ConceptTarget,
                 used: Tensor) -> Conditional:
        """The forward pass of each image once; the rows' masked relevances as a (slots, images, ...) batch of
        gradients (`is_grads_batched`): slot j of an image holds its j-th row."""
        leaf.requires_grad_(True)
        request = _Request(torch.arange(len(leaf), device=leaf.device))
        logits, terms = self._run(leaf, request)
        start, target_index, _ = start_relevance(logits, target, self.explainer.class_names)
        assert request.top is not None and request.below is not None
        (above,) = torch.autograd.grad(logits, request.top, start)
        slot = _slots(inverse)
        masked = above[inverse] * self.layer.mask(chosen).to(above.dtype)
        grads = above.new_zeros((int(slot.max()) + 1, *above.shape))
        grads[slot, inverse] = masked
        with warnings.catch_warnings():  # ops without a batching rule run in a loop: slower, still right
            warnings.simplefilter("ignore", UserWarning)
            relevance, *term_relevance = torch.autograd.grad(
                request.below, [leaf, *terms.values()], grads, allow_unused=True, is_grads_batched=True)
        picked = [None if r is None else r[slot, inverse] for r in [relevance, *term_relevance]]
        return self._result(leaf, picked, list(terms), masked, above, logits, target_index, used)

    def _stacked(self, leaf: Tensor, inverse: Tensor, chosen: Tensor, target: ConceptTarget,
                 used: Tensor) -> Conditional:
        """One row per (image, concept) below the layer and one per image above it (the `Cut` passes the first row
        of each image on), then one backward pass below the layer of all rows."""
        first = torch.full((len(used),), len(inverse), dtype=torch.int64, device=leaf.device)
        first = first.scatter_reduce(0, inverse, torch.arange(len(inverse), device=leaf.device), "amin")
        request = _Request(first)
        logits, terms = self._run(leaf, request)
        start, target_index, _ = start_relevance(logits, target, self.explainer.class_names)
        assert request.top is not None and request.below is not None
        (above,) = torch.autograd.grad(logits, request.top, start)
        masked = above[inverse] * self.layer.mask(chosen).to(above.dtype)
        found = torch.autograd.grad(request.below, [leaf, *terms.values()], masked, allow_unused=True)
        return self._result(leaf, list(found), list(terms), masked, above, logits, target_index, used)

    def _result(self, leaf: Tensor, found: Sequence[Tensor | None], names: list[str], masked: Tensor, above: Tensor,
                logits: Tensor, target: Tensor, used: Tensor) -> Conditional:
        count = len(masked)
        relevance, *term_relevance = found
        zeros = torch.zeros(count, dtype=masked.dtype, device=masked.device)
        sums = {name: (r.flatten(1).sum(1) if r is not None and len(r) == count else zeros)
                for name, r in zip(names, term_relevance, strict=True)}
        if relevance is None:
            relevance = leaf.new_zeros((count, *leaf.shape[1:]))
        return Conditional(relevance.detach(), sums, masked.flatten(1).sum(1).detach(), above.detach(),
                           logits.detach(), target, used)

    def _check_rows(self, rows: Tensor, channels: Tensor, batch: int) -> None:
        if len(rows) != len(channels) or len(rows) == 0:
            raise UsageError(f"give one channel per image row, at least one: got {len(rows)} rows and "
                             f"{len(channels)} channels")
        if int(rows.min()) < 0 or int(rows.max()) >= batch:
            raise UsageError(f"image rows must be in 0..{batch - 1}")
        if int(channels.min()) < 0 or int(channels.max()) >= self.layer.channels:
            raise UsageError(f"layer {self.layer.name} has channels 0..{self.layer.channels - 1}, got "
                             f"{int(channels.min())}..{int(channels.max())}")

    def _run(self, leaf: Tensor, request: _Request) -> tuple[Tensor, dict[str, Tensor]]:
        self._cut.request = request
        try:
            logits, terms = self.lrp.run(leaf, self.explainer.composite)
        finally:
            self._cut.request = None
        if request.top is None:
            raise RuntimeError(f"the relevance pass did not reach layer {self.layer.name}")
        return logits, terms
