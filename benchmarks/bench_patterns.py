"""Pattern fitting speed and memory on torchvision VGG11 (random weights, 224x224, two classes, batch 8).

Speed: images/s of a plain training step (forward + backward + SGD step) and of `fit_patterns` (kind positive)
on the same model and batch size in one process, one training step before each fit batch so that both see the
same machine load; the ratio fit/train is the figure.
Memory: peak RSS of a process that builds the model and fits patterns over N random images, one subprocess
per N.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_patterns.py                 # both, 2 CPU threads
    PYTHONPATH=. .venv/bin/python benchmarks/bench_patterns.py --only speed --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import torch
import torchvision
from torch import nn

from smadlrp.lrp.patterns import fit_patterns

BATCH = 8
SIZE = 224
TORCHLRP_RATIO = 1.9 / 4.6  # TorchLRP's fitter vs a training step on the same machine (34 s for 64 images)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.vgg11(weights=None, num_classes=2)


class _RandomBatches:
    """The same random batches on every iteration, made one at a time (memory does not grow with `images`)."""

    def __init__(self, images: int, device: torch.device) -> None:
        self.images = images
        self.device = device

    def __iter__(self) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(1)
        for start in range(0, self.images, BATCH):
            yield torch.randn(min(BATCH, self.images - start), 3, SIZE, SIZE, generator=generator).to(self.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Trainer:
    """Plain training steps (forward + backward + SGD with momentum) on one fixed batch, timed one by one."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model.train()
        self.optimiser = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.x = torch.randn(BATCH, 3, SIZE, SIZE, device=device)
        self.target = torch.randint(0, 2, (BATCH,), device=device)
        self.device = device

    def step(self) -> float:
        """Seconds one step took."""
        _sync(self.device)
        start = time.perf_counter()
        with torch.enable_grad():  # steps run from inside the fit's batch iterator, which is under no_grad
            self.optimiser.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(self.model(self.x), self.target).backward()
            self.optimiser.step()
        _sync(self.device)
        return time.perf_counter() - start


class _Interleaved:
    """Random fit batches with a training step before each one, so that both see the same machine load; the
    clock holds seconds spent in training steps and in the fit (between the batches it asks for)."""

    def __init__(self, trainer: _Trainer, images: int, device: torch.device) -> None:
        self.trainer = trainer
        self.batches = _RandomBatches(images, device)
        self.clock = {"train": 0.0, "fit": 0.0, "mark": 0.0}

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.batches:
            self.stop_fit_clock()
            self.clock["train"] += self.trainer.step()
            self.clock["mark"] = time.perf_counter()
            yield batch

    def stop_fit_clock(self) -> None:
        if self.clock["mark"]:
            _sync(self.batches.device)
            self.clock["fit"] += time.perf_counter() - self.clock["mark"]
            self.clock["mark"] = 0.0


def _interleaved_round(
    trainer: _Trainer, fit_model: nn.Module, images: int, device: torch.device
) -> dict[str, float]:
    """One fit (both passes) over `images` random images, interleaved with training steps; returns images/s of
    each (the fit's includes computing the patterns)."""
    batches = _Interleaved(trainer, images, device)
    fit_patterns(fit_model, batches, ("positive",), device=device)
    batches.stop_fit_clock()
    steps = 2 * -(-images // BATCH)
    train, fit = steps * BATCH / batches.clock["train"], images / batches.clock["fit"]
    return {"train_img_s": train, "fit_img_s": fit, "ratio": fit / train}


def speed(device: torch.device, repeats: int, fit_images: int) -> dict[str, object]:
    model = _model().to(device)
    fit_model = copy.deepcopy(model).eval()
    trainer = _Trainer(model, device)
    _interleaved_round(trainer, fit_model, BATCH, device)  # warm-up
    rounds = [_interleaved_round(trainer, fit_model, fit_images, device) for _ in range(repeats)]
    ratio = statistics.median(r["ratio"] for r in rounds)
    return {"rounds": rounds, "median_ratio": ratio, "vs_torchlrp": ratio / TORCHLRP_RATIO}


def memory(device: torch.device, images: int) -> dict[str, object]:
    model = _model().to(device).eval()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fit_patterns(model, _RandomBatches(images, device), ("positive",), device=device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"images": images, "peak_rss_mib": peak / 1024, "model_rss_mib": before / 1024}


def _child(args: list[str]) -> dict[str, object]:
    done = subprocess.run([sys.executable, __file__, *args], check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["speed", "memory"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--fit-images", type=int, default=64)
    parser.add_argument("--memory-images", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--child", choices=["speed", "memory"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.child == "speed":
        print(json.dumps(speed(device, args.repeats, args.fit_images)))
        return
    if args.child == "memory":
        print(json.dumps(memory(device, args.memory_images[0])))
        return
    common = ["--device", args.device, "--threads", str(args.threads)]
    if args.only in (None, "speed"):
        result = _child(["--child", "speed", "--repeats", str(args.repeats), "--fit-images",
                         str(args.fit_images), *common])
        for r in result["rounds"]:  # type: ignore[attr-defined]
            print(f"train {r['train_img_s']:.2f} img/s  fit {r['fit_img_s']:.2f} img/s  "
                  f"ratio {r['ratio']:.2f}")
        print(f"median fit/train ratio {result['median_ratio']:.2f} (target >= 0.7; TorchLRP "
              f"{TORCHLRP_RATIO:.2f}); {result['vs_torchlrp']:.2f}x TorchLRP's relative speed")
    if args.only in (None, "memory"):
        peaks = []
        for images in args.memory_images:
            result = _child(["--child", "memory", "--memory-images", str(images), *common])
            peak, base = float(result["peak_rss_mib"]), float(result["model_rss_mib"])  # type: ignore[arg-type]
            gigabytes = peak * 2**20 / 1e9
            print(f"{images:4d} images: peak RSS {peak:.0f} MiB = {gigabytes:.2f} GB (target <= 2.55 GB); "
                  f"{base:.0f} MiB after building the model, so the fit adds {peak - base:.0f} MiB")
            peaks.append(peak)
        print(f"peak RSS spread {100 * (max(peaks) / min(peaks) - 1):.1f} % (target <= 5 %)")


if __name__ == "__main__":
    main()
