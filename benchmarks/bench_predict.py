"""Throughput of `smadlrp predict`'s scoring against a bare `torch.no_grad()` loop over the same images.

Both decode the same PNG files with the same preprocessing (the checkpoint's resize and normalisation) and run
the same model in eval mode, in batches of the same size; the bare loop stacks the tensors itself and keeps only
the softmax, while `score_files` goes through a DataLoader, tolerates unreadable files and builds per-image
results. Rounds alternate in one process; the figure is the median of the per-round ratios (target >= 0.9).

    .venv/bin/python benchmarks/bench_predict.py [--images 256] [--size 128] [--batch-size 64] [--repeats 5]
        [--architectures vgg_compact resnet18]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from smadlrp.data.loading import IMAGENET_MEAN, IMAGENET_STD, ImageDataset, Sample
from smadlrp.detector.checkpoint import CheckpointMeta
from smadlrp.detector.inference import score_files
from smadlrp.detector.models import build_model, get_architecture


def _images(folder: Path, count: int, size: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"img{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def bare_loop(model: torch.nn.Module, meta: CheckpointMeta, paths: list[Path], batch_size: int) -> list[float]:
    """The reference: decode and preprocess each batch, then one forward pass under no_grad."""
    dataset = ImageDataset([Sample(p, 0) for p in paths], meta.input_size, meta.mean, meta.std)
    scores: list[float] = []
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            x = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(paths)))])
            scores += torch.softmax(model(x), dim=1)[:, meta.attack_index].tolist()
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=128, help="side of the PNG files, pixels")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--architectures", nargs="+", default=["vgg_compact", "resnet18"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        paths = _images(Path(tmp), args.images, args.size)
        print(f"{args.images} PNG images of {args.size} px, batch {args.batch_size}, {args.repeats} rounds, "
              f"{torch.get_num_threads()} threads")
        for arch in args.architectures:
            torch.manual_seed(0)
            model, source = build_model(arch, 2, "none")
            model.eval()
            meta = CheckpointMeta(arch, ["bonafide", "morph"], "morph", get_architecture(arch).input_size,
                                  IMAGENET_MEAN, IMAGENET_STD, source)
            ratios, rates = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                reference = bare_loop(model, meta, paths, args.batch_size)
                bare = time.perf_counter() - start
                start = time.perf_counter()
                results = score_files(model, meta, paths, batch_size=args.batch_size, device=device)
                ours = time.perf_counter() - start
                assert np.allclose([r.score for r in results], reference, rtol=0, atol=1e-6)
                ratios.append(bare / ours)
                rates.append(args.images / ours)
            print(f"{arch} ({meta.input_size} px input): predict / bare throughput {statistics.median(ratios):.3f} "
                  f"(rounds {', '.join(f'{r:.3f}' for r in ratios)}); predict {statistics.median(rates):.1f} img/s")


if __name__ == "__main__":
    main()
