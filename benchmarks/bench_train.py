"""Overhead of `evaluate` and of a `finetune` epoch against bare PyTorch loops over the same batches.

Prints images/s of smadlrp's scoring pass (`smadlrp.detector.inference.predict`, what `evaluate` runs) against a bare
`torch.no_grad()` loop over the same DataLoader and model, and the time of one `finetune` training epoch
(`Finetuner._train_pass`) against a bare training loop (forward, loss, zero_grad, backward, step) over the same
DataLoader. Runs alternate and the median of each is reported, so machine noise hits both sides alike.

    .venv/bin/python benchmarks/bench_train.py [--images 512] [--size 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import write_tiny_dataset  # noqa: E402

from smadlrp.detector.inference import predict  # noqa: E402
from smadlrp.detector.train import Callbacks, Finetuner, TrainConfig  # noqa: E402


def bare_eval(model: nn.Module, loader: torch.utils.data.DataLoader) -> None:  # type: ignore[type-arg]
    model.eval()
    with torch.no_grad():
        for images, _, _ in loader:
            torch.softmax(model(images), dim=1)


def bare_train(model: nn.Module, loader: torch.utils.data.DataLoader, opt: torch.optim.Optimizer) -> None:  # type: ignore[type-arg]
    model.train()
    for images, targets, _ in loader:
        loss = nn.functional.cross_entropy(model(images), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def timed(fn: object, *args: object) -> float:
    start = time.perf_counter()
    fn(*args)  # type: ignore[operator]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=512, help="images per split and class pair (train split)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_tiny_dataset(Path(tmp), per_class=args.images // 2, size=128)
        config = TrainConfig(arch="vgg_compact", epochs=1, batch_size=32, image_size=args.size, full=True,
                             weights="none", optimizer="adam")
        tuner = Finetuner(config, root, Path(tmp) / "run", torch.device("cpu"))
        loader = tuner.train_loader
        model = tuner.model
        ours_eval, bare_eval_t, ours_train, bare_train_t = [], [], [], []
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        predict(model, loader, torch.device("cpu"), 1)  # warm-up
        for _ in range(args.repeats):
            ours_eval.append(timed(predict, model, loader, torch.device("cpu"), 1))
            bare_eval_t.append(timed(bare_eval, model, loader))
            ours_train.append(timed(tuner._train_pass, Callbacks()))
            bare_train_t.append(timed(bare_train, model, loader, opt))
        n = len(loader.dataset)  # type: ignore[arg-type]
        print(f"vgg_compact, {n} images at {args.size} px, batch 32, 2 threads, {args.repeats} alternating runs")
        for label, pick in (("median", statistics.median), ("min", min)):
            e_ours, e_bare = pick(ours_eval), pick(bare_eval_t)
            t_ours, t_bare = pick(ours_train), pick(bare_train_t)
            print(f"[{label}] evaluate scoring {n / e_ours:7.1f} img/s vs bare no_grad loop {n / e_bare:7.1f} img/s:"
                  f" ratio {e_bare / e_ours:.3f} (target >= 0.9)")
            print(f"[{label}] finetune epoch {t_ours:6.2f} s vs bare training loop {t_bare:6.2f} s:"
                  f" ratio {t_ours / t_bare:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
