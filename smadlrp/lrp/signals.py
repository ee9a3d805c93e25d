"""Signals handed from one node's rule to the rule of the node before it, to save a division.

Most rules return relevance of the form `R_t = t * c` at their input t, and most rules divide the relevance at
their output y by y (the z-rule's `R_y / y`). Where t is y (one node computes y, the next reads it as is), that
division gives c back, at the cost of a pass over the data and of computing y again (a product of two
activations). So a node whose rule divides by its output opens a `SignalSlot` on that output (`open_slot`); the
rule of the node reading it leaves `R_t` and c there (`SignalSlot.offer`); and the first rule takes c, when the
relevance autograd hands it is that very tensor, unchanged (`SignalSlot.take`). Where y has several readers (autograd
adds their relevances) or is changed in place after the slot opened, nothing is taken and the division runs.
"""

from __future__ import annotations

from torch import Tensor

from smadlrp.lrp.ops import batched


class SignalSlot:
    """Where the rule of the node reading a tensor y leaves the relevance `R_y = y * c` it returns, with c."""

    __slots__ = ("relevance", "signal", "version")

    def __init__(self) -> None:
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
        return signal if offered is relevance and relevance._version == version else None


def open_slot(y: Tensor) -> SignalSlot:
    """A slot on the output `y` of a node whose rule divides by y."""
    slot = SignalSlot()
    y._lrp_slot = (slot, y._version)  # type: ignore[attr-defined]
    return slot


def slot_of(t: Tensor) -> SignalSlot | None:
    """The slot on `t` when `t` is, unchanged, the output that opened it (None otherwise)."""
    opened = getattr(t, "_lrp_slot", None)
    return opened[0] if opened is not None and opened[1] == t._version else None


def taken(slot: SignalSlot | None, relevance: Tensor) -> Tensor | None:
    """`slot.take(relevance)`, or None without a slot."""
    return None if slot is None else slot.take(relevance)
