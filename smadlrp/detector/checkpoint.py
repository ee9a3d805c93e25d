"""Checkpoints: weights as safetensors with a JSON metadata document in the header; atomic writes; strict loading.

A checkpoint never holds pickled objects, so loading one cannot run code. The header's `__metadata__` holds one
key, `smadlrp`, whose value is the JSON document described by `CheckpointMeta`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smadlrp import __version__
from smadlrp.core.container import first_non_finite, read_document, read_tensors, write_document
from smadlrp.core.errors import SmadlrpError, shorten, shown
from smadlrp.detector.models import get_architecture, is_architecture, load_compatible_state

CHECKPOINT_SCHEMA = "smadlrp.detector.checkpoint/1"
ADAPTER_PREFIX = "adapter/"  # LoRA adapters beside the merged weights: adapter/<module>.lora_A (rank, in), .lora_B
INPUT_SIZES = (16, 4096)  # pixels, the input sides a checkpoint may declare (a larger one costs gigabytes per image)
# the highest stored threshold: a conservative APCER threshold just above a bona fide score of 1.0
_MAX_THRESHOLD = math.nextafter(1.0, math.inf)
_TRAINING_TEXTS = ("data", "protocol", "bonafide_label", "attack_label")  # training fields later commands read


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
    # a head fitted on frozen features (detector.frozen_heads.head_spec: kind, dims, ...); {}: the registry's Linear
    head: dict[str, Any] = field(default_factory=dict)
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

    @classmethod
    def from_document(cls, doc: dict[str, Any], source: Path) -> CheckpointMeta:
        """Build and `validate` the metadata of a parsed document; SmadlrpError naming what is wrong."""
        if doc.get("schema") != CHECKPOINT_SCHEMA:
            raise SmadlrpError(
                f"{source}: unknown checkpoint schema {shown(doc.get('schema'))} "
                f"(expected {CHECKPOINT_SCHEMA})")
        missing = [f.name for f in fields(cls)
                   if f.name not in doc and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise SmadlrpError(f"{source}: incomplete checkpoint metadata (missing: {', '.join(missing)})")
        return cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc}).validate(source)

    def validate(self, source: Path | str) -> CheckpointMeta:
        """Check every field's type and range (what reading and writing a checkpoint both rely on); SmadlrpError
        "SOURCE: not a valid smadlrp checkpoint: KEY: ..." naming the first problem."""
        problem = self.first_problem()
        if problem is not None:
            raise SmadlrpError(f"{source}: not a valid smadlrp checkpoint: {problem[0]}: {problem[1]}")
        return self

    def first_problem(self) -> tuple[str, str] | None:
        """(KEY, what is wrong) of the first field that fails `validate`; None when all pass."""
        return next(self._problems(), None)

    def _problems(self) -> Iterator[tuple[str, str]]:
        """(KEY, what is wrong) for each problem, in order; each check may rely on the ones before it."""
        known = is_architecture(self.architecture)
        if not known:
            yield "architecture", f"unknown architecture {shown(self.architecture)}"
        names = self.class_names
        if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) and n for n in names)
                and len(set(names)) == len(names)):
            yield "class_names", f"{shown(names)} is not a list of at least 2 distinct non-empty names"
        if not isinstance(self.attack_class, str) or self.attack_class not in names:
            yield "attack_class", f"{shown(self.attack_class)} is not one of the class names {shown(names)}"
        low, high = INPUT_SIZES
        if type(self.input_size) is not int or not low <= self.input_size <= high:
            yield "input_size", f"{shown(self.input_size)} is not a whole number of pixels in {low}..{high}"
        elif known and (problem := get_architecture(self.architecture).size_problem(self.input_size)) is not None:
            yield "input_size", f"{self.input_size} px does not fit: {problem}"
        for key, values in (("mean", self.mean), ("std", self.std)):
            if not (isinstance(values, list | tuple) and len(values) == 3 and all(_is_finite(v) for v in values)):
                yield key, f"{shown(values)} is not a list of 3 finite numbers (R, G, B)"
        if min(self.std) <= 0:
            yield "std", f"{shown(self.std)} holds a value <= 0"
        for key in ("weights_source", "version"):
            if not isinstance(getattr(self, key), str):
                yield key, f"{shown(getattr(self, key))} is not a text"
        for key in ("training", "metrics", "operating_points", "alignment", "head"):
            if not isinstance(getattr(self, key), dict):
                yield key, f"{shown(getattr(self, key))} is not a JSON object"
        for key in _TRAINING_TEXTS:
            if not isinstance(self.training.get(key, ""), str):
                yield f"training.{key}", f"{shown(self.training[key])} is not a text"
        yield from _point_problems(self.operating_points)


def _is_finite(value: Any) -> bool:
    """A JSON number (not a boolean) that is finite as a float."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond the float range
        return False


