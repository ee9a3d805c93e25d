"""safetensors files that carry a smadlrp JSON document in their header: checkpoints, pattern files, resume
states, raw relevance and traces. The header's `__metadata__` holds one key, `smadlrp`, whose value is the JSON
document; its `schema` field says what the file is. Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from smadlrp.core.errors import SmadlrpError, shorten
from smadlrp.core.fileio import write_atomic

META_KEY = "smadlrp"
_MAX_HEADER = 100_000_000  # bytes; the safetensors format's own limit


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse a safetensors header without loading tensors: (tensor entries, `__metadata__`).

    Refuses, with one clear line, a missing file, a file that is not safetensors (any header that is not a JSON
    object of well-formed tensor entries and a str -> str `__metadata__`), and a truncated one.
    """
    path = Path(path)
    if path.is_dir():
        raise SmadlrpError(f"{path} is a folder, not a file")
    if not path.is_file():
        raise SmadlrpError(f"file not found: {path}")
    size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(8)
        n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        if len(prefix) < 8 or n == 0 or n > _MAX_HEADER or fh.read(1) != b"{":
            raise SmadlrpError(_not_safetensors(path))
        if n > size - 8:
            raise SmadlrpError(f"{path}: truncated safetensors file ({size} bytes, its header alone needs {8 + n})")
        fh.seek(8)
        raw = fh.read(n)
    header = _parse_json(raw, _not_safetensors(path))
    if not isinstance(header, dict):
        raise SmadlrpError(_not_safetensors(path))
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not _is_str_map(metadata) or not all(_is_tensor_entry(entry) for entry in header.values()):
        raise SmadlrpError(_not_safetensors(path))
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + n + end > size:
        raise SmadlrpError(f"{path}: truncated safetensors file ({size} bytes, header promises {8 + n + end})")
    return header, metadata


def _parse_json(raw: bytes | str, failure: str) -> Any:
    """`json.loads`; SmadlrpError(`failure`) for every way it can fail on hostile input (malformed, not UTF-8,
    nested too deeply, an integer of more than 4300 digits)."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise SmadlrpError(failure) from None


def _is_str_map(value: Any) -> bool:
    """A dict of str -> str (the safetensors `__metadata__`)."""
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _is_tensor_entry(entry: Any) -> bool:
    """{"dtype": str, "shape": [ints >= 0], "data_offsets": [begin, end]} with 0 <= begin <= end."""
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    return (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
            and isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1])


def _not_safetensors(path: Path) -> str:
    hint = " (smadlrp never unpickles model files; convert it with `smadlrp import-model`)" \
        if path.suffix in {".pth", ".pt", ".pkl", ".bin"} else ""
    return f"{path}: not a safetensors file{hint}"


def read_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the smadlrp JSON document of a safetensors file; SmadlrpError when there is none."""
    _, metadata = read_header(path)
    if META_KEY not in metadata:
        raise SmadlrpError(f"{path}: a safetensors file without smadlrp metadata (not written by smadlrp)")
    doc = _parse_json(metadata[META_KEY], f"{path}: smadlrp metadata is not valid JSON")
    if not isinstance(doc, dict) or "schema" not in doc:
        raise SmadlrpError(f"{path}: smadlrp metadata without a schema")
    return doc


def read_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file onto the CPU (header validated first)."""
    read_header(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise SmadlrpError(f"{path}: unreadable safetensors file ({shorten(str(exc))})") from None


def first_non_finite(state: Mapping[str, torch.Tensor]) -> str | None:
    """The first tensor name (sorted) holding NaN or infinity; None when every value is finite."""
    return next((name for name in sorted(state) if not bool(torch.isfinite(state[name]).all())), None)


def write_document(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], doc: Mapping[str, Any]) -> Path:
    """Write `tensors` (any device; copied to contiguous CPU memory) and the JSON `doc` to `path` atomically."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    text = json.dumps(doc, sort_keys=True)
    return write_atomic(path, lambda tmp: save_file(cpu, str(tmp), metadata={META_KEY: text}))
