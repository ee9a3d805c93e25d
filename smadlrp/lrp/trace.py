"""Per-layer relevance capture: the relevance at every layer's input during a relevance pass.

    with smadlrp.lrp.trace() as t:
        rel = smadlrp.lrp.explain(model, x)
    for rec in t.records:           # forward order, the output relevance last
        print(rec.index, rec.name, rec.layer_type, float(rec.relevance.sum()))

TorchLRP's pair is kept: `trace.enable_and_clean()` before the backward pass, `trace.collect_and_disable()`
after it; collecting disables tracing, so later backward passes record nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor

OUTPUT_NAME = "output"
OUTPUT_TYPE = "Output"


@dataclass(frozen=True)
class TraceRecord:
    """Relevance (a detached copy, shape of the layer input) at the input of layer `name` of type `layer_type`.

    `index` counts the layers in the order the forward pass ran them (0 = first); the record named
    `output` (type `Output`) holds the starting relevance at the model output and comes last.
    """

    index: int
    name: str
    layer_type: str
    relevance: Tensor


class Trace:
    """The records of one tracing session."""

    def __init__(self) -> None:
        self._arrived: list[tuple[int, TraceRecord]] = []

    @property
    def records(self) -> list[TraceRecord]:
        """Records in forward order, pass by pass; each pass ends with its output record."""
        return [rec for _, rec in sorted(self._arrived, key=lambda item: (item[0], item[1].index))]

    @property
    def backward_order(self) -> list[TraceRecord]:
        """Records in the order the backward pass produced them (output first), as TorchLRP listed them."""
        return [rec for _, rec in self._arrived]

    def add(self, pass_id: int, record: TraceRecord) -> None:
        """Store `record` of relevance pass `pass_id`."""
        self._arrived.append((pass_id, record))


class TraceSwitch:
    """`trace()` opens a tracing context; `enable_and_clean()` / `collect_and_disable()` are TorchLRP's pair."""

    def __init__(self) -> None:
        self.active: Trace | None = None

    def __call__(self) -> contextlib.AbstractContextManager[Trace]:
        """Context manager yielding a `Trace` that collects every relevance pass run inside it."""
        return self._session()

    @contextlib.contextmanager
    def _session(self) -> Iterator[Trace]:
        previous, self.active = self.active, Trace()
        try:
            yield self.active
        finally:
            self.active = previous

    def enable_and_clean(self) -> None:
        """Start recording into a fresh, empty trace (TorchLRP's API)."""
        self.active = Trace()

    def collect_and_disable(self) -> list[Tensor]:
        """Stop recording; return the relevance tensors in backward order, output first (TorchLRP's API)."""
        collected, self.active = self.active, None
        return [] if collected is None else [rec.relevance for rec in collected.backward_order]

    def is_enabled(self) -> bool:
        """Whether relevance passes are being recorded now."""
        return self.active is not None


trace = TraceSwitch()
enable_and_clean = trace.enable_and_clean
collect_and_disable = trace.collect_and_disable
is_enabled = trace.is_enabled


def relevance_hook(pass_id: int, index: int, name: str, layer_type: str) -> Callable[[Tensor], None]:
    """A tensor hook that records the relevance reaching a layer input while tracing is enabled."""

    def hook(grad: Tensor) -> None:
        active = trace.active
        if active is not None:
            active.add(pass_id, TraceRecord(index, name, layer_type, grad.detach().clone()))

    return hook


def conservation_rows(records: list[TraceRecord]) -> list[dict[str, Any]]:
    """Per traced node (first image of the batch): its index, name, type, shape, the sum, positive and negative
    mass of the relevance at its input (float64), and ratio = sum / the output relevance (1 where conserved;
    NaN when the output relevance is 0). The rows of `smadlrp trace` and of its file."""
    output_sum = float(records[-1].relevance.double().sum())
    rows = []
    for rec in records:
        r = rec.relevance.double()
        total = float(r.sum())
        rows.append({"index": rec.index, "name": rec.name, "type": rec.layer_type, "shape": list(rec.relevance.shape),
                     "sum": total, "positive": float(r.clamp(min=0).sum()), "negative": float(r.clamp(max=0).sum()),
                     "ratio": total / output_sum if output_sum else float("nan")})
    return rows
