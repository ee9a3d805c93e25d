"""Checkpoints: weights as safetensors with a JSON metadata document in the header; atomic writes; strict loading.

A checkpoint never holds pickled objects, so loading one cannot run code. The header's `__metadata__` holds one
key, `smadlrp`, whose value is the JSON document described by `CheckpointMeta`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from smadlrp import __version__
from smadlrp.errors import SmadlrpError
from smadlrp.fileio import write_atomic
from smadlrp.models import get_architecture, load_compatible_state

CHECKPOINT_SCHEMA = "smadlrp.checkpoint/1"
META_KEY = "smadlrp"
_MAX_HEADER = 100_000_000  # bytes; the safetensors format's own limit


@dataclass
class CheckpointMeta:
    """What every later command needs to use a model: architecture, classes, preprocessing, provenance."""

    architecture: str
    class_names: list[str]
    attack_class: str  # the class treated as the attack (morph, label "positive")
    input_size: int  # square input side, pixels
    mean: list[float]  # per-channel normalisation mean, RGB, for pixels in [0, 1]
    std: list[float]
    weights_source: str
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    version: str = __version__
    schema: str = CHECKPOINT_SCHEMA

    @property
    def attack_index(self) -> int:
        """Index of the attack class in `class_names`."""
        return self.class_names.index(self.attack_class)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_document(cls, doc: dict[str, Any], source: Path) -> CheckpointMeta:
        """Validate a parsed metadata document; SmadlrpError naming what is wrong."""
        if doc.get("schema") != CHECKPOINT_SCHEMA:
            raise SmadlrpError(
                f"{source}: unknown checkpoint schema {doc.get('schema')!r} (expected {CHECKPOINT_SCHEMA})")
        try:
            meta = cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})
        except TypeError as exc:
            raise SmadlrpError(f"{source}: incomplete checkpoint metadata ({exc})") from None
        if meta.attack_class not in meta.class_names or len(meta.class_names) < 2:
            raise SmadlrpError(f"{source}: attack class {meta.attack_class!r} is not among {meta.class_names}")
        if len(meta.mean) != 3 or len(meta.std) != 3 or min(meta.std) <= 0:
            raise SmadlrpError(f"{source}: normalisation must give 3 means and 3 positive stds")
        get_architecture(meta.architecture)
        return meta


def read_header(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse a safetensors header without loading tensors: (tensor entries, `__metadata__`).

    Refuses, with one clear line, a missing file, a file that is not safetensors, and a truncated one.
    """
    path = Path(path)
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
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SmadlrpError(_not_safetensors(path)) from None
    if not isinstance(header, dict):
        raise SmadlrpError(_not_safetensors(path))
    metadata = header.pop("__metadata__", None) or {}
    end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    if 8 + n + end > size:
        raise SmadlrpError(f"{path}: truncated safetensors file ({size} bytes, header promises {8 + n + end})")
    return header, metadata


def _not_safetensors(path: Path) -> str:
    hint = " (smadlrp never unpickles model files; convert it with `smadlrp import-model`)" \
        if path.suffix in {".pth", ".pt", ".pkl", ".bin"} else ""
    return f"{path}: not a safetensors file{hint}"


def read_document(path: str | Path) -> dict[str, Any]:
    """Return the smadlrp JSON document of a safetensors file (checkpoint or pattern file)."""
    _, metadata = read_header(path)
    if META_KEY not in metadata:
        raise SmadlrpError(f"{path}: a safetensors file without smadlrp metadata (not written by smadlrp)")
    try:
        doc = json.loads(metadata[META_KEY])
    except json.JSONDecodeError:
        raise SmadlrpError(f"{path}: smadlrp metadata is not valid JSON") from None
    if not isinstance(doc, dict) or "schema" not in doc:
        raise SmadlrpError(f"{path}: smadlrp metadata without a schema")
    return doc


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file onto the CPU (header validated first)."""
    read_header(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise SmadlrpError(f"{path}: unreadable safetensors file ({exc})") from None


def save_checkpoint(path: str | Path, model: nn.Module, meta: CheckpointMeta) -> Path:
    """Write `model`'s state dict and `meta` to `path` atomically; returns the path."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={META_KEY: meta.to_json()}))


def load_meta(path: str | Path) -> CheckpointMeta:
    """Read and validate only a checkpoint's metadata."""
    return CheckpointMeta.from_document(read_document(path), Path(path))


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the model of a checkpoint, in eval mode on `device`, with its metadata.

    Refuses files that are not safetensors, lack or misstate smadlrp metadata, or whose tensors do not match the
    architecture's names and shapes.
    """
    path = Path(path)
    meta = load_meta(path)
    arch = get_architecture(meta.architecture)
    model = arch.build(len(meta.class_names))
    state = read_tensors(path)
    expected = model.state_dict()
    wrong = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if wrong:
        raise SmadlrpError(f"{path}: tensor {wrong[0]!r} has shape {tuple(state[wrong[0]].shape)}, "
                           f"{arch.name} needs {tuple(expected[wrong[0]].shape)}")
    load_compatible_state(model, arch, state, source=str(path))
    return model.to(device).eval(), meta


__all__ = [
    "CHECKPOINT_SCHEMA",
    "CheckpointMeta",
    "load_checkpoint",
    "load_meta",
    "read_document",
    "read_header",
    "read_tensors",
    "save_checkpoint",
]
