"""The fitted PatternNet patterns: pattern sets, their safetensors file and the weights fingerprint they carry."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from smadlrp.core.container import first_non_finite, read_document, read_tensors, write_document
from smadlrp.core.errors import SmadlrpError, shorten

KINDS = ("all", "positive")
SCHEMA = "smadlrp.patterns/1"
FINGERPRINT_KEY = "weights_fingerprint"
# A unit is degenerate when var(y_j) <= DEGENERATE_RTOL * E[y_j^2] (over its samples): y_j is constant.
DEGENERATE_RTOL = 1e-6
ESTIMATORS = {
    "all": "a_j = cov(x, y_j) / (w_j^T cov(x, y_j)), cov(x, y_j) = E[x y_j] - E[x] E[y_j] over all samples; "
    "y_j = w_j^T x without bias; a convolution's samples are its input patches at every output position",
    "positive": "a+_j = cov+(x, y_j) / (w_j^T cov+(x, y_j)), cov+(x, y_j) = E+[x y_j] - E+[x] E+[y_j] where "
    "E+ averages over the samples with y_j + b_j > 0; y_j = w_j^T x without bias",
}
FALLBACK = (
    "degenerate unit (no samples, no active samples, non-finite statistics, or var(y_j) = w_j^T cov(x, y_j) "
    f"<= {DEGENERATE_RTOL:g} E[y_j^2] over its samples): a_j = w_j / (w_j^T w_j), or 0 when w_j = 0"
)
_RESERVED_KEYS = frozenset({"schema", "kinds", "images", "estimators", "fallback", "stats"})


@dataclass
class LayerFitStats:
    """What one layer's fit saw: `samples` per unit (images x output positions), the share of (sample, unit)
    pairs that were active (positive kind only), how many of its `units` fell back to the default pattern."""

    name: str
    samples: int
    active_share: float | None
    degenerate_units: int
    units: int


@dataclass
class PatternSet:
    """Fitted patterns of one estimator kind; each pattern has its layer's weight shape and dtype (CPU)."""

    kind: str
    patterns: dict[str, torch.Tensor]
    stats: list[LayerFitStats]
    images: int


def save_patterns(
    path: str | os.PathLike[str], sets: Mapping[str, PatternSet], metadata: Mapping[str, Any]
) -> None:
    """Write `sets` to a safetensors file (atomically): tensors "{kind}/{layer}", JSON header key "smadlrp".

    `metadata` (JSON-serialisable, e.g. the weights fingerprint under "weights_fingerprint") is stored beside
    the schema, kinds, image count, estimator definitions and per-layer stats.
    """
    clash = _RESERVED_KEYS & metadata.keys()
    if clash:
        raise ValueError(f"metadata keys {sorted(clash)} are reserved for the pattern file itself")
    if not sets:
        raise ValueError("no pattern sets to save")
    images = {s.images for s in sets.values()}
    if len(images) != 1:
        raise ValueError("pattern sets saved together must come from one fit (same number of images)")
    header = {
        "schema": SCHEMA,
        "kinds": list(sets),
        "images": images.pop(),
        "estimators": {kind: ESTIMATORS[kind] for kind in sets},
        "fallback": FALLBACK,
        "stats": {kind: [asdict(s) for s in pattern_set.stats] for kind, pattern_set in sets.items()},
        **metadata,
    }
    tensors = {
        f"{kind}/{name}": tensor.detach().cpu().contiguous()
        for kind, pattern_set in sets.items()
        for name, tensor in pattern_set.patterns.items()
    }
    write_document(path, tensors, header)


def _read_file(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The decoded "smadlrp" metadata and the tensors of a pattern file, or SmadlrpError saying why not."""
    meta = read_document(path)
    if meta["schema"] != SCHEMA:
        raise SmadlrpError(f"{path} has schema {meta['schema']!r}; smadlrp reads pattern files of {SCHEMA}")
    return meta, read_tensors(path)


def load_patterns(path: str | os.PathLike[str]) -> tuple[dict[str, PatternSet], dict[str, Any]]:
    """Read a pattern file written by `save_patterns`: (kind -> PatternSet, the full metadata dict)."""
    meta, tensors = _read_file(path)
    try:
        kinds = list(meta["kinds"])
        stats = {kind: [LayerFitStats(**row) for row in meta["stats"][kind]] for kind in kinds}
        images = int(meta["images"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SmadlrpError(f"{path} is a damaged pattern file (metadata: {exc!r})") from exc
    sets: dict[str, PatternSet] = {}
    for kind in kinds:
        prefix = f"{kind}/"
        patterns = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
        if kind not in KINDS or sorted(patterns) != sorted(s.name for s in stats[kind]):
            raise SmadlrpError(f"{path} is a damaged pattern file (kind {kind!r} does not match its tensors)")
        sets[kind] = PatternSet(kind, patterns, stats[kind], images)
    if sum(len(s.patterns) for s in sets.values()) != len(tensors):
        raise SmadlrpError(f"{path} is a damaged pattern file (it holds tensors of an unlisted kind)")
    bad = first_non_finite(tensors)
    if bad is not None:
        raise SmadlrpError(f"{path} is a damaged pattern file (tensor {shorten(bad, 60)} holds NaN or infinity)")
    return sets, meta


def weights_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 hex digest over every entry's name, dtype, shape and raw bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_fingerprint(meta: Mapping[str, Any], expected: str) -> None:
    """Raise SmadlrpError unless the pattern file's metadata names the weights fingerprint `expected`."""
    found = meta.get(FINGERPRINT_KEY)
    if found is None:
        raise SmadlrpError("the pattern file records no weights fingerprint; refit with smadlrp fit-patterns")
    if found != expected:
        raise SmadlrpError(
            f"patterns were fitted on another model (weights {str(found)[:12]}..., this checkpoint has "
            f"{expected[:12]}...); refit with smadlrp fit-patterns"
        )
