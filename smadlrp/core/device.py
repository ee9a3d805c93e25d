"""The one place that knows about devices: resolve `--device`, seed every generator, mixed precision."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

from smadlrp.core.errors import UsageError

DEVICE_HELP = "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps"


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn a `--device` value into a usable `torch.device`, or raise UsageError naming what is missing."""
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise UsageError("--device mps: Apple MPS is not available on this machine; use --device cpu or auto")
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine; use --device cpu or auto")
        index_text = spec.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise UsageError(f"--device {spec}: expected cuda:N with N a GPU index")
        count = torch.cuda.device_count()
        if int(index_text) >= count:
            raise UsageError(f"--device {spec}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return torch.device(f"cuda:{int(index_text)}")
    raise UsageError(f"--device {spec!r} is not a device: use {DEVICE_HELP}")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator seeded with `seed` for data shuffling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[object]:
    """Mixed precision (float16 autocast) on CUDA when `enabled`; a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def without_autocast(device_type: str) -> contextlib.AbstractContextManager[object]:
    """Autocast switched off on `device_type` where it is on; nothing to do (no context to enter, which costs
    about 15 us a call) where it is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op CPU thread count (None leaves it unchanged)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
