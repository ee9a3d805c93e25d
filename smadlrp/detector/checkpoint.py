"""Checkpoints: weights as safetensors with a JSON metadata document in the header; atomic writes; strict loading.

A checkpoint never holds pickled objects, so loading one cannot run code. The header's `__metadata__` holds one
key, `smadlrp`, whose value is the JSON document described by `CheckpointMeta`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smadlrp import __version__
from smadlrp.core.container import read_document, read_tensors, write_document
from smadlrp.core.errors import SmadlrpError
from smadlrp.detector.models import get_architecture, load_compatible_state

CHECKPOINT_SCHEMA = "smadlrp.detector.checkpoint/1"


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
    # validation operating points of `finetune`: {"split", "epoch", "n_bonafide", "n_morph",
    # "points": {criterion: {"threshold", "apcer", "bpcer"} or {"threshold": None, "reason"}}}
    operating_points: dict[str, Any] = field(default_factory=dict)
    # the face crop policy of the training data (data.align.AlignPolicy as a dict) when `smadlrp align` made it
    alignment: dict[str, Any] = field(default_factory=dict)
    version: str = __version__
    schema: str = CHECKPOINT_SCHEMA

    @property
    def attack_index(self) -> int:
        """Index of the attack class in `class_names`."""
        return self.class_names.index(self.attack_class)

    @property
    def training_data(self) -> Path | None:
        """The data folder `finetune` trained this checkpoint on, when it is recorded and still exists."""
        recorded = self.training.get("data")
        return Path(recorded) if recorded and Path(recorded).is_dir() else None

    def stored_threshold(self, name: str, source: Path | str = "the checkpoint") -> float | None:
        """The threshold of the stored operating point `name` (a criterion: eer, apcer10, ...); None when the
        checkpoint stores no operating points (written before they were stored, or imported); SmadlrpError when
        this one was not estimable on the validation split."""
        points = self.operating_points.get("points")
        if not points:
            return None
        point = points.get(name)
        if point is None:
            raise SmadlrpError(f"{source} stores no operating point {name!r} (it has: {', '.join(points)})")
        if point.get("threshold") is None:
            raise SmadlrpError(f"{source}: the stored operating point {name} was not estimable on the "
                               f"{self.operating_points.get('split', 'validation')} split ({point.get('reason')})")
        return float(point["threshold"])

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


def save_checkpoint(path: str | Path, model: nn.Module, meta: CheckpointMeta) -> Path:
    """Write `model`'s state dict and `meta` to `path` atomically; returns the path."""
    return write_document(path, model.state_dict(), asdict(meta))


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


def newest_checkpoint(folder: Path, name: str = "best.safetensors") -> Path | None:
    """The most recently written `name` anywhere below `folder` (None when there is none)."""
    found = [p for p in folder.rglob(name) if p.is_file()] if folder.is_dir() else []
    return max(found, key=lambda p: (p.stat().st_mtime_ns, str(p)), default=None)


__all__ = [
    "CHECKPOINT_SCHEMA",
    "CheckpointMeta",
    "load_checkpoint",
    "load_meta",
    "newest_checkpoint",
    "save_checkpoint",
]
