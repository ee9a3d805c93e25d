"""PatternNet / PatternAttribution: the streaming pattern statistics over a data set that fit the patterns.

For every Conv2d and Linear layer and every output unit j, with x the layer input (for a convolution: each
input patch at each output position is one sample) and y_j = w_j^T x (bias excluded), two estimators:

- "all":      a_j  = cov(x, y_j) / (w_j^T cov(x, y_j)),           cov over every sample
- "positive": a+_j = cov+(x, y_j) / (w_j^T cov+(x, y_j)),         cov+ over the samples with y_j + b_j > 0,
              cov+(x, y_j) = E+[x y_j] - E+[x] E+[y_j]  (every mean conditional on the unit being active)

A fit makes two passes over the data. The first takes each unit's sample count and mean output; the second
accumulates the centred sums sum x (y_j - E[y_j]), which equal n cov(x, y_j) exactly, so no per-unit sum of x
is needed. The sums are float64 buffers of weight size, so memory does not depend on the number of images;
convolution sums are weight-gradient shaped and computed with `torch.nn.grad.conv2d_weight`: no patch matrix is
ever built. The pattern sets and their files are `fitted_patterns`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_weight
from torchvision.models.swin_transformer import ShiftedWindowAttention

from smadlrp.core.distributed import Ranks, current
from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.core.memory import release_free_memory
from smadlrp.lrp.fitted_patterns import (
    DEGENERATE_RTOL,
    ESTIMATORS,
    FALLBACK,
    FINGERPRINT_KEY,
    KINDS,
    SCHEMA,
    LayerFitStats,
    PatternSet,
    check_fingerprint,
    load_patterns,
    save_patterns,
    weights_fingerprint,
)
from smadlrp.lrp.norms import NORM_MODULES
from smadlrp.lrp.op_kinds import NON_SIGNAL_KINDS, OP_KINDS

__all__ = [
    "DEGENERATE_RTOL",
    "ESTIMATORS",
    "FALLBACK",
    "FINGERPRINT_KEY",
    "KINDS",
    "SCHEMA",
    "LayerFitStats",
    "PatternSet",
    "check_fingerprint",
    "fit_patterns",
    "load_patterns",
    "save_patterns",
    "weights_fingerprint",
]

_BLOCK = 1 << 22  # float64 elements per block of whole units in the centred sums (32 MiB)


class _UnitBlocks:
    """A float64 accumulator of weight shape (units, *k), held as blocks of whole units of at most `_BLOCK`
    elements, so that the patterns can replace it block by block without a second buffer of its size."""

    def __init__(self, shape: torch.Size, device: torch.device) -> None:
        rows = max(1, _BLOCK // max(1, shape[1:].numel()))
        self.rows = [slice(start, min(shape[0], start + rows)) for start in range(0, shape[0], rows)]
        self.blocks = [torch.zeros((r.stop - r.start, *shape[1:]), dtype=torch.float64, device=device)
                       for r in self.rows]

    def add(self, value: torch.Tensor) -> None:
        """Add a (units, *k) tensor of any float dtype."""
        for r, block in zip(self.rows, self.blocks, strict=True):
            block += value[r]

    def add_products(self, g: torch.Tensor, x: torch.Tensor) -> None:
        """Add g^T x for float64 `g` (N, units) and `x` (N, k), k the flattened unit size."""
        for r, block in zip(self.rows, self.blocks, strict=True):
            block.view(r.stop - r.start, -1).addmm_(g[:, r].t(), x)

    def pop(self) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield (units, block) in order, dropping each block once the caller is done with it."""
        while self.blocks:
            yield self.rows.pop(0), self.blocks.pop(0)


