"""Cost of compare-rules' imputations: one region-perturbation curve (both orders) per image with `mean`, `blur`
and `road`, on vgg_compact with random weights at 64 px (or a checkpoint), against scoring alone.

    .venv/bin/python benchmarks/bench_imputation.py [--checkpoint demo/run/best.safetensors] [--images 16]
        [--steps 50] [--repeats 3]

For each imputation it times `perturbation_curve` on the same images and random maps (most and least relevant
first, 2 x (steps + 1) perturbed images per image, scored 128 at a time as compare-rules does with
--batch-size 32), alternating the imputations and taking medians, and prints ms per perturbed image and the ratio
to `mean` (whose imputation is free: its time is the scoring). ROAD solves one sparse system per perturbed image
on the CPU, whatever the device.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from smadlrp.detector.checkpoint import load_checkpoint
from smadlrp.detector.models import build_model
from smadlrp.explain.faithfulness import perturbation_curve
from smadlrp.explain.imputation import IMPUTATIONS, road_noise


def main(checkpoint: Path | None, images: int, steps: int, repeats: int) -> None:
    if checkpoint is None:
        torch.manual_seed(0)
        model, _ = build_model("vgg_compact", 2, "none")
        size, std = 64, (0.229, 0.224, 0.225)
    else:
        model, meta = load_checkpoint(checkpoint)
        size, std = meta.input_size, meta.std
    model.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(images, 3, size, size, generator=gen)
    maps = torch.rand(images, size, size, generator=gen)
    target = torch.ones(images, dtype=torch.int64)
    noise = road_noise(range(images), (3, size, size), 0, std)
    both = (torch.cat([x, x]), torch.cat([target, target]), torch.cat([maps, -maps]), torch.cat([noise, noise]))
    patch = max(1, size // 16)
    times: dict[str, list[float]] = {name: [] for name in IMPUTATIONS}
    with torch.no_grad():
        for _ in range(repeats):
            for name in IMPUTATIONS:
                start = time.perf_counter()
                perturbation_curve(model, both[0], both[1], both[2], patch, steps, 128, name,
                                   both[3] if name == "road" else None)
                times[name].append(time.perf_counter() - start)
    perturbed = 2 * images * (steps + 1)
    base = statistics.median(times["mean"])
    print(f"{images} images, {steps} steps, {patch}-px patches at {size} px: {perturbed} perturbed images, "
          f"{torch.get_num_threads()} threads")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:5} {1000 * median / perturbed:7.2f} ms / perturbed image   x{median / base:.2f} of mean")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    main(args.checkpoint, args.images, args.steps, args.repeats)
