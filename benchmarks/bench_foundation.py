"""Foundation-model recipes on the CPU: the overhead of frozen-feature extraction, and a cost table for the docs.

Part 1, overhead (issue target: feature extraction runs at >= 0.9x bare inference throughput): images/s of
`smadlrp.detector.features.extract_features` (what `finetune --frozen` runs on a feature-cache miss) against a bare
`torch.inference_mode()` loop running the full forward of the same model (eval mode) over a DataLoader of the same
dataset and batch size, for each `--extract ARCH:SIZE`. The dataset keeps its decoded images in memory (filled
before timing), so both sides measure the network, not PNG decoding. Runs alternate (the order flipping each repeat)
and the medians give the ratio (bare time / extraction time, i.e. extraction throughput / bare throughput).

Part 2, costs: wall time of each recipe on this machine, printed as a Markdown table:
  (a) a MADation-style LoRA training step (`finetune --lora RANK`, q and v, AdamW, the library's own `Finetuner`
      set-up) on `clip_vit_b_16` at 224 px: median over `--lora-steps` steps (after one warm-up step) of
      `--lora-batch` images, per training image;
  (b) frozen feature extraction (`extract_features`, images decoded from PNG, not cached; after one warm-up
      pass; the median of `--frozen-repeats` passes) with `timm/vit_small_patch14_dinov2` at 224 px, per image;
      once per split, `features_for`'s cache key (the backbone's weights fingerprint), and a whole cache hit;
  (c) fitting each frozen head (`fit_head`: linear, logistic, svm, gmm, default options) on `--head-n` x
      `--head-dims` random features (two Gaussian classes `--head-separation` apart along one random direction,
      a quarter as many validation features), the median of `--head-repeats` fits;
  (d) explaining one image with LRP epsilon (`smadlrp.lrp.Explainer(model, "epsilon")`) on `clip_vit_b_16` at
      224 px: building the explainer and the first call (tracing, preparation) once, then the median of
      `--explain-repeats` further calls, per image.
All networks have random weights (`--weights none`); run times do not depend on the weights.

    .venv/bin/python benchmarks/bench_foundation.py [--images 128] [--batch 16] [--repeats 5]
        [--extract timm/vit_small_patch14_dinov2:112 resnet18:64] [--lora-batch 4] [--lora-steps 3] [--lora-rank 8]
        [--frozen-images 64] [--frozen-repeats 3] [--head-n 2000] [--head-dims 384] [--head-separation 2.0]
        [--head-repeats 3] [--explain-repeats 3] [--skip-overhead] [--skip-costs]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import write_tiny_dataset  # noqa: E402

from smadlrp.data.loading import ImageDataset, make_loader, scan_split  # noqa: E402
from smadlrp.detector.features import FeatureCache, extract_features, features_for, weights_fingerprint  # noqa: E402
from smadlrp.detector.frozen_heads import KINDS, fit_head  # noqa: E402
from smadlrp.detector.models import build_model, get_architecture  # noqa: E402
from smadlrp.detector.train import Finetuner, TrainConfig  # noqa: E402
from smadlrp.lrp import Explainer  # noqa: E402

CPU = torch.device("cpu")
CLIP = "clip_vit_b_16"
DINO = "timm/vit_small_patch14_dinov2"


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def bare_inference(model: nn.Module, loader: Any) -> None:
    """The full forward of every batch, nothing kept: the throughput extraction is measured against."""
    model.eval()
    with torch.inference_mode():
        for images, _, _ in loader:
            model(images)


def dataset_for(root: Path, arch_name: str, size: int, cache: bool) -> ImageDataset:
    """The training split of `root` as the network `arch_name` sees it at `size` px (its normalisation)."""
    arch = get_architecture(arch_name)
    return ImageDataset(scan_split(root, "train").samples, size, arch.mean, arch.std, cache=cache)


# ---- part 1: extraction against bare inference --------------------------------------------------------------


def extraction_overhead(root: Path, spec: str, batch: int, repeats: int) -> None:
    """Print images/s of `extract_features` and of a bare inference loop for `spec` ("ARCH:SIZE")."""
    name, _, side = spec.rpartition(":")
    size = int(side)
    torch.manual_seed(0)
    model, _ = build_model(name, 2, "none", image_size=size)
    model.eval()
    layer = get_architecture(name).head_layers[0]
    data = dataset_for(root, name, size, cache=True)
    loader = make_loader(data, batch)
    bare_inference(model, loader)  # warm-up; fills the decoded-image cache
    features, _ = extract_features(model, layer, data, batch, CPU)
    ours: list[float] = []
    bare: list[float] = []
    for repeat in range(repeats):
        for side_name in (("ours", "bare") if repeat % 2 == 0 else ("bare", "ours")):
            if side_name == "ours":
                ours.append(timed(extract_features, model, layer, data, batch, CPU)[0])
            else:
                bare.append(timed(bare_inference, model, loader)[0])
    n = len(data)
    print(f"{name} at {size} px, {n} images (decoded, in memory), batch {batch}, features {tuple(features.shape)} "
          f"from {layer!r}, {repeats} alternating runs")
    for label, pick in (("median", statistics.median), ("min", min)):
        t_ours, t_bare = pick(ours), pick(bare)
        print(f"  [{label}] extract_features {n / t_ours:7.1f} img/s vs bare inference_mode loop {n / t_bare:7.1f} "
              f"img/s: ratio {t_bare / t_ours:.3f} (target >= 0.9)")


# ---- part 2: costs ------------------------------------------------------------------------------------------


def lora_step_cost(root: Path, out: Path, args: argparse.Namespace) -> tuple[str, str, str]:
    """(a) Seconds per training image of a `finetune --lora` step on clip_vit_b_16 at 224 px."""
    config = TrainConfig(arch=CLIP, epochs=1, batch_size=args.lora_batch, image_size=224, weights="none",
                         optimizer="adamw", lr=1e-4, lora=args.lora_rank)
    build, tuner = timed(Finetuner, config, root, out / "lora", CPU)
    assert tuner.lora is not None
    batches = [(images, targets) for images, targets, _ in tuner.train_loader
               if len(targets) == args.lora_batch][:args.lora_steps + 1]
    if len(batches) < args.lora_steps + 1:
        raise SystemExit(f"need {args.lora_steps + 1} full batches of {args.lora_batch}: raise --frozen-images")
    tuner.model.train()
    tuner.lora.train()
    steps = []
    for images, targets in batches:
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(tuner.model(images), targets)
        tuner.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        tuner.optimizer.step()
        steps.append(time.perf_counter() - start)
    per_step = statistics.median(steps[1:])  # the first step is the warm-up
    trainable = sum(p.numel() for p in tuner.params)
    setting = (f"{CLIP}, 224 px, rank {args.lora_rank} on q,v + head ({trainable / 1e3:.0f} k trainable), AdamW, "
               f"batch {args.lora_batch}")
    return (setting, f"{per_step / args.lora_batch:.3f} s per training image ({per_step:.2f} s per step)",
            f"{build:.1f} s (build, split, attach LoRA)")


def frozen_extraction_cost(root: Path, out: Path, batch: int, repeats: int) -> tuple[str, str, str]:
    """(b) Seconds per image of extracting dinov2-small features at 224 px from PNG files (the median of `repeats`
    passes), and the once-per-split extra of `features_for`."""
    torch.manual_seed(0)
    model, _ = build_model(DINO, 2, "none", image_size=224)
    arch = get_architecture(DINO)
    layer = arch.head_layers[0]
    extract_features(model, layer, dataset_for(root, DINO, 224, cache=False), batch, CPU)  # warm-up
    passes = [timed(extract_features, model, layer, dataset_for(root, DINO, 224, cache=False), batch, CPU)
              for _ in range(repeats)]
    seconds = statistics.median(t for t, _ in passes)
    features, _ = passes[0][1]
    n = len(features)
    fingerprint, _ = timed(weights_fingerprint, model, arch.head_layers)
    kwargs: dict[str, Any] = {"input_size": 224, "mean": arch.mean, "std": arch.std, "batch_size": batch, "device": CPU,
              "cache": FeatureCache(out / "features")}
    features_for(model, arch.head_layers, dataset_for(root, DINO, 224, cache=False), **kwargs)  # a miss: writes
    hit, found = timed(features_for, model, arch.head_layers, dataset_for(root, DINO, 224, cache=False), **kwargs)
    assert found.cached
    setting = f"{DINO}, 224 px, batch {batch}, {n} PNG images (median of {repeats} passes), D = {features.shape[1]}"
    return (setting, f"{seconds / n:.3f} s per image ({n / seconds:.1f} img/s)",
            f"cache key (backbone fingerprint) {fingerprint:.2f} s per split; a cache hit (no image read) "
            f"{hit:.2f} s in all")


def head_costs(n: int, dims: int, separation: float, repeats: int) -> list[tuple[str, str, str, str]]:
    """(c) Seconds of `fit_head` for every kind on `n` x `dims` random features (and n / 4 validation ones), the
    median of `repeats` fits."""
    generator = torch.Generator().manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(dims, generator=generator), dim=0)

    def split(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(count) % 2
        features = torch.randn(count, dims, generator=generator) + separation * labels[:, None] * direction
        return features, labels

    train, val = split(n), split(max(n // 4, 2))
    rows = []
    for kind in KINDS:
        notes: list[str] = []
        seconds = statistics.median(timed(fit_head, kind, *train, *val, 1, 2, 0, notify=notes.append)[0]
                                    for _ in range(repeats))
        note = f" ({'; '.join(sorted(set(notes)))})" if notes else ""
        rows.append((f"(c) frozen head `{kind}`", f"{n} x {dims} features (+ {len(val[1])} validation){note}",
                     f"{seconds:.2f} s per fit (median of {repeats})", "-"))
    return rows


def explain_cost(repeats: int) -> tuple[str, str, str]:
    """(d) Seconds per image of LRP epsilon on clip_vit_b_16 at 224 px; the once-per-run set-up."""
    torch.manual_seed(0)
    model, _ = build_model(CLIP, 2, "none", image_size=224)
    model.eval()
    image = torch.randn(1, 3, 224, 224)
    build, explainer = timed(Explainer, model, "epsilon")
    first, _ = timed(explainer.explain, image)
    later = statistics.median(timed(explainer.explain, image)[0] for _ in range(repeats))
    return (f"{CLIP}, 224 px, rule epsilon, one image per call",
            f"{later:.2f} s per image (median of {repeats})",
            f"{build + first - later:.1f} s (explainer {build:.1f} s, first call {first:.1f} s)")


def costs(root: Path, out: Path, args: argparse.Namespace) -> None:
    """Print the Markdown cost table."""
    rows: list[tuple[str, str, str, str]] = []
    started = time.perf_counter()
    rows.append(("(a) LoRA fine-tuning step (MADation-style)", *lora_step_cost(root, out, args)))
    rows.append(("(b) frozen feature extraction", *frozen_extraction_cost(root, out, args.batch, args.frozen_repeats)))
    rows.extend(head_costs(args.head_n, args.head_dims, args.head_separation, args.head_repeats))
    rows.append(("(d) LRP explanation", *explain_cost(args.explain_repeats)))
    print(f"\nCosts on this CPU ({torch.get_num_threads()} threads, float32, random weights; "
          f"measured in {time.perf_counter() - started:.0f} s):\n")
    print("| Recipe | Setting | Wall time | Once per run |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--images", type=int, default=128, help="images of the overhead runs (training split)")
    parser.add_argument("--batch", type=int, default=16, help="batch size of extraction and bare inference")
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs of the overhead part")
    parser.add_argument("--extract", nargs="+", default=[f"{DINO}:112", "resnet18:64"], metavar="ARCH:SIZE")
    parser.add_argument("--lora-batch", type=int, default=4)
    parser.add_argument("--lora-steps", type=int, default=3, help="timed LoRA steps (after one warm-up step)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--frozen-images", type=int, default=64, help="224 px images of the cost part")
    parser.add_argument("--head-n", type=int, default=2000)
    parser.add_argument("--head-dims", type=int, default=384)
    parser.add_argument("--head-separation", type=float, default=2.0, help="distance of the class means")
    parser.add_argument("--frozen-repeats", type=int, default=3, help="timed extraction passes (after a warm-up)")
    parser.add_argument("--head-repeats", type=int, default=3)
    parser.add_argument("--explain-repeats", type=int, default=3)
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-costs", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_overhead:
            root = write_tiny_dataset(Path(tmp) / "small", per_class=(args.images + 1) // 2, size=128)
            for spec in args.extract:
                extraction_overhead(root, spec, args.batch, args.repeats)
        if not args.skip_costs:
            needed = max(args.frozen_images, args.lora_batch * (args.lora_steps + 1))
            root = write_tiny_dataset(Path(tmp) / "large", per_class=(needed + 1) // 2, size=224)
            costs(root, Path(tmp), args)


if __name__ == "__main__":
    main()
