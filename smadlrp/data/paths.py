"""Input discovery and output naming for commands that read many images and write files per image."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from smadlrp.core.errors import SmadlrpError
from smadlrp.data.loading import IMAGE_EXTENSIONS, list_images


def collect_images(paths: Sequence[Path]) -> list[Path]:
    """Image files named directly or found recursively in folders, resolved, deduplicated, in input order."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            images = list_images(path)
            if not images:
                raise SmadlrpError(f"{path}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
            found.extend(images)
        elif path.is_file():
            found.append(path)
        else:
            raise SmadlrpError(f"no such file or folder: {path}")
    unique = dict.fromkeys(p.resolve() for p in found)
    return list(unique)


def output_stems(images: Sequence[Path]) -> list[str]:
    """A distinct, file-system-safe name per image, derived from its path below the inputs' common folder.

    `a/x.png` and `b/x.png` give `a__x` and `b__x`; a single image gives its own stem.
    """
    resolved = [p.resolve() for p in images]
    if len(resolved) == 1:
        return [resolved[0].stem]
    common = Path(os.path.commonpath([p.parent for p in resolved]))
    stems = ["__".join(p.relative_to(common).with_suffix("").parts) for p in resolved]
    if len(set(stems)) != len(stems):  # only when two inputs differ by their extension alone
        stems = ["__".join(p.relative_to(common).parts).replace(".", "_") for p in resolved]
    return stems


def prepare_out_dir(out: Path) -> Path:
    """Create the output folder; refuse a path that exists and is not a folder."""
    if out.exists() and not out.is_dir():
        raise SmadlrpError(f"--out {out} is an existing file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SmadlrpError(f"cannot create the output folder {out}: {exc.strerror or exc}") from None
    return out


def safe_output(out: Path, name: str, inputs: set[Path]) -> Path:
    """`out/name`, refusing a name that leaves `out` or that would overwrite one of the input files."""
    target = (out / name).resolve()
    if target.parent != out.resolve():
        raise SmadlrpError(f"output name {name!r} would leave the output folder {out}")
    if target in inputs:
        raise SmadlrpError(f"refusing to overwrite the input {target}; choose another --out")
    return target