def _point_problems(stored: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """Problems of the stored operating points: `points` maps each criterion to a dict whose threshold is null
    (with a reason) or a finite number in [0, 1], and whose apcer and bpcer are null or rates in [0, 1]."""
    points = stored.get("points", {})
    if not isinstance(points, dict) or not all(isinstance(p, dict) for p in points.values()):
        yield "operating_points.points", f"{shown(points)} does not map each criterion to a JSON object"
    for name, point in points.items():
        key = f"operating_points.points.{shorten(name, 30)}"
        threshold = point.get("threshold")
        if threshold is None and not isinstance(point.get("reason"), str):
            yield key, "no threshold and no reason why"
        if threshold is not None and not (_is_finite(threshold) and 0 <= threshold <= _MAX_THRESHOLD):
            yield f"{key}.threshold", f"{shown(threshold)} is neither null nor a number in [0, 1]"
        for rate in ("apcer", "bpcer"):
            value = point.get(rate)
            if value is not None and not (_is_finite(value) and 0 <= value <= 1):
                yield f"{key}.{rate}", f"{shown(value)} is neither null nor a rate in [0, 1]"


def first_mismatch(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str | None:
    """The first tensor name (sorted) that is missing from `state`, unexpected in it, or of another shape than
    in `expected`; None when the two fit."""
    names = sorted(set(expected) ^ set(state))
    names += sorted(k for k in expected if k in state and expected[k].shape != state[k].shape)
    return names[0] if names else None


def save_checkpoint(path: str | Path, model: nn.Module | Mapping[str, torch.Tensor], meta: CheckpointMeta) -> Path:
    """Write `model`'s state dict (or the given tensors) and `meta` to `path` atomically, after `meta.validate` (a
    checkpoint that smadlrp writes always reads back); returns the path."""
    tensors = model.state_dict() if isinstance(model, nn.Module) else model
    return write_document(path, tensors, asdict(meta.validate(path)))


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
    model = arch.build(len(meta.class_names), image_size=meta.input_size)
    if meta.head:
        _install_frozen_head(model, arch.head_layers[0], meta.head, len(meta.class_names), path)
    state = {k: v for k, v in read_tensors(path).items() if not k.startswith(ADAPTER_PREFIX)}
    bad = first_non_finite(state)
    if bad is not None:
        raise SmadlrpError(f"{path}: not a valid smadlrp checkpoint: tensor {shorten(bad, 60)} holds NaN or infinity")
    expected = model.state_dict()
    wrong = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if wrong:
        raise SmadlrpError(f"{path}: tensor {wrong[0]!r} has shape {tuple(state[wrong[0]].shape)}, "
                           f"{arch.name} needs {tuple(expected[wrong[0]].shape)}")
    load_compatible_state(model, arch, state, source=str(path))
    return model.to(device).eval(), meta


def _install_frozen_head(model: nn.Module, layer: str, spec: dict[str, Any], classes: int, path: Path) -> None:
    """Put the frozen-feature head `spec` describes in place of the registry's Linear at `layer`."""
    from smadlrp.detector.frozen_heads import build_head  # scikit-learn, only for such checkpoints

    parent, _, name = layer.rpartition(".")
    linear = model.get_submodule(layer)
    if not isinstance(linear, nn.Linear):
        raise SmadlrpError(f"{path}: a frozen {spec.get('kind')} head needs a Linear at {layer!r}")
    try:
        setattr(model.get_submodule(parent), name, build_head(spec, linear.in_features, classes))
    except SmadlrpError as exc:
        raise SmadlrpError(f"{path}: not a valid smadlrp checkpoint: {exc.message}") from None


def newest_checkpoint(folder: Path, name: str = "best.safetensors") -> Path | None:
    """The most recently written `name` anywhere below `folder` (None when there is none)."""
    found = [p for p in folder.rglob(name) if p.is_file()] if folder.is_dir() else []
    return max(found, key=lambda p: (p.stat().st_mtime_ns, str(p)), default=None)


__all__ = [
    "ADAPTER_PREFIX",
    "CHECKPOINT_SCHEMA",
    "CheckpointMeta",
    "first_mismatch",
    "load_checkpoint",
    "load_meta",
    "newest_checkpoint",
    "save_checkpoint",
]
