"""Input discovery and output naming for commands that read many images and write files per image."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from smadlrp.core.errors import SmadlrpError, UsageError
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

    `a/x.png` and `b/x.png` give `a__x` and `b__x`; `x.png` and `x.jpg` give `x_png` and `x_jpg`; a single image
    gives its own stem. Names that would still coincide (`sub/a.png` and `sub__a.png`) get `~2`, `~3`, ... in
    input order, so no two images ever share an output file.
    """
    resolved = [p.resolve() for p in images]
    if len(resolved) == 1:
        return [resolved[0].stem]
    common = Path(os.path.commonpath([p.parent for p in resolved]))
    stems = ["__".join(p.relative_to(common).with_suffix("").parts) for p in resolved]
    if len(set(stems)) != len(stems):  # inputs that differ by their extension alone: keep it in the name
        with_suffix = ["__".join(p.relative_to(common).parts).replace(".", "_") for p in resolved]
        stems = with_suffix if len(set(with_suffix)) == len(with_suffix) else stems
    unique: dict[str, None] = {}  # insertion-ordered set
    for stem in stems:  # what still coincides (`sub/a.png` and `sub__a.png`) gets a number
        name, number = stem, 1
        while name in unique:
            number += 1
            name = f"{stem}~{number}"
        unique[name] = None
    return list(unique)


def refuse_outputs_over_inputs(out: Path, images: Sequence[Path], option: str = "--out") -> None:
    """SmadlrpError, before any file is written, when an input image lies in the output folder `out` under a
    name that the per-image outputs (`STEM.KIND.png`, `STEM.RULE.KIND.png`, ...) could take."""
    folder, stems = out.resolve(), set(output_stems(images))
    for image in images:
        resolved = image.resolve()
        parts = resolved.name.split(".")
        if resolved.parent == folder and any(".".join(parts[:i]) in stems for i in range(1, len(parts) - 1)):
            raise UsageError(f"{option} {out} holds the input image {image.name}, whose name the outputs would "
                             f"take; choose another {option}")


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