class _LayerFit:
    """Statistics of one Conv2d or Linear layer for every kind, fed by a forward hook over two passes.

    Pass 1 (`means`): per unit and kind, the float64 sample count and sum of the output (bias included).
    Pass 2 (`centred`): per kind, the float64 weight-shaped sum over samples of x * (out_j - mean_j), masked to
    the active samples for "positive"; it is n cov(x, y_j), because the bias cancels in out_j - mean_j.
    """

    def __init__(self, name: str, layer: nn.Conv2d | nn.Linear, kinds: Sequence[str], device: torch.device) -> None:
        self.name = name
        self.layer = layer
        self.kinds = tuple(kinds)
        units = layer.weight.shape[0]
        self.count = {kind: torch.zeros(units, dtype=torch.float64, device=device) for kind in kinds}
        self.sum_out = {kind: torch.zeros(units, dtype=torch.float64, device=device) for kind in kinds}
        self.mean_out: dict[str, torch.Tensor] = {}
        self.sum_xy: dict[str, _UnitBlocks] = {}
        self.samples = 0

    def first_pass_sums(self) -> list[torch.Tensor]:
        """The float64 sums of pass 1 (added across ranks before the means are taken)."""
        return [t for kind in self.kinds for t in (self.count[kind], self.sum_out[kind])]

    def second_pass_sums(self) -> list[torch.Tensor]:
        """The float64 centred sums of pass 2, block by block."""
        return [block for kind in self.kinds for block in self.sum_xy[kind].blocks]

    def start_second_pass(self) -> None:
        """Turn the output sums into means and allocate the centred sums."""
        for kind in self.kinds:
            self.mean_out[kind] = self.sum_out[kind] / self.count[kind].clamp_min(1.0)
            self.sum_xy[kind] = _UnitBlocks(self.layer.weight.shape, self.mean_out[kind].device)

    def hook(self, _module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        """Forward hook: statistics are taken at once, before any in-place op can change `out`. A convolution's
        statistics are taken image by image: each float32 weight-gradient sum then spans one image's positions
        and images are added in float64, so the result does not depend on how images are batched, and the
        temporaries (masks, centred output) stay the size of one image's output."""
        x = args[0]
        step = 1 if isinstance(self.layer, nn.Conv2d) else out.shape[0]
        for start in range(0, out.shape[0], step):
            if self.sum_xy:
                self.centred(x[start : start + step], out[start : start + step])
            else:
                self.means(out[start : start + step])

    def means(self, out: torch.Tensor) -> None:
        """Pass 1: add one batch's output `out` (N, out) or (B, out, H', W') to the per-unit counts and sums."""
        if isinstance(self.layer, nn.Linear):
            out = out.reshape(-1, out.shape[-1])
        samples = out.numel() // out.shape[1]
        self.samples += samples
        for kind in self.kinds:
            if kind == "all":
                self.count[kind] += samples
                self.sum_out[kind] += _unit_sum(out)
            else:
                self.count[kind] += _unit_sum(out > 0)
                self.sum_out[kind] += _unit_sum(out.clamp_min(0.0))  # sum of out over the active samples

    def centred(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Pass 2: add sum x * (out_j - mean_j) over one batch's samples; `x` the layer input, `out` its output."""
        if isinstance(self.layer, nn.Linear):
            x = x.reshape(-1, x.shape[-1])
            out = out.reshape(-1, out.shape[-1])
        else:
            x = self._padded(x)
        unit_shape = (1, -1) + (1,) * (out.dim() - 2)
        for kind in self.kinds:
            g = out - self.mean_out[kind].to(out.dtype).view(unit_shape)
            if kind == "positive":
                g.masked_fill_(out <= 0, 0.0)
            self._add_xg(self.sum_xy[kind], x, g)
            del g

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """Conv input with the layer's padding applied explicitly, unless it is plain numeric zero padding."""
        layer = self.layer
        assert isinstance(layer, nn.Conv2d)
        if layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
            return x
        pads = _explicit_padding(layer)
        if not any(pads):
            return x
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        return F.pad(x, pads, mode=mode)

    def _add_xg(self, acc: _UnitBlocks, x: torch.Tensor, g: torch.Tensor) -> None:
        """acc[j] += sum over samples of x * g_j (weight shape); `g` has the output's shape."""
        layer = self.layer
        if isinstance(layer, nn.Linear):
            acc.add_products(g.to(torch.float64), x.to(torch.float64))
            return
        explicit = isinstance(layer.padding, str) or layer.padding_mode != "zeros"  # then `_padded` did it
        padding = (0, 0) if explicit else tuple(layer.padding)
        acc.add(conv2d_weight(x, layer.weight.shape, g, layer.stride, padding, layer.dilation, layer.groups))

    def finish(self, kind: str) -> tuple[torch.Tensor, LayerFitStats]:
        """The fitted pattern (weight shape and dtype, on CPU) and this layer's stats for `kind`. The centred
        sums are turned into patterns block by block, each block released as soon as it is copied out."""
        weight = self.layer.weight.detach()
        units = weight.shape[0]
        bias = 0.0 if self.layer.bias is None else self.layer.bias.detach().to(torch.float64)
        mean_y = self.mean_out[kind] - bias  # E[w^T x] over the unit's samples
        count = self.count[kind]
        pattern = torch.empty(weight.shape, dtype=weight.dtype)
        degenerate = 0
        for rows, block in self.sum_xy.pop(kind).pop():
            w = weight[rows].flatten(1).to(torch.float64)
            ok = _patterns_from_centred(w, count[rows], block.view_as(w), mean_y[rows])
            degenerate += int((~ok).sum())
            pattern[rows] = block
            del block, w
        active = None
        if kind == "positive":
            active = float(count.sum()) / (self.samples * units) if self.samples else 0.0
        return pattern, LayerFitStats(self.name, self.samples, active, degenerate, units)


def _unit_sum(t: torch.Tensor) -> torch.Tensor:
    """Per-unit sum of (N, out) or (B, out, H', W'): positions in t's dtype (int64 for bool), the batch in
    float64; (out,)."""
    if t.dim() == 4:
        t = t.sum(dim=(2, 3))
    return t.sum(dim=0, dtype=torch.float64)


def _patterns_from_centred(
    w: torch.Tensor, count: torch.Tensor, centred: torch.Tensor, mean_y: torch.Tensor
) -> torch.Tensor:
    """Overwrite `centred` (float64 sums n cov(x, y_j) of a block of units) with their patterns; return the
    ok-unit mask.

    w, centred: (units, K); count, mean_y: (units,). The pattern n cov / (w^T n cov) needs no division by n.
    """
    n = count.clamp_min(1.0)
    variance = _rowdot(w, centred) / n  # w^T cov(x, y) = var(y)
    ok = (count > 0) & torch.isfinite(variance)
    ok &= variance > DEGENERATE_RTOL * (variance.abs() + mean_y * mean_y)
    centred.div_(torch.where(ok, variance * n, torch.ones_like(variance)).unsqueeze(1))
    bad = (~ok).nonzero().squeeze(1)
    if bad.numel():
        w_bad = w.index_select(0, bad)
        norm2 = _rowdot(w_bad, w_bad)
        centred[bad] = w_bad / torch.where(norm2 > 0, norm2, torch.ones_like(norm2)).unsqueeze(1)
    return ok


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of two (units, K) tensors without a (units, K) temporary; shape (units,)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _explicit_padding(layer: nn.Conv2d) -> tuple[int, int, int, int]:
    """The layer's padding as F.pad amounts (left, right, top, bottom), resolving 'same' and 'valid'."""
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return (0, 0, 0, 0)
        totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size, strict=True)]
        (top, left) = (t // 2 for t in totals)
        return (left, totals[1] - left, top, totals[0] - top)
    ph, pw = layer.padding
    return (pw, pw, ph, ph)


def _check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds or len(set(kinds)) != len(kinds):
        raise UsageError(f"pattern kinds must be distinct values of {', '.join(KINDS)}; got {list(kinds)}")
    return tuple(kinds)


def _model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode (no dropout) and restore each one's own flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def _ieee_float32() -> Iterator[None]:
    """Disable TensorFloat-32 for CUDA convolutions and matrix products (10-bit mantissas would dominate the
    error of the sums); restores the previous settings. Uses torch's per-backend precision switches where they
    exist and the older allow_tf32 flags otherwise."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if hasattr(conv, "fp32_precision") and hasattr(matmul, "fp32_precision"):
        settings: list[tuple[Any, str, object]] = [
            (conv, "fp32_precision", "ieee"),
            (matmul, "fp32_precision", "ieee"),
        ]
    else:
        settings = [(torch.backends.cudnn, "allow_tf32", False), (matmul, "allow_tf32", False)]
    old = [getattr(owner, name) for owner, name, _ in settings]
    for owner, name, value in settings:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(settings, old, strict=True):
            setattr(owner, name, value)


def _check_signal(model: nn.Module) -> None:
    """Refuse a model with a normalisation or attention layer, through which PatternNet's signal is not defined
    (read from its modules: the explainer refuses any such node of the graph too)."""
    registered = tuple(m for kind in NON_SIGNAL_KINDS if kind in OP_KINDS for m in OP_KINDS[kind].modules)
    for name, module in model.named_modules():
        if isinstance(module, (*NORM_MODULES, nn.MultiheadAttention, nn.Softmax, ShiftedWindowAttention, *registered)):
            raise UsageError(
                "PatternNet and PatternAttribution are defined for linear layers and rectifiers; this model has a "
                f"normalisation, attention or mixture layer ({name}: {type(module).__name__}), through which their "
                "signal is not defined: use an LRP rule or composite")


def fit_patterns(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    kinds: Sequence[str] = ("positive",),
    *,
    device: torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
    ranks: Ranks | None = None,
) -> dict[str, PatternSet]:
    """Fit patterns of every requested kind for each Conv2d/Linear layer of an already canonized `model`.

    `batches` yields preprocessed image tensors (B, C, H, W) and must yield the same images each time it is
    iterated (a list, a DataLoader without shuffling or augmentation): the fit passes over it twice, first for
    each unit's mean output, then for the centred sums; both passes fit all `kinds`. The model runs in eval
    mode on `device` (default: where its parameters are; it is moved there in place) and
    `progress(pass_number, images_in_batch)` is called after each batch (pass_number 1 or 2). Layers that never
    run get the fallback pattern. Returns kind -> PatternSet with patterns on the CPU.

    Under torchrun (`ranks`, default: the current ones) each rank gives its own share of the images in `batches`:
    the float64 sums of each pass are added across ranks in place before they are used, so the patterns are
    those of one fit on every share together (to float64 rounding) and memory per rank does not grow.
    """
    ranks = ranks or current()
    kinds = _check_kinds(kinds)
    _check_signal(model)
    if isinstance(batches, Iterator):
        raise TypeError("fit_patterns passes over `batches` twice: give a list or a DataLoader, not an iterator")
    device = device or _model_device(model)
    model.to(device)
    layers = [
        _LayerFit(name, module, kinds, device)
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d | nn.Linear)
    ]
    if not layers:
        raise SmadlrpError("the model has no Conv2d or Linear layer to fit patterns for")
    handles = [fit.layer.register_forward_hook(fit.hook) for fit in layers]
    images = []
    try:
        with torch.no_grad(), _eval_mode(model), _ieee_float32():
            for pass_number in (1, 2):
                if pass_number == 2:
                    for fit in layers:
                        fit.start_second_pass()
                with ranks.shared_failure():
                    images.append(_run_pass(model, batches, device, pass_number, progress))
                if pass_number == 1:
                    counts = torch.tensor([images[0], *(fit.samples for fit in layers)], dtype=torch.int64,
                                          device=device)
                    ranks.all_reduce_sum_([counts, *(t for fit in layers for t in fit.first_pass_sums())])
                    for fit, samples in zip(layers, counts[1:].tolist(), strict=True):
                        fit.samples = samples
                    total = int(counts[0])
                    if total == 0:
                        raise SmadlrpError("no images to fit patterns on: the data set is empty")
                else:
                    ranks.all_reduce_sum_([t for fit in layers for t in fit.second_pass_sums()])
    finally:
        for handle in handles:
            handle.remove()
    if images[0] != images[1]:
        raise SmadlrpError(f"the batches gave {images[0]} images in the first pass and {images[1]} in the "
                           "second: pattern fitting needs the same images in both")
    return _finish(layers, kinds, total)


def _run_pass(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    device: torch.device,
    pass_number: int,
    progress: Callable[[int, int], None] | None,
) -> int:
    """Run `model` over every batch (its hooks take the statistics); returns the number of images."""
    images = 0
    for batch in batches:
        if not isinstance(batch, torch.Tensor) or batch.dim() < 2:
            raise SmadlrpError("pattern fitting expects batches of image tensors (B, C, H, W)")
        model(batch.to(device))
        release_free_memory()  # keeps the resident peak at the float64 sums plus one batch's forward pass
        images += batch.shape[0]
        if progress is not None:
            progress(pass_number, batch.shape[0])
    return images


def _finish(layers: list[_LayerFit], kinds: Sequence[str], images: int) -> dict[str, PatternSet]:
    """Turn the sums into PatternSets, releasing each layer's buffers as soon as its patterns exist."""
    sets = {kind: PatternSet(kind, {}, [], images) for kind in kinds}
    for fit in layers:
        for kind in kinds:
            pattern, stats = fit.finish(kind)
            sets[kind].patterns[fit.name] = pattern
            sets[kind].stats.append(stats)
    return sets
