"""The one place that knows about ranks: torchrun's process group, sharding, gathers and sums across ranks.

Under `torchrun` (the RANK / WORLD_SIZE / LOCAL_RANK variables, WORLD_SIZE > 1) a command opens a `session`:
the process group starts (NCCL on CUDA, gloo on CPU) with a collective timeout, and every rank takes the device
cuda:LOCAL_RANK, or the CPU. Without torchrun everything is one process: `current()` is a single-rank `Ranks`
whose collectives are no-ops, so callers are written once for both cases.

An error on one rank reaches the others at the next `shared_failure` exit (every rank passes there), so that all
ranks raise the same `RankError` and none is left waiting; a rank that dies outside such a block is ended by
torchrun, and a rank that loses its peers gives up after the collective timeout.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from smadlrp.core.device import resolve_device
from smadlrp.core.errors import SmadlrpError, UsageError, shorten
from smadlrp.core.processes import is_interrupt

T = TypeVar("T")
TIMEOUT_ENV = "SMADLRP_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
MAX_TIMEOUT_S = 7 * 24 * 3600.0  # a week: longer waits are a hang, and torch's timers overflow near 1e13 s
VALUE_WIDTH = 60  # characters of a variable's value quoted in an error


class RankError(SmadlrpError):
    """An error that every rank raises together: `origin` is the rank where it happened."""

    def __init__(self, origin: int, message: str, exit_code: int = 1) -> None:
        super().__init__(f"rank {origin}: {message}", exit_code)
        self.origin = origin


@dataclass(frozen=True)
class Ranks:
    """This process's place among `world_size` processes and the collectives between them.

    With `world_size` 1 every collective returns its input: code that uses a `Ranks` runs unchanged alone.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints tables and writes shared files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        return f"rank {self.rank}/{self.world_size}"

    # ---- sharding -------------------------------------------------------------------------------------------
    def shard(self, n: int, block: int = 1) -> list[int]:
        """This rank's positions of `range(n)`: blocks of `block` consecutive positions dealt out in turn.

        With `block` the batch size, every rank scores exactly the batches a single process would (the same
        images together, the same batch shapes), so per-image results are bitwise those of one process.
        """
        if block < 1:
            raise ValueError("block must be >= 1")
        return [i for start in range(self.rank * block, n, self.world_size * block)
                for i in range(start, min(start + block, n))]

    # ---- collectives ----------------------------------------------------------------------------------------
    def gather(self, value: T) -> list[T]:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        with _communication(self):
            dist.all_gather_object(values, value)
        return values

    def gather_to_main(self, value: T) -> list[T]:
        """Every rank's `value` (picklable) in rank order on rank 0, [] on the others (for large values that only
        rank 0 writes)."""
        if not self.distributed:
            return [value]
        values: list[Any] | None = [None] * self.world_size if self.is_main else None
        with _communication(self):
            dist.gather_object(value, values, dst=0)
        return values or []

    def gather_by_position(self, positions: Sequence[int], items: Sequence[T]) -> list[T]:
        """Merge each rank's `items` (one per position of its shard) into one list ordered by position."""
        if len(positions) != len(items):
            raise ValueError("one item per position")
        pairs = [pair for shard in self.gather(list(zip(positions, items, strict=True))) for pair in shard]
        pairs.sort(key=lambda pair: pair[0])
        return [item for _, item in pairs]

    def all_reduce_sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace each float64 or int64 tensor by its sum over the ranks, in place (no copy of its size)."""
        for tensor in tensors:
            if tensor.dtype not in (torch.float64, torch.int64):
                raise TypeError(f"sums across ranks are taken in float64 or int64, not {tensor.dtype}")
        if not self.distributed:
            return
        with _communication(self):
            for tensor in tensors:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def sum(self, values: Sequence[float]) -> list[float]:
        """Float64 sums over the ranks of a few numbers (counts, losses)."""
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        self.all_reduce_sum_([tensor])
        return tensor.tolist()

    def broadcast(self, value: T) -> T:
        """Rank 0's `value` (picklable) on every rank."""
        if not self.distributed:
            return value
        box: list[Any] = [value]
        with _communication(self):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            with _communication(self):
                dist.barrier()

    @contextmanager
    def exchanging(self) -> Iterator[None]:
        """Run a block whose collectives torch makes itself (a DistributedDataParallel step: the parameter broadcast,
        the gradient all-reduce in the backward pass): a lost or silent peer there gives the same line as in the
        collectives above; any other error passes unchanged."""
        if not self.distributed:
            yield
            return
        with _communication(self, only_lost_peers=True):
            yield

    # ---- errors ---------------------------------------------------------------------------------------------
    @contextmanager
    def shared_failure(self) -> Iterator[None]:
        """Run a block that every rank enters; if it fails on any rank, every rank raises the same RankError.

        The block must not run collectives itself (a failing rank would miss them). Ctrl-C is not shared: it
        reaches every rank of a terminal at once, and torchrun ends the rest.
        """
        if not self.distributed:
            yield
            return
        try:
            yield
        except (KeyboardInterrupt, RankError):
            raise
        except SmadlrpError as exc:
            self._agree((exc.message, exc.exit_code))
            raise
        except Exception as exc:  # noqa: BLE001 - a bug on one rank must still end the others
            if is_interrupt(exc):  # e.g. a DataLoader worker that Ctrl-C ended: not shared, as Ctrl-C is not
                raise KeyboardInterrupt from None
            self._agree((f"internal error: {exc.__class__.__name__}: {exc}", 1))
            raise
        self._agree(None)

    def _agree(self, failure: tuple[str, int] | None) -> None:
        """Exchange success or `failure` (message, exit code); raise the lowest failing rank's on every rank."""
        flag = torch.tensor([0 if failure is None else 1], dtype=torch.int64, device=self.device)
        with _communication(self):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag.item()) == 0:
            return
        for origin, reported in enumerate(self.gather(failure)):
            if reported is not None:
                raise RankError(origin, *reported)


