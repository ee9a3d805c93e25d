"""Time and memory of smadlrp's LRP rules against a plain input gradient, on torchvision VGG16, ResNet-50,
EfficientNet-B0, ViT-B/16, Swin-T or ConvNeXt-T.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_lrp.py [--arch vgg16|resnet50|efficientnet_b0|vit_b_16|...]
        [--batch 8 1] [--runs 5] [--threads 2] [--device cpu|cuda]

The model has random weights (BatchNorm with its default statistics; ViT's zero-initialised head drawn at random so
that its logits are not 0); inputs are 224 x 224. The transformers are explained with `epsilon` under CP-LRP
attention (`epsilon-cp`) and AttnLRP's rules (`epsilon-attnlrp`), and with the `gamma-transformer` composite.
Reference: forward, then the backward pass of the predicted logit w.r.t. the input (parameters frozen). Each method
is an `Explainer` built once. Time: after one warm-up call per method, `--runs` rounds in one process; every round
runs the reference and each method once, in turn, so a load change on the machine hits all of them alike. The table
gives the median wall time, its ratio to the reference's median, the median of the per-round wall ratios, and the
ratio of median CPU times (user + system of the process, all threads). On a shared machine the CPU-time ratio is
the steadier figure: time spent waiting for a core does not count. The timing process sets glibc's heap
thresholds as the CLI does (`smadlrp.core.memory.reuse_freed_memory`: freed tensors are reused, not faulted in
afresh); `--glibc-defaults` times with glibc's defaults instead. OpenMP threads sleep instead of spinning while
they wait (OMP_WAIT_POLICY=PASSIVE, unless set otherwise), so that waiting does not count as CPU time either.

Memory: one fresh subprocess per method and batch size builds the model (and explainer), makes one warm-up
call, then resets the kernel's peak-RSS mark (/proc/self/clear_refs) and makes one more call. "call peak" is
that call's peak RSS above the RSS just before it (what one explanation costs on top of the loaded model);
"process peak" is the subprocess's highest RSS overall: model, the explainer's cached modified weights and
the calls. Ratios are to the reference's figures. The subprocesses run with a fixed glibc mmap threshold
(MALLOC_MMAP_THRESHOLD_=65536), so every large tensor is unmapped when freed and RSS follows live memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import Tensor, nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smadlrp.core.memory import reuse_freed_memory  # noqa: E402
from smadlrp.lrp import Explainer  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
REFERENCE = "gradient"
# method name -> (rule or composite, its parameters)
CNN_METHODS: dict[str, tuple[str, dict[str, object]]] = {
    "epsilon": ("epsilon", {}),
    "gamma": ("gamma", {}),
    "alpha1beta0": ("alpha1beta0", {}),
    "alpha2beta1": ("alpha2beta1", {}),
    "epsilon-plus": ("epsilon-plus", {}),
    "epsilon-gamma-box": ("epsilon-gamma-box", {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}),
}
TRANSFORMER_METHODS: dict[str, tuple[str, dict[str, object]]] = {
    "epsilon-cp": ("epsilon", {"attention": "cp"}),
    "epsilon-attnlrp": ("epsilon", {"attention": "attnlrp"}),
    "gamma-transformer": ("gamma-transformer", {}),  # with AttnLRP, the default
}
ARCHS = ("vgg16", "resnet50", "efficientnet_b0", "vit_b_16", "swin_t", "convnext_tiny")
TRANSFORMER_TARGETS = {"epsilon-cp": 1.2, "epsilon-attnlrp": 1.2, "gamma-transformer": 1.7}
TIME_TARGETS = {
    "vgg16": {"epsilon": 1.2, "gamma": 1.6, "alpha1beta0": 2.2, "alpha2beta1": 2.2, "epsilon-gamma-box": 1.7},
    "resnet50": {"epsilon": 1.2, "epsilon-plus": 1.6, "epsilon-gamma-box": 1.7},
    "efficientnet_b0": {},
    **{arch: TRANSFORMER_TARGETS for arch in ("vit_b_16", "swin_t", "convnext_tiny")},
}


def methods(arch: str) -> dict[str, tuple[str, dict[str, object]]]:
    """The methods measured on `arch`."""
    return TRANSFORMER_METHODS if arch in ("vit_b_16", "swin_t", "convnext_tiny") else CNN_METHODS


def build_model(arch: str, device: str = "cpu", seed: int = 0) -> nn.Module:
    """torchvision `arch`, random weights, eval mode, parameters frozen, on `device`."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, weights=None).eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    if isinstance(model, torchvision.models.VisionTransformer):
        nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def gradient(model: nn.Module, x: Tensor) -> Tensor:
    """The reference: d(predicted logit)/dx."""
    leaf = x.clone().requires_grad_(True)
    logits = model(leaf)
    picked = logits[torch.arange(len(x)), logits.argmax(1)].sum()
    (grad,) = torch.autograd.grad(picked, leaf)
    return grad


