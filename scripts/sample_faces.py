"""Write the real faces that ship with matplotlib and scikit-image into a folder, as photographs to try smadlrp on.

    python scripts/sample_faces.py FOLDER [--size 160]

FOLDER/portraits/: Grace Hopper (matplotlib's grace_hopper.jpg) and the astronaut Eileen Collins (scikit-image's
astronaut), as they are. FOLDER/lfw/: the 100 faces of scikit-image's `lfw_subset` (Labeled Faces in the Wild,
25 x 25 px grayscale, roughly aligned), upscaled to --size px with bicubic interpolation. Each file is one
person; the LFW subset carries no names, so each face is its own subject.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from matplotlib import cbook
from PIL import Image
from skimage import data


def write_sample_faces(folder: Path, size: int = 160) -> list[Path]:
    """Write the two portraits and the 100 LFW faces below `folder`; their paths."""
    written = []
    (folder / "portraits").mkdir(parents=True, exist_ok=True)
    (folder / "lfw").mkdir(exist_ok=True)
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as hopper:
        hopper.convert("RGB").save(folder / "portraits" / "hopper.png")
    Image.fromarray(data.astronaut()).save(folder / "portraits" / "collins.png")
    written += [folder / "portraits" / "hopper.png", folder / "portraits" / "collins.png"]
    for i, face in enumerate(data.lfw_subset()[:100]):
        small = Image.fromarray(np.rint(face * 255).astype(np.uint8), mode="L")
        path = folder / "lfw" / f"lfw{i:03d}.png"
        small.resize((size, size), Image.Resampling.BICUBIC).convert("RGB").save(path)
        written.append(path)
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--size", type=int, default=160)
    args = parser.parse_args()
    print(f"wrote {len(write_sample_faces(args.folder, args.size))} faces below {args.folder}")
