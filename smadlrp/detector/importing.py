"""Reading PyTorch `.pth` files without running their code, and `import-model`: a `.pth` model as a checkpoint.

`torch.load(weights_only=True)` first; a file that needs full unpickling is refused unless the caller trusts it,
and a file that is no PyTorch file at all (or a damaged one) is told apart from one that holds pickled objects.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import torch

from smadlrp.core.container import first_non_finite
from smadlrp.core.errors import SmadlrpError, UsageError, shorten
from smadlrp.data.loading import IMAGENET_MEAN, IMAGENET_STD
from smadlrp.detector.checkpoint import CheckpointMeta, first_mismatch, save_checkpoint
from smadlrp.detector.models import get_architecture

IMPORT_OPTIONS = {"class_names": "--classes", "attack_class": "--attack-class", "input_size": "--image-size"}


def import_checkpoint(source: Path, out: Path, arch: str, class_names: list[str], attack_class: str,
                      image_size: int = 0, trust_pickle: bool = False,
                      notify: Callable[[str], None] = lambda message: None) -> tuple[CheckpointMeta, str | None]:
    """Write the `.pth` model `source` (a state dict, nested under a usual key, or with `trust_pickle` a whole
    pickled model) as the smadlrp checkpoint `out` of `arch` with ImageNet normalisation; returns its metadata and
    the key the weights were nested under. The metadata is checked before the file is read (UsageError naming
    the option), the tensors must fit `arch` and be finite."""
    spec = get_architecture(arch)
    meta = CheckpointMeta(architecture=arch, class_names=class_names, attack_class=attack_class,
                          input_size=image_size or spec.input_size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                          weights_source=f"imported from {source.name}")
    problem = meta.first_problem()  # the checks every checkpoint read passes, before any work
    if problem is not None:
        raise UsageError(f"{IMPORT_OPTIONS.get(problem[0], problem[0])}: {problem[1]}")
    state, key = load_pth(source, trust_pickle)
    if key is not None:
        notify(f"{source.name}: using the weights under its {key!r} key")
        meta.weights_source += f" (key {key})"
    model = spec.build(len(class_names), image_size=meta.input_size)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    mismatch = first_mismatch(model.state_dict(), state)
    if mismatch is not None:
        raise SmadlrpError(f"{source} does not hold {arch} weights for {len(class_names)} classes "
                           f"(first mismatch: {mismatch!r}); check --arch and --classes")
    bad = first_non_finite(state)
    if bad is not None:
        raise SmadlrpError(f"{source}: tensor {bad!r} holds NaN or infinity")
    model.load_state_dict(state)
    save_checkpoint(out, model, meta)
    return meta, key


NESTING_KEYS = ("state_dict", "model_state_dict", "model")  # where training scripts keep the weights


def _is_state_dict(value: object) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def load_pth(source: Path, trust_pickle: bool = False, advice: str = "rerun with --trust-pickle"
             ) -> tuple[dict[str, torch.Tensor], str | None]:
    """A state dict from the `.pth` file `source` and the key it was nested under (None: the file is the state
    dict or the model); whole pickled models only with `trust_pickle` (else the error ends with `advice`)."""
    try:
        loaded = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the file's content decides; report it in one line
        if not _holds_other_objects(source, exc):
            raise SmadlrpError(_not_loadable(source, exc)) from None
        if not trust_pickle:
            raise SmadlrpError(
                f"{source} holds pickled Python objects (e.g. a whole model saved with torch.save(model)); "
                "unpickling can run arbitrary code, so only weights_only loading was tried. "
                f"If you trust the file, {advice}"
            ) from None
        try:
            loaded = torch.load(source, map_location="cpu", weights_only=False)
        except Exception as inner:  # noqa: BLE001
            raise SmadlrpError(f"{source}: cannot be loaded ({shorten(str(inner))})") from exc
    key = None
    if isinstance(loaded, dict) and not _is_state_dict(loaded):
        key = next((k for k in NESTING_KEYS if k in loaded), None)
        if key is None:
            found = ", ".join(repr(k) for k in list(loaded)[:8]) or "none"
            raise SmadlrpError(f"{source}: neither a model nor a state dict of tensors, and none of the keys where "
                               f"training scripts keep the weights ({', '.join(NESTING_KEYS)}); its keys: {found}. "
                               "Save the model's state_dict() on its own")
        loaded = loaded[key]
    if isinstance(loaded, torch.nn.Module):
        loaded = loaded.state_dict()
    if not _is_state_dict(loaded):
        where = f"its {key!r} entry is" if key else "it is"
        raise SmadlrpError(f"{source}: {where} neither a model nor a state dict of tensors")
    return loaded, key


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive format (PyTorch >= 1.6)
_PICKLE_PROTOCOLS = range(2, 6)  # the legacy format: a pickle, protocol 2 or later (b"\x80" + protocol byte)


def _looks_like_pytorch(source: Path) -> bool:
    """Does `source` start like a file of torch.save: a zip archive, or a pickle of protocol 2 or later?"""
    with source.open("rb") as fh:
        head = fh.read(4)
    return head == _ZIP_MAGIC or (len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS)


def _holds_other_objects(source: Path, exc: Exception) -> bool:
    """Did weights_only loading refuse a PyTorch file because it holds objects other than tensors and plain
    containers (whereas garbage, an empty file or a truncated archive fails in other ways)?"""
    refused = isinstance(exc, pickle.UnpicklingError) and str(exc).startswith("Weights only load failed")
    return refused and _looks_like_pytorch(source)


def _not_loadable(source: Path, exc: Exception) -> str:
    """The one-line reason why `source` is no PyTorch file, or a damaged one."""
    if source.stat().st_size == 0:
        return f"{source}: an empty file, not a PyTorch model"
    if not _looks_like_pytorch(source):
        return f"{source}: not a PyTorch model file (neither a torch.save zip archive nor a pickle)"
    reason = "it ends too early" if isinstance(exc, EOFError) else shorten(str(exc))
    return f"{source}: a damaged or truncated PyTorch file ({reason})"
