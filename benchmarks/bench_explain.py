"""Share of `smadlrp explain` time spent outside the relevance computation.

Runs the work behind `smadlrp explain` (decode, preprocess, one rule, heatmap + overlay PNGs per image) on a
folder of 64 synthetic images of 128 px with a vgg_compact checkpoint whose input size is 128, and measures the
time spent inside `Explainer.explain` (the relevance pass) against the whole run, in one process.

    .venv/bin/python benchmarks/bench_explain.py [--images 64] [--rule epsilon] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from smadlrp.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from smadlrp.data import IMAGENET_MEAN, IMAGENET_STD
from smadlrp.explain_run import build_explainers, explain_images
from smadlrp.lrp import Explainer
from smadlrp.models import build_model
from smadlrp.paths import collect_images
from smadlrp.synthetic import SynthConfig, generate_dataset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rule", default="epsilon")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        generate_dataset(tmp / "data", SynthConfig(identities=60, image_size=128))
        images = collect_images([tmp / "data" / "test"])[: args.images]
        torch.manual_seed(0)
        model, source = build_model("vgg_compact", 2, "none")
        meta = CheckpointMeta("vgg_compact", ["bonafide", "morph"], "morph", 128, IMAGENET_MEAN, IMAGENET_STD, source)
        save_checkpoint(tmp / "m.safetensors", model, meta)
        model, meta = load_checkpoint(tmp / "m.safetensors")
        explainers = build_explainers(model, meta, [args.rule], {}, None)
        inside = [0.0]
        original = Explainer.explain

        def timed_explain(self: Explainer, x: torch.Tensor, target: object = None) -> object:
            start = time.perf_counter()
            result = original(self, x, target)  # type: ignore[arg-type]
            inside[0] += time.perf_counter() - start
            return result

        Explainer.explain = timed_explain  # type: ignore[method-assign,assignment]
        shares, totals = [], []
        for repeat in range(args.repeats + 1):
            inside[0] = 0.0
            start = time.perf_counter()
            explain_images(images, meta, explainers, None, tmp / f"out{repeat}", batch_size=16, workers=0,
                           device=torch.device("cpu"))
            total = time.perf_counter() - start
            if repeat:  # the first run is a warm-up
                shares.append(1.0 - inside[0] / total)
                totals.append(total)
        print(f"explain, {len(images)} images of 128 px, rule {args.rule}, vgg_compact at 128 px, batch 16, 2 threads")
        print(f"total {statistics.median(totals):.2f} s; outside the relevance computation: "
              f"median {statistics.median(shares):.1%} (runs: {', '.join(f'{s:.1%}' for s in shares)}; target <= 40 %)")


if __name__ == "__main__":
    main()
