"""Share of `smadlrp explain` time spent outside the relevance computation.

Runs the work behind `smadlrp explain` (decode, preprocess, one rule, heatmap + overlay PNGs per image) on a
folder of 64 synthetic images of 128 px with checkpoints whose input size is 128, and measures the time spent
inside `Explainer.explain` (the relevance pass) against the whole run, in one process. Each round runs the
files on smadlrp's background writer thread and, for comparison, synchronously (the same jobs run in place).

    .venv/bin/python benchmarks/bench_explain.py [--images 64] [--rule epsilon] [--repeats 3]
        [--architectures vgg_compact resnet18]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from smadlrp.data.loading import IMAGENET_MEAN, IMAGENET_STD
from smadlrp.data.paths import collect_images
from smadlrp.data.synthetic.generator import SynthConfig, generate_dataset
from smadlrp.detector.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from smadlrp.detector.models import build_model
from smadlrp.explain import run as explain_run
from smadlrp.explain.run import BackgroundWriter, build_explainers, explain_images
from smadlrp.lrp import Explainer

SIZE = 128


class InPlaceWriter(BackgroundWriter):
    """The same file jobs, run synchronously in the caller's thread."""

    def submit(self, job: Callable[[], None]) -> None:
        job()


class RelevanceClock:
    """Seconds spent inside Explainer.explain, accumulated while installed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        original = Explainer.explain

        def timed(explainer: Explainer, x: torch.Tensor, target: object = None) -> object:
            start = time.perf_counter()
            result = original(explainer, x, target)  # type: ignore[arg-type]
            self.seconds += time.perf_counter() - start
            return result

        Explainer.explain = timed  # type: ignore[method-assign,assignment]


def _checkpoint(folder: Path, architecture: str) -> Path:
    torch.manual_seed(0)
    model, source = build_model(architecture, 2, "none")
    meta = CheckpointMeta(architecture, ["bonafide", "morph"], "morph", SIZE, IMAGENET_MEAN, IMAGENET_STD, source)
    path = folder / f"{architecture}.safetensors"
    save_checkpoint(path, model, meta)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rule", default="epsilon")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--architectures", nargs="+", default=["vgg_compact", "resnet18"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    clock = RelevanceClock()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        generate_dataset(tmp / "data", SynthConfig(identities=60, image_size=SIZE))
        images = collect_images([tmp / "data" / "test"])[: args.images]
        print(f"explain, {len(images)} images of {SIZE} px, rule {args.rule}, batch 16, 2 threads; "
              f"median of {args.repeats} rounds after a warm-up")
        for architecture in args.architectures:
            model, meta = load_checkpoint(_checkpoint(tmp, architecture))
            explainers = build_explainers(model, meta, [args.rule], {}, None)
            figures: dict[str, list[tuple[float, float]]] = {"background": [], "in place": []}
            for repeat in range(args.repeats + 1):
                for mode, writer in (("background", BackgroundWriter), ("in place", InPlaceWriter)):
                    explain_run.BackgroundWriter = writer  # type: ignore[misc]
                    clock.seconds = 0.0
                    start = time.perf_counter()
                    explain_images(images, meta, explainers, None, tmp / f"out-{architecture}-{mode}-{repeat}",
                                   batch_size=16, workers=0, device=torch.device("cpu"))
                    total = time.perf_counter() - start
                    if repeat:  # the first round is a warm-up
                        figures[mode].append((total, 1.0 - clock.seconds / total))
            explain_run.BackgroundWriter = BackgroundWriter  # type: ignore[misc]
            for mode, rows in figures.items():
                total = statistics.median(t for t, _ in rows)
                share = statistics.median(s for _, s in rows)
                print(f"{architecture:12s} files {mode:10s}: total {total:.2f} s ({1e3 * total / len(images):.1f} "
                      f"ms/image); outside the relevance computation {share:.1%} "
                      f"(rounds: {', '.join(f'{s:.1%}' for _, s in rows)}; target <= 40 %)")


if __name__ == "__main__":
    main()
