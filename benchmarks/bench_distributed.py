"""Throughput of `finetune` and `evaluate` on 1 and on N processes (torchrun, gloo on the CPU), one thread each.

For each process count it starts `torchrun --standalone --nproc_per_node=N` on this script's worker, which runs
smadlrp's own code on vgg_compact (all layers trained, 64 px): the training pass of `finetune`
(`Finetuner._train_pass`, DistributedDataParallel under torchrun) and the scoring of `evaluate` (`predict_dataset`,
shares gathered). Each worker times, alternating and taking medians:

- a training epoch as finetune runs it, and the same epoch inside DDP's `no_sync()` (no gradient all-reduce): the
  difference is the communication that backward could not hide, its share of the epoch the communication share;
- a bare all-reduce of a float32 tensor of the model's gradient size, for the bus bandwidth of this backend;
- a scoring pass of the validation split with its gather.

    .venv/bin/python benchmarks/bench_distributed.py [--processes 2] [--images 256] [--repeats 5]

The figures are images/s of the whole job (all ranks together); on a machine with fewer free cores than
processes they measure the contention, not the scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import write_tiny_dataset  # noqa: E402

from smadlrp.core import distributed  # noqa: E402
from smadlrp.detector.inference import predict_dataset  # noqa: E402
from smadlrp.detector.train import Callbacks, Finetuner, TrainConfig  # noqa: E402


def worker(data: Path, repeats: int, batch_size: int, result: Path) -> None:
    """One rank: time training (with and without gradient sync), a bare all-reduce, and scoring."""
    torch.set_num_threads(1)
    with distributed.session("cpu") as ranks:
        config = TrainConfig(arch="vgg_compact", epochs=1, batch_size=batch_size, weights="none", full=True)
        trainer = Finetuner(config, data, Path(tempfile.mkdtemp()), torch.device("cpu"))
        trainer._train_pass(Callbacks())  # warm-up: decodes and caches the images, builds DDP
        model = trainer.trained
        gradient = sum(p.numel() for p in trainer.params)
        buffer = torch.zeros(gradient, dtype=torch.float32)
        times: dict[str, list[float]] = {"train": [], "train_no_sync": [], "all_reduce": [], "evaluate": []}
        for _ in range(repeats):
            for name, quiet in (("train", False), ("train_no_sync", True)):
                ranks.barrier()
                start = time.perf_counter()
                with model.no_sync() if quiet and ranks.distributed else nullcontext():  # type: ignore[operator]
                    trainer._train_pass(Callbacks())
                times[name].append(time.perf_counter() - start)
            ranks.barrier()
            start = time.perf_counter()
            for _ in range(10):
                if ranks.distributed:
                    dist.all_reduce(buffer)
            times["all_reduce"].append((time.perf_counter() - start) / 10)
            ranks.barrier()
            start = time.perf_counter()
            predict_dataset(trainer.model, trainer.val_data, batch_size, trainer.device, trainer.attack_index)
            times["evaluate"].append(time.perf_counter() - start)
        medians = {name: statistics.median(values) for name, values in times.items()}
        slowest = ranks.gather(medians)  # the job takes as long as its slowest rank
        if ranks.is_main:
            summary = {name: max(m[name] for m in slowest) for name in medians}
            summary.update(train_images=trainer.shares[1], val_images=trainer.shares[3], gradient=gradient,
                           world_size=ranks.world_size, steps=len(trainer.train_loader))
            result.write_text(json.dumps(summary), encoding="utf-8")


def launch(processes: int, data: Path, repeats: int, batch_size: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={processes}", __file__, "--worker", str(data), str(repeats),
                        str(batch_size), str(result)], env=env, check=True, capture_output=True)
        return json.loads(result.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        data, repeats, batch, result = sys.argv[2:6]
        worker(Path(data), int(repeats), int(batch), Path(result))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--images", type=int, default=256, help="training images (the validation split as many)")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_tiny_dataset(Path(tmp), per_class=args.images // 2, size=64)
        runs = {n: launch(n, data, args.repeats, args.batch_size) for n in (1, args.processes)}
    one = runs[1]
    print(f"vgg_compact, all layers, 64 px, global batch {args.batch_size}, {one['train_images']} training and "
          f"{one['val_images']} validation images, gradient {one['gradient']:,} float32 values; one thread per "
          f"process; medians of {args.repeats}")
    print(f"{'processes':>9} {'finetune img/s':>15} {'evaluate img/s':>15} {'comm share':>11} {'all-reduce ms':>14} "
          f"{'bus GB/s':>9}")
    for n, r in runs.items():
        share = max(0.0, r["train"] - r["train_no_sync"]) / r["train"]
        bus = 2 * (n - 1) / n * r["gradient"] * 4 / r["all_reduce"] / 1e9 if n > 1 else float("nan")
        print(f"{n:>9} {r['train_images'] / r['train']:>15.1f} {r['val_images'] / r['evaluate']:>15.1f} "
              f"{share:>11.1%} {r['all_reduce'] * 1e3:>14.2f} {bus:>9.2f}")
        r["comm_share"], r["bus_gb_s"] = share, bus
    many = runs[args.processes]
    print(f"speed-up on {args.processes} processes: finetune {one['train'] / many['train']:.2f}x, evaluate "
          f"{one['evaluate'] / many['evaluate']:.2f}x")
    step_ms = many["train"] / many["steps"] * 1e3
    print(f"per step on {args.processes} processes: {step_ms:.1f} ms, of which "
          f"{(many['train'] - many['train_no_sync']) / many['steps'] * 1e3:.1f} ms waiting for the gradient")
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
