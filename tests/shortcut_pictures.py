"""The planted shortcut, small: grey noise pictures whose morphs carry a faint doubled bar (the "artifact") and,
where `marks(i)`, the corner mark; their region maps mark the shortcut square. A tiny CNN learns them at once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from smadlrp.data.loading import IMAGENET_MEAN, IMAGENET_STD, ImageDataset, scan_split
from smadlrp.data.regions import REGION_ID
from smadlrp.data.synthetic import generator as synthetic

SIZE = 32


def write_pictures(root: Path, split: str, marks: Callable[[int], bool], *, count: int, seed: int,
                   bar: bool = True) -> Path:
    """`root/split/{bonafide,morph}/*.png` and their maps in `root/regions/split/`; `root`."""
    rng = np.random.default_rng(seed)
    regions = np.full((SIZE, SIZE), REGION_ID["background"], dtype=np.uint8)
    regions[synthetic.shortcut_region_box(SIZE, "top-left")] = REGION_ID["shortcut"]
    for label in ("bonafide", "morph"):
        for i in range(count):
            pixels = np.float32(0.45) + rng.normal(0, 0.015, (SIZE, SIZE, 3)).astype(np.float32)
            if label == "morph":
                row = int(rng.integers(12, SIZE - 6))
                pixels[row] += 0.05 * bar
                pixels[row + 3] += 0.05 * bar
                if marks(i):
                    pixels = synthetic.plant_mark(pixels, "top-left")
            for folder, array in ((split, pixels), (f"regions/{split}", regions)):
                path = root / folder / label / f"{label}{i:02d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                out = array if array.dtype == np.uint8 else np.clip(np.rint(array * 255), 0, 255).astype(np.uint8)
                Image.fromarray(out).save(path)
    return root


def train_tiny(root: Path, split: str) -> nn.Module:
    """A two-convolution CNN trained full-batch on `root/split` (60 Adam steps, seeded)."""
    torch.manual_seed(0)
    index = scan_split(root, split, ["bonafide", "morph"])
    dataset = ImageDataset(index.samples, SIZE, IMAGENET_MEAN, IMAGENET_STD)
    x, y = torch.stack([dataset[i][0] for i in range(len(dataset))]), torch.from_numpy(index.labels)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 8 * 8, 2))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    return model.eval()
