"""Face embeddings from a user's own recogniser, read from a file: a `.safetensors` file with one 1-D tensor per
image, keyed by the image's path, or a `.npy` (N, D) float array (read with allow_pickle=False) with a sibling
`.txt` naming the image of each row, one path per line. Pickled files are refused. Such embeddings are compared by
their cosine similarity (higher = more alike).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import numpy.typing as npt

from smadlrp.core.errors import SmadlrpError, shorten, shown

Vector = npt.NDArray[np.float64]
SUFFIXES = (".safetensors", ".npy")
_REFUSED = "pickled files (.pkl, .pt, .pth, object arrays) are refused"


def image_key(text: str) -> str:
    """The key an image path is looked up by: forward slashes, no `./` parts (`./bonafide\\a.png` ->
    `bonafide/a.png`)."""
    return PurePosixPath(text.strip().replace("\\", "/")).as_posix()


@dataclass(frozen=True)
class EmbeddingTable:
    """The embeddings of one file: image key -> (D,) float64 vector, all of one length D, finite and non-zero."""

    file: Path
    vectors: Mapping[str, Vector]
    dim: int

    def get(self, key: str) -> Vector:
        """The embedding of the image `key` (an image path, see `image_key`); SmadlrpError when the file has none."""
        vector = self.vectors.get(image_key(key))
        if vector is None:
            example = next(iter(self.vectors))
            raise SmadlrpError(f"{self.file}: no embedding for the image {shown(key)} (keys are image paths relative "
                               f"to the morph folder, e.g. {shown(example)})")
        return vector


def load_embeddings(file: Path) -> EmbeddingTable:
    """Read and check an embedding file (`.safetensors` or `.npy` + `.txt`). SmadlrpError (one line) for a missing
    or unreadable file, a pickled file, a tensor that is not 1-D, a missing or extra path line, lengths that
    differ, a value that is not finite or an all-zero vector."""
    suffix = file.suffix.lower()
    if suffix not in SUFFIXES:
        raise SmadlrpError(f"--embeddings {file}: use a .safetensors file or a .npy array with a sibling .txt of "
                           f"image paths; {_REFUSED}", exit_code=2)
    if not file.is_file():
        raise SmadlrpError(f"embedding file not found: {file}")
    raw = _read_safetensors(file) if suffix == ".safetensors" else _read_npy(file)
    if not raw:
        raise SmadlrpError(f"{file}: holds no embeddings")
    vectors: dict[str, Vector] = {}
    dim = 0
    for key, array in raw.items():
        if array.ndim != 1 or array.size == 0:
            raise SmadlrpError(f"{file}: the embedding of {shown(key)} has shape {tuple(array.shape)}; each image "
                               "needs one non-empty 1-D vector")
        if array.dtype.kind not in "fiu":
            raise SmadlrpError(f"{file}: the embedding of {shown(key)} is of type {array.dtype}, not numbers")
        vector = array.astype(np.float64)
        if dim and vector.size != dim:
            raise SmadlrpError(f"{file}: embeddings of different lengths ({shown(next(iter(vectors)))} has {dim}, "
                               f"{shown(key)} has {vector.size})")
        if not np.isfinite(vector).all():
            raise SmadlrpError(f"{file}: the embedding of {shown(key)} holds a value that is not finite")
        if not np.any(vector):
            raise SmadlrpError(f"{file}: the embedding of {shown(key)} is all zeros (it has no cosine similarity)")
        dim = vector.size
        vectors[image_key(key)] = vector
    return EmbeddingTable(file, vectors, dim)


def _read_safetensors(file: Path) -> dict[str, npt.NDArray[np.generic]]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="numpy") as handle:
            return {key: np.asarray(handle.get_tensor(key)) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises SafetensorError, OSError, TypeError for unsupported dtypes
        raise SmadlrpError(f"{file}: not a readable safetensors file ({shorten(str(exc), 120)})") from None


def _read_npy(file: Path) -> dict[str, npt.NDArray[np.generic]]:
    try:
        array = np.load(file, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise SmadlrpError(f"{file}: holds pickled data; {_REFUSED} (save a float array with numpy.save)") from None
        raise SmadlrpError(f"{file}: not a readable .npy array ({shorten(str(exc), 120)})") from None
    except (OSError, EOFError) as exc:
        raise SmadlrpError(f"{file}: not a readable .npy array ({shorten(str(exc), 120)})") from None
    if not isinstance(array, np.ndarray) or array.ndim != 2:
        shape = tuple(array.shape) if isinstance(array, np.ndarray) else "an archive"
        raise SmadlrpError(f"{file}: a .npy embedding file holds one (N, D) array, one row per image; this one is "
                           f"{shape}")
    names = file.with_suffix(".txt")
    try:
        lines = names.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SmadlrpError(f"{file}: the image paths of its rows are missing: write {names}, one path per line") \
            from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SmadlrpError(f"{names}: unreadable ({shorten(str(exc), 120)})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != array.shape[0]:
        raise SmadlrpError(f"{names} lists {len(lines)} image paths but {file} has {array.shape[0]} rows")
    out: dict[str, npt.NDArray[np.generic]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise SmadlrpError(f"{names}, line {number}: empty image path")
        if image_key(line) in out:
            raise SmadlrpError(f"{names}, line {number}: {shown(line.strip())} is listed twice")
        out[image_key(line)] = array[number - 1]
    return out


def cosine_similarity(query: npt.ArrayLike, references: npt.ArrayLike) -> Vector:
    """Cosine similarity of a (D,) embedding with each row of (K, D) references: (K,) values in [-1, 1]."""
    q = np.asarray(query, dtype=np.float64)
    refs = np.asarray(references, dtype=np.float64).reshape(-1, q.size)
    return np.asarray(refs @ q / (np.linalg.norm(refs, axis=1) * np.linalg.norm(q)), dtype=np.float64)
