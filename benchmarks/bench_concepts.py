"""Time of conditional relevance (CRP) of many concepts against one ordinary relevance pass and against zennit-crp,
on torchvision VGG16 (random weights, 224 x 224, one image), concepts = channels of its last convolution.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_concepts.py [--concepts 32] [--runs 3] [--threads 2]

smadlrp computes k concepts with one forward pass of the image, the relevance above the layer once, and one batched
relevance pass below it, the k masked copies of the layer's relevance as a batch of gradients (`lrp.conditional`).
The script shows:

- what runs where: forward hooks count the rows that the forward pass computes at the layer (`features.28`) and at
  the classifier in one call for k concepts (1 each: the image once; only the backward pass below the layer has k
  rows, a batch of gradients);
- the cost: `explain` (one ordinary relevance pass of the image), `above` (the forward pass and the relevance above
  the layer: what every call needs once), `crp-1` and `crp-k` (1 and k concepts), and the marginal cost of a further
  concept, (crp-k - crp-1) / (k - 1), against one ordinary relevance pass (`explain`), which bounds the relevance
  pass below the layer;
- zennit-crp 0.6 (`CondAttribution` with zennit's `EpsilonPlusFlat`, the rules of smadlrp's `epsilon-plus-flat` with
  zennit's epsilon, 1e-6, on the dense layers)
  on the same k concepts in one call (its default: the image repeated k times, one forward and one backward pass of
  batch k), the ratio crp-k / zennit-crp (target: at most 0.3), and how closely the two methods' heatmaps agree
  (Pearson r per concept). Without zennit-crp installed (`.venv/bin/pip install zennit-crp==0.6.*`; a benchmark-only
  dependency) that comparison is skipped with a message.

Time: one warm-up call per method, then `--runs` rounds; every round runs each method once, in turn, so that a load
change on the machine hits all of them alike. Medians of wall time and of CPU time (user + system of the process,
all threads); on a shared machine the CPU-time ratio is the steadier figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import Tensor, nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smadlrp.lrp import Explainer  # noqa: E402
from smadlrp.lrp.conditional import ConceptExplainer  # noqa: E402

LAYER = "features.28"  # VGG16's last convolution
RULE = "epsilon-plus-flat"  # zennit's EpsilonPlusFlat: flat first layer, z+ convolutions, epsilon dense layers
PARAMS = {"dense_epsilon": 1e-6}  # zennit's Epsilon default
TARGET = 1


def _zennit_crp(model: nn.Module, x: Tensor, channels: list[int]) -> Callable[[], Tensor] | None:
    """zennit-crp's conditional heatmaps of `channels` for `x` in one call, or None when it is not installed."""
    if importlib.util.find_spec("crp") is None or importlib.util.find_spec("zennit") is None:
        return None
    from crp.attribution import CondAttribution
    from zennit.composites import EpsilonPlusFlat

    attribution, composite = CondAttribution(model, no_param_grad=True), EpsilonPlusFlat()
    conditions = [{LAYER: [c], "y": [TARGET]} for c in channels]

    def run() -> Tensor:
        leaf = x.detach().clone().requires_grad_(True)
        return attribution(leaf, conditions, composite, record_layer=[]).heatmap.detach()

    return run


def _rows_seen(concepts: ConceptExplainer, x: Tensor, channels: list[int]) -> dict[str, list[int]]:
    """The rows the forward pass computes at the layer and at the classifier's first layer in one conditional
    call."""
    seen: dict[str, list[int]] = {LAYER: [], "classifier.0": []}
    handles = [concepts.lrp.module.get_submodule(name).register_forward_hook(
        lambda module, args, out, name=name: seen[name].append(int(out.shape[0]))) for name in seen]
    concepts.conditional(x, [0] * len(channels), channels, TARGET)
    for handle in handles:
        handle.remove()
    return seen


def _time(methods: dict[str, Callable[[], object]], runs: int) -> dict[str, tuple[float, float]]:
    """Median wall and CPU seconds of each method over `runs` alternating rounds (after one warm-up each)."""
    for run in methods.values():
        run()
    wall: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(runs):
        for name, run in methods.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in methods}


def _agreement(ours: Tensor, theirs: Tensor) -> tuple[float, float, int]:
    """Median and minimum Pearson r between the (k, H, W) channel-summed heatmaps of the two methods, over the
    concepts whose maps are not all zero in both; and how many concepts have an all-zero map in both."""
    a, b = ours.flatten(1).double(), theirs.flatten(1).double()
    both_zero = (a.abs().amax(1) == 0) & (b.abs().amax(1) == 0)
    a, b = a[~both_zero], b[~both_zero]
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    r = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    return float(r.median()), float(r.min()), int(both_zero.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.vgg16(num_classes=2).eval()
    x = torch.randn(1, 3, 224, 224)
    explainer = Explainer(model, RULE, **PARAMS)
    concepts = ConceptExplainer(explainer, x, LAYER)
    k = args.concepts
    channels = list(range(k))
    seen = _rows_seen(concepts, x, channels)
    print(f"VGG16, 224 px, one image, {k} concepts of {LAYER}, {RULE}, {args.threads} threads, {args.runs} rounds")
    print(f"one call for {k} concepts ({'batched' if concepts.batched is True else concepts.batched}): the forward "
          f"pass computes {seen[LAYER]} row(s) at {LAYER} and {seen['classifier.0']} at classifier.0 (each image "
          f"once); the backward pass below the layer carries {k} rows, above it 1")
    methods: dict[str, Callable[[], object]] = {
        "explain": lambda: explainer.explain(x, TARGET),
        "above": lambda: concepts.layer_relevance(x, TARGET),
        "crp-1": lambda: concepts.conditional(x, [0], [0], TARGET),
        f"crp-{k}": lambda: concepts.conditional(x, [0] * k, channels, TARGET),
    }
    zennit = _zennit_crp(model, x, channels)
    if zennit is None:
        print("zennit-crp is not installed: the comparison is skipped (`.venv/bin/pip install zennit-crp==0.6.*`)")
    else:
        methods[f"zennit-crp-{k}"] = zennit
    times = _time(methods, args.runs)
    reference = times["explain"]
    print(f"{'method':>16} {'wall s':>8} {'cpu s':>8} {'wall / explain':>15} {'cpu / explain':>14}")
    for name, (wall, cpu) in times.items():
        print(f"{name:>16} {wall:8.3f} {cpu:8.3f} {wall / reference[0]:15.2f} {cpu / reference[1]:14.2f}")
    marginal = [(times[f"crp-{k}"][i] - times["crp-1"][i]) / (k - 1) for i in (0, 1)]
    print(f"a further concept: {marginal[0]:.3f} s wall, {marginal[1]:.3f} s CPU = {marginal[0] / reference[0]:.2f} "
          f"(wall) / {marginal[1] / reference[1]:.2f} (CPU) of one ordinary relevance pass")
    if zennit is not None:
        ours = concepts.conditional(x, [0] * k, channels, TARGET).relevance.sum(1)
        median, low, zero = _agreement(ours, zennit())
        wall, cpu = (times[f"crp-{k}"][i] / times[f"zennit-crp-{k}"][i] for i in (0, 1))
        print(f"crp-{k} / zennit-crp-{k}: {wall:.2f} (wall), {cpu:.2f} (CPU); target <= 0.3")
        print(f"heatmap agreement with zennit-crp: Pearson r median {median:.4f}, minimum {low:.4f} over {k - zero} "
              f"concepts ({zero} with an all-zero map in both)")


if __name__ == "__main__":
    main()