def runner(arch: str, name: str, model: nn.Module, x: Tensor) -> Callable[[], Tensor]:
    """A zero-argument call computing `name` (the reference or an LRP method of `arch`) for the batch `x`."""
    if name == REFERENCE:
        return lambda: gradient(model, x)
    rule, params = methods(arch)[name]
    explainer = Explainer(model, rule, **params)  # type: ignore[arg-type]
    return lambda: explainer.explain(x).relevance


def time_methods(arch: str, model: nn.Module, x: Tensor, runs: int) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) seconds per round for the reference and every method, interleaved round by round."""
    calls = {name: runner(arch, name, model, x) for name in (REFERENCE, *methods(arch))}
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for call in calls.values():
        call()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            call()
            sync()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(arch: str, name: str, batch: int, size: int, threads: int) -> None:
    """Subprocess body: print {"call_peak_mib", "process_peak_mib"} for one method as JSON."""
    torch.set_num_threads(threads)
    model = build_model(arch)
    x = torch.randn(batch, 3, size, size)
    call = runner(arch, name, model, x)
    call()
    gc.collect()
    before = _status_kib("VmRSS")
    process_peak = _status_kib("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (Linux >= 4.0)
    call()
    call_peak = _status_kib("VmHWM")
    result = {"call_peak_mib": (call_peak - before) / 1024, "process_peak_mib": max(process_peak, call_peak) / 1024}
    print(json.dumps(result))


def measure_memory(arch: str, name: str, batch: int, size: int, threads: int) -> dict[str, float]:
    """Run `memory_child` for `name` in a fresh interpreter."""
    cmd = [sys.executable, __file__, "--arch", arch, "--memory-child", name, "--batch", str(batch),
           "--size", str(size), "--threads", str(threads)]  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def report(
    arch: str, batch: int, times: dict[str, list[tuple[float, float]]], memory: dict[str, dict[str, float]] | None,
    device: str,
) -> None:
    """Print one table: times, time ratios (target), memory ratios."""
    ref_wall = statistics.median(w for w, _ in times[REFERENCE])
    ref_cpu = statistics.median(c for _, c in times[REFERENCE])
    header = f"{'method':<18} {'wall s':>7} {'ratio':>6} {'round ratio':>11} {'CPU s':>7} {'ratio':>6} {'target':>6}"
    if memory:
        header += f" {'call peak MiB':>13} {'ratio':>6} {'process peak MiB':>16} {'ratio':>6}"
    where = f"{torch.get_num_threads()} threads" if device == "cpu" else device
    print(f"\n{arch}, batch {batch}, {where}, {len(times[REFERENCE])} runs")
    print(header)
    for name, values in times.items():
        wall = statistics.median(w for w, _ in values)
        cpu = statistics.median(c for _, c in values)
        per_round = statistics.median(v[0] / r[0] for v, r in zip(values, times[REFERENCE], strict=True))
        target = f"{TIME_TARGETS[arch][name]:.1f}x" if name in TIME_TARGETS[arch] else ""
        line = f"{name:<18} {wall:7.3f} {wall / ref_wall:6.2f} {per_round:11.2f} {cpu:7.3f} {cpu / ref_cpu:6.2f} "
        line += f"{target:>6}"
        if memory:
            m, r = memory[name], memory[REFERENCE]
            line += f" {m['call_peak_mib']:13.0f} {m['call_peak_mib'] / r['call_peak_mib']:6.2f}"
            line += f" {m['process_peak_mib']:16.0f} {m['process_peak_mib'] / r['process_peak_mib']:6.2f}"
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=ARCHS, default="vgg16")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on cuda: time only, no RSS memory)")
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 1])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--glibc-defaults", action="store_true",
                        help="time with glibc's default heap thresholds instead of the CLI's (reuse_freed_memory)")
    parser.add_argument("--memory-child", metavar="METHOD", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.arch, args.memory_child, args.batch[0], args.size, args.threads)
        return
    torch.set_num_threads(args.threads)
    if not args.glibc_defaults:
        reuse_freed_memory()  # as the CLI runs
    model = build_model(args.arch, args.device)
    for batch in args.batch:
        x = torch.randn(batch, 3, args.size, args.size, device=args.device)
        times = time_methods(args.arch, model, x, args.runs)
        memory = None
        if not args.no_memory and args.device == "cpu":
            memory = {name: measure_memory(args.arch, name, batch, args.size, args.threads)
                      for name in (REFERENCE, *methods(args.arch))}  # fmt: skip
        report(args.arch, batch, times, memory, args.device)


if __name__ == "__main__":
    main()