_SINGLE = Ranks()
_current = _SINGLE


def current() -> Ranks:
    """The ranks of the running command (a single rank outside a torchrun session)."""
    return _current


def launched_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables; (0, 1, 0) when they are absent. UsageError naming
    the variable when one is not an integer or the three do not fit together."""
    world = _integer_variable("WORLD_SIZE", "1")
    rank = _integer_variable("RANK", "0")
    local = _integer_variable("LOCAL_RANK", str(rank))
    if world < 1 or not 0 <= rank < world or local < 0:
        raise UsageError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: not a valid place among the processes "
                         "(torchrun sets 0 <= RANK < WORLD_SIZE)")
    return rank, world, local


def _integer_variable(name: str, default: str) -> int:
    """The integer in environment variable `name` (`default` when unset); UsageError naming it otherwise."""
    text = os.environ.get(name, default)
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{name}={shorten(text, VALUE_WIDTH)!r} is not an integer: RANK, WORLD_SIZE and "
                         "LOCAL_RANK must be integers (as torchrun sets them)") from None


def collective_timeout() -> float:
    """Seconds a rank waits for the others in one collective (SMADLRP_DIST_TIMEOUT, default 600, at most
    MAX_TIMEOUT_S); UsageError naming the variable for anything else (not a number, <= 0, inf, nan)."""
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_TIMEOUT_S:  # nan fails too
        raise UsageError(f"{TIMEOUT_ENV}={shorten(text, VALUE_WIDTH)!r}: give the collective timeout in seconds "
                         f"(> 0, at most {MAX_TIMEOUT_S:g})")
    return seconds


def rank_device(spec: str, local_rank: int) -> torch.device:
    """The device of the rank with `local_rank` on its machine: cuda:LOCAL_RANK for auto/cuda when CUDA is
    there, else the CPU. Other device choices cannot be shared out and are refused."""
    spec = spec.strip().lower()
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if spec in ("auto", "cuda"):
        resolve_device("cuda")  # refuses when CUDA is missing
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local_rank}: this machine has {torch.cuda.device_count()} CUDA "
                             "device(s); start at most that many processes per node")
        return torch.device(f"cuda:{local_rank}")
    raise UsageError(f"--device {spec}: under torchrun each process takes cuda:LOCAL_RANK or the CPU; "
                     "use --device auto, cuda or cpu")


@contextmanager
def session(device_spec: str = "auto") -> Iterator[Ranks]:
    """The ranks of one command. Under torchrun with several processes, start the process group (NCCL on CUDA,
    gloo on CPU) unless it already runs, and end it afterwards if it was started here."""
    global _current
    rank, world, local = launched_ranks()
    if world == 1:
        yield _SINGLE
        return
    device = rank_device(device_spec, local)
    started = not dist.is_initialized()
    if started:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(seconds=collective_timeout())
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                    device_id=device if device.type == "cuda" else None)
        except (RuntimeError, ValueError) as exc:
            raise SmadlrpError(f"rank {rank}: cannot join the other processes "
                               f"({str(exc).splitlines()[0][:160]})") from None
    elif dist.get_world_size() != world or dist.get_rank() != rank:
        raise SmadlrpError("the running process group does not match RANK / WORLD_SIZE")
    previous, _current = _current, Ranks(rank, world, local, device)
    try:
        yield _current
    finally:
        _current = previous
        if started:
            dist.destroy_process_group()


@contextmanager
def _communication(ranks: Ranks, only_lost_peers: bool = False) -> Iterator[None]:
    """Turn a failed collective (a peer that died, or no answer within the timeout) into one clear line; after
    Ctrl-C, into the KeyboardInterrupt it follows from. With `only_lost_peers` (a block that also computes, like a
    training step), other RuntimeErrors pass unchanged."""
    try:
        yield
    except RuntimeError as exc:  # gloo reports a timeout as a plain RuntimeError, NCCL as a DistError
        if is_interrupt(exc):
            raise KeyboardInterrupt from None
        if only_lost_peers and not _lost_peers(exc):
            raise
        text = str(exc).lower()
        why = (f"no answer from the other ranks within {collective_timeout():g} s ({TIMEOUT_ENV})"
               if "timeout" in text or "timed out" in text else "lost contact with the other ranks")
        raise SmadlrpError(f"{ranks.describe()}: {why}; another rank has probably failed (see its error)") from None


_PEER_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "broken pipe")


def _lost_peers(exc: RuntimeError) -> bool:
    """Whether `exc` is a failed exchange with the other ranks: a DistError (NCCL), or a gloo message ("[.../gloo/
    transport/tcp/pair.cc:545] Read error ...: Connection reset by peer", "Timed out waiting 60000ms for recv")."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return any(word in text for word in _PEER_WORDS)


def main_first(action: Callable[[], T]) -> T:
    """Run `action` on rank 0, then on the other ranks (a cache rank 0 fills that the others then reuse)."""
    ranks = current()
    if ranks.is_main:
        with ranks.shared_failure():
            result = action()
        return result
    with ranks.shared_failure():
        pass
    return action()
