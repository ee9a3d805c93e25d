"""Signals handed from one node's rule to the rule of the node before it, to save a division.

Most rules return relevance of the form `R_t = t * c` at their input t, and most rules divide the relevance at
their output y by y (the z-rule's `R_y / y`). Where t is y (one node computes y, the next reads it as is), that
division gives c back, at the cost of a pass over the data and of computing y again (a product of two
activations). So a node whose rule divides by its output opens a `SignalSlot` on that output (`open_slot`); the
rule of the node reading it leaves `R_t` and c there (`SignalSlot.offer`); and the first rule takes c, when the
relevance autograd hands it is that very tensor, unchanged (`SignalSlot.take`). Where y has several readers (autograd
adds their relevances) or is changed in place after the slot opened, nothing is taken and the division runs.

The reader may also read y through reshapes, transpositions and copies (attention's `(A @ v)` before the output
projection): autograd then hands the first rule a view of the relevance offered, and it takes the same view of c.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor

from smadlrp.lrp.ops import batched


class SignalSlot:
    """Where the rule of the node reading a tensor y leaves the relevance `R_y = y * c` it returns, with c."""

    __slots__ = ("output", "opened", "relevance", "signal", "version")

    def __init__(self, y: Tensor) -> None:
        self.output, self.opened = weakref.ref(y), y._version
        self.relevance: Tensor | None = None
        self.signal: Tensor | None = None
        self.version = -1

    def offer(self, relevance: Tensor, signal: Tensor) -> Tensor:
        """Leave `relevance` (`y * signal`) and `signal`; returns `relevance`."""
        if not batched(relevance):
            self.relevance, self.signal, self.version = relevance, signal, relevance._version
        return relevance

    def take(self, relevance: Tensor) -> Tensor | None:
        """c, when `relevance` is the tensor offered, unchanged since (not summed with another reader's); the
        slot is empty afterwards. Treat c as read-only: the reader may have offered it to other slots too."""
        offered, signal, version = self.relevance, self.signal, self.version
        self.relevance = self.signal = None
        if offered is None or signal is None or relevance._version != version:
            return None
        if offered is relevance:
            return signal
        # A view of the relevance offered (handed back through reshapes and transpositions), with c laid out as it
        # is: the same view of c. Nothing but views of the offered tensor shares its memory while it is held here.
        same = (relevance.untyped_storage().data_ptr() == offered.untyped_storage().data_ptr()
                and relevance.dtype == offered.dtype and signal.shape == offered.shape
                and signal.stride() == offered.stride())
        offset = signal.storage_offset() + relevance.storage_offset() - offered.storage_offset()
        return signal.as_strided(relevance.size(), relevance.stride(), offset) if same else None

    def unchanged(self) -> bool:
        """Whether the output that opened the slot is unchanged (or gone, so that nothing can change it now)."""
        y = self.output()
        return y is None or y._version == self.opened


# Backward nodes of ops that only move or copy the elements of one input: what autograd hands back through them is
# a view of the relevance at their output.
_REARRANGING = frozenset({
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "TransposeBackward0", "TransposeBackward1",
    "PermuteBackward0", "TBackward0", "CloneBackward0", "AliasBackward0", "UnsqueezeBackward0", "UnsqueezeBackward1",
    "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "SqueezeBackward3", "SqueezeBackward4",
})


def open_slot(ctx: Any, y: Tensor) -> None:
    """Open a slot on the output `y` of a node whose rule divides by y, kept as `ctx.output_slot` on the node's
    autograd context (where `slot_of` finds it through rearrangements)."""
    slot = ctx.output_slot = SignalSlot(y)
    y._lrp_slot = (slot, y._version)  # type: ignore[attr-defined]


def slot_of(t: Tensor) -> SignalSlot | None:
    """The slot on `t` when `t` is, unchanged, the output that opened it, or a rearrangement of that output
    (reshaped, transposed, copied) made while it was unchanged; None otherwise."""
    opened = getattr(t, "_lrp_slot", None)
    if opened is not None:
        return opened[0] if opened[1] == t._version else None
    node = t.grad_fn
    while node is not None and node.name() in _REARRANGING:
        node = node.next_functions[0][0]
    slot = getattr(node, "output_slot", None)
    return slot if isinstance(slot, SignalSlot) and slot.unchanged() else None


def taken(slot: SignalSlot | None, relevance: Tensor) -> Tensor | None:
    """`slot.take(relevance)`, or None without a slot."""
    return None if slot is None else slot.take(relevance)
