"""Face-region label maps: the region table, and reading a data set's maps (synthetic or user-supplied).

A region map is an 8-bit grayscale PNG of the image's size whose pixel values are region ids (REGIONS order:
0 left-eye ... 9 shortcut). It lies at `<regions folder>/<image path relative to the data root>`, with a .png
suffix whatever the image's: the synthetic generator writes its maps to `<data>/regions/`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from smadlrp.core.errors import SmadlrpError

# Region ids are positions in this tuple. Left and right are as seen in the image (the subject's right eye is
# the left eye of the image).
REGIONS: tuple[str, ...] = ("left-eye", "right-eye", "brows", "nose", "mouth", "face-skin", "face-outline",
                            "hair", "background", "shortcut")
REGION_ID: dict[str, int] = {name: i for i, name in enumerate(REGIONS)}
REGIONS_FOLDER = "regions"  # where a synthetic set keeps its maps, below the data root


def region_map_path(folder: Path, root: Path, image: Path) -> Path:
    """The map of `image` (below data root `root`) in region folder `folder`."""
    try:
        relative = image.resolve().relative_to(root.resolve())
    except ValueError:
        raise SmadlrpError(f"{image} is not below the data folder {root}") from None
    return (folder / relative).with_suffix(".png")


def read_region_map(path: Path, size: tuple[int, int]) -> npt.NDArray[np.uint8]:
    """The (H, W) uint8 region ids of the map at `path`, checked against its image's (width, height) `size`."""
    try:
        with Image.open(path) as img:
            img.load()
    except FileNotFoundError:
        raise SmadlrpError(f"no region map {path} for its image") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise SmadlrpError(f"{path}: not a readable region map ({str(exc).splitlines()[0][:100]})") from None
    if img.mode not in {"L", "P"}:
        raise SmadlrpError(f"{path}: a region map must be an 8-bit grayscale PNG of region ids, not mode {img.mode}")
    if img.size != size:
        raise SmadlrpError(f"{path}: region map is {img.size[0]}x{img.size[1]} but its image is {size[0]}x{size[1]}")
    ids = np.asarray(img, dtype=np.uint8)
    if int(ids.max()) >= len(REGIONS):
        raise SmadlrpError(f"{path}: region id {int(ids.max())} is not in the region table (0..{len(REGIONS) - 1})")
    return ids


def resize_region_map(ids: npt.NDArray[np.uint8], size: int) -> npt.NDArray[np.uint8]:
    """Nearest-neighbour resize of an (H, W) id map to (size, size), as the model input is resized."""
    if ids.shape == (size, size):
        return ids
    return np.asarray(Image.fromarray(ids, mode="L").resize((size, size), Image.Resampling.NEAREST))
