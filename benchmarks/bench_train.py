"""Overhead of `evaluate` and of a `finetune` epoch against bare PyTorch loops over the same batches; and, with
`--lora`, the cost of a LoRA training step against a full fine-tuning step of the same network.

Default mode: prints images/s of smadlrp's scoring pass (`smadlrp.detector.inference.predict`, what `evaluate`
runs) against a bare `torch.no_grad()` loop over the same DataLoader and model, and the time of one `finetune`
training epoch (`Finetuner._train_pass`) against a bare training loop (forward, loss, zero_grad, backward, step)
over the same DataLoader. Runs alternate and the median of each is reported, so machine noise hits both sides alike.

`--lora` mode: two `Finetuner`s on the same image folder, one `finetune --full --optimizer adamw` and one
`finetune --lora RANK --optimizer adamw` (LoRA on q and v by default, the new head trainable, AdamW over the
trainable parameters only: the library's own `attach_lora` and parameter selection), same random initialisation.
Both run the same training step (forward, cross-entropy, zero_grad, backward, AdamW step) on the same in-memory
batches, alternating step by step (the order rotating each time); the median time per step of each phase
(forward + loss, backward, optimizer step) and the ratio LoRA / full (target <= 0.7) are printed. A third side,
`floor`, is the unchanged network with its backbone frozen (only the head trains) fed images that require
gradients: its backward pass computes every layer's input gradient and no weight gradient, which any adapter in
the first block must pay at least, without LoRA's own work (split q/k/v, adapter matmuls). For torchvision ViTs
this floor is too high: with a frozen packed `in_proj_weight` and a (non-contiguous) input that requires
gradients, `nn.MultiheadAttention`'s input projection goes through PyTorch's `matmul` as a `bmm` over the expanded
weight instead of one `mm`, about 1.7x slower; the split projections of LoRA avoid it. Memory, measured
exactly rather than as process RSS: the bytes the autograd graph saves for the backward pass (activations, through
`torch.autograd.graph.saved_tensors_hooks`, parameters, buffers and images left out) and the bytes of gradients + AdamW
state (3 float32 per trainable parameter). Default network: timm's `vit_small_patch14_dinov2` at 112 px (22 M
parameters, 12 blocks of width 384, 65 tokens), a ViT small enough for a CPU step to take well under a second and
with a realistic balance of attention and projection work. torchvision's `vit_b_16` at 64 or 96 px (86 M
parameters, 17 or 37 tokens) spends 12-21 % of a full step in the AdamW step over 86 M parameters, which flatters
LoRA: `--lora-arch vit_b_16 --lora-size 96`.

    .venv/bin/python benchmarks/bench_train.py [--images 512] [--size 64] [--repeats 5]
    .venv/bin/python benchmarks/bench_train.py --lora [--lora-arch timm/vit_small_patch14_dinov2] [--lora-size 112]
        [--lora-batch 16] [--lora-batches 3] [--lora-rank 8] [--lora-targets q,v] [--repeats 5] [--foreach]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import write_tiny_dataset  # noqa: E402

from smadlrp.detector.inference import predict  # noqa: E402
from smadlrp.detector.models import get_architecture  # noqa: E402
from smadlrp.detector.train import Callbacks, Finetuner, TrainConfig  # noqa: E402

Batch = tuple[torch.Tensor, torch.Tensor]
PHASES = ("forward+loss", "backward", "optimizer")


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


def overhead(args: argparse.Namespace) -> None:
    """The default mode: `evaluate` scoring and a `finetune` epoch against bare loops (vgg_compact)."""
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


# ---- --lora ------------------------------------------------------------------------------------------------


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: Batch,
               input_grad: bool = False) -> tuple[float, float, float]:
    """One training step; seconds of (forward + loss, zero_grad + backward, optimizer step). `input_grad`: the
    images require gradients (the backward pass then runs through every layer, frozen or not)."""
    images, targets = batch
    if input_grad:
        images = images.detach().requires_grad_(True)
    start = time.perf_counter()
    loss = nn.functional.cross_entropy(model(images), targets)
    forward = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    backward = time.perf_counter()
    opt.step()
    return forward - start, backward - forward, time.perf_counter() - backward


def saved_activation_bytes(model: nn.Module, batch: Batch, input_grad: bool = False) -> int:
    """Bytes of the distinct tensor storages the autograd graph of one forward + loss saves for the backward pass,
    parameters, buffers and the images left out (they exist anyway); `input_grad` as for `train_step`."""
    images, targets = batch
    kept = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), images)}
    if input_grad:
        images = images.detach().requires_grad_(True)
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in kept:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = nn.functional.cross_entropy(model(images), targets)
    del loss
    return sum(saved.values())


def lora_tuners(args: argparse.Namespace, root: Path, out: Path) -> tuple[Finetuner, Finetuner]:
    """`finetune --full` and `finetune --lora RANK` runs (AdamW) on `root`, with the same initial weights."""
    common = {"arch": args.lora_arch, "epochs": 1, "batch_size": args.lora_batch, "image_size": args.lora_size,
              "weights": "none", "optimizer": "adamw", "lr": 1e-4}
    full = Finetuner(TrainConfig(full=True, **common), root, out / "full", torch.device("cpu"))
    lora = Finetuner(TrainConfig(lora=args.lora_rank, lora_targets=args.lora_targets, **common), root, out / "lora",
                     torch.device("cpu"))
    if args.foreach:  # the same optimizer with its multi-tensor (foreach) implementation, on both sides
        for tuner in (full, lora):
            tuner.optimizer = torch.optim.AdamW(tuner.params, lr=1e-4, foreach=True)
    return full, lora


def lora_cost(args: argparse.Namespace) -> None:
    """The `--lora` mode: a LoRA step against a full fine-tuning step of the same network."""
    with tempfile.TemporaryDirectory() as tmp:
        per_class = (args.lora_batch * args.lora_batches + 1) // 2
        root = write_tiny_dataset(Path(tmp) / "data", per_class=per_class, size=args.lora_size)
        full, lora = lora_tuners(args, root, Path(tmp))
        assert lora.lora is not None
        torch.manual_seed(0)  # the batches: the first `--lora-batches` of the (shuffled) training loader, in memory
        batches: list[Batch] = []
        for images, targets, _ in full.train_loader:
            if len(targets) == args.lora_batch and len(batches) < args.lora_batches:
                batches.append((images, targets))
        full.model.train()
        lora.model.train()
        lora.lora.train()
        # the floor (see the module docstring): frozen backbone, images that require gradients
        floor = copy.deepcopy(full.model)
        head = get_architecture(args.lora_arch).head
        for name, param in floor.named_parameters():
            param.requires_grad_(name.startswith(head))
        floor_params = [param for param in floor.parameters() if param.requires_grad]
        floor_opt = torch.optim.AdamW(floor_params, lr=1e-4, foreach=True if args.foreach else None)
        sides: dict[str, tuple[nn.Module, torch.optim.Optimizer, bool]] = {
            "full": (full.model, full.optimizer, False), "lora": (lora.model, lora.optimizer, False),
            "floor": (floor, floor_opt, True)}
        activations = {name: saved_activation_bytes(side[0], batches[0], side[2]) for name, side in sides.items()}
        trainable = {"full": sum(p.numel() for p in full.params), "lora": sum(p.numel() for p in lora.params),
                     "floor": sum(p.numel() for p in floor_params)}
        for side in sides.values():  # warm-up: allocator, kernels, optimizer state
            for batch in batches:
                train_step(side[0], side[1], batch, side[2])
        times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in sides}
        for repeat in range(args.repeats):
            for i, batch in enumerate(batches):
                order = list(sides)[(repeat + i) % 3:] + list(sides)[:(repeat + i) % 3]  # rotate the order
                for name in order:
                    model, opt, input_grad = sides[name]
                    times[name].append(train_step(model, opt, batch, input_grad))
        total = sum(p.numel() for p in full.model.parameters())
        print(f"{args.lora_arch} at {args.lora_size} px, batch {args.lora_batch}, {total / 1e6:.1f} M parameters; "
              f"LoRA rank {args.lora_rank} on {args.lora_targets} + head; AdamW"
              f"{' (foreach)' if args.foreach else ''}; 2 threads; {args.repeats} x {len(batches)} alternating steps")
        for name in sides:
            print(f"  {name:5s}: trainable {trainable[name]:>10,d} parameters; saved activations "
                  f"{activations[name] / 2**20:7.1f} MiB; gradients + AdamW state "
                  f"{trainable[name] * 12 / 2**20:7.1f} MiB")
        pick: Callable[[list[float]], float]
        for label, pick in (("median", statistics.median), ("min", min)):
            print(f"[{label}] per step, s:   " + "  ".join(f"{phase:>12s}" for phase in PHASES) + "         total")
            steps = {}
            for name in sides:
                phases = [pick([t[k] for t in times[name]]) for k in range(3)]
                steps[name] = pick([sum(t) for t in times[name]])
                print(f"[{label}]   {name:5s}          " + "  ".join(f"{p:12.4f}" for p in phases)
                      + f"  {steps[name]:12.4f}")
            for name, note in (("lora", "(target <= 0.7)"), ("floor", "(no weight gradients, no LoRA work)")):
                ratios = [pick([t[k] for t in times[name]]) / pick([t[k] for t in times["full"]]) for k in range(3)]
                print(f"[{label}]   {name + ' / full':16s} " + "  ".join(f"{r:12.3f}" for r in ratios)
                      + f"  {steps[name] / steps['full']:12.3f}  {note}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=512, help="images per split and class pair (train split)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs (--lora: passes over the batches)")
    parser.add_argument("--lora", action="store_true", help="measure a LoRA step against a full fine-tuning step")
    parser.add_argument("--lora-arch", default="timm/vit_small_patch14_dinov2")
    parser.add_argument("--lora-size", type=int, default=112, help="input side, px")
    parser.add_argument("--lora-batch", type=int, default=16)
    parser.add_argument("--lora-batches", type=int, default=3, help="distinct batches per pass")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-targets", default="q,v")
    parser.add_argument("--foreach", action="store_true", help="AdamW(foreach=True) on both sides")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.lora:
        lora_cost(args)
    else:
        overhead(args)


if __name__ == "__main__":
    main()
