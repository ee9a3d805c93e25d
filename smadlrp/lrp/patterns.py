"""PatternNet / PatternAttribution: streaming pattern statistics over a data set, the patterns, their files.

For every Conv2d and Linear layer and every output unit j, with x the layer input (for a convolution: each
input patch at each output position is one sample) and y_j = w_j^T x (bias excluded), two estimators:

- "all":      a_j  = cov(x, y_j) / (w_j^T cov(x, y_j)),           cov over every sample
- "positive": a+_j = cov+(x, y_j) / (w_j^T cov+(x, y_j)),         cov+ over the samples with y_j + b_j > 0,
              cov+(x, y_j) = E+[x y_j] - E+[x] E+[y_j]  (every mean conditional on the unit being active)

Every statistic is a sum over samples, accumulated batch by batch in float64 buffers of weight size, so memory
does not depend on the number of images. Convolution sums are weight-gradient shaped and computed with
`torch.nn.grad.conv2d_weight`; no patch matrix is ever built.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_weight

from smadlrp.container import read_document, read_tensors, write_document
from smadlrp.errors import SmadlrpError, UsageError

KINDS = ("all", "positive")
SCHEMA = "smadlrp.patterns/1"
FINGERPRINT_KEY = "weights_fingerprint"
# A unit is degenerate when var(y_j) <= DEGENERATE_RTOL * E[y_j^2] (over its samples): y_j is constant.
DEGENERATE_RTOL = 1e-6
ESTIMATORS = {
    "all": "a_j = cov(x, y_j) / (w_j^T cov(x, y_j)), cov(x, y_j) = E[x y_j] - E[x] E[y_j] over all samples; "
    "y_j = w_j^T x without bias; a convolution's samples are its input patches at every output position",
    "positive": "a+_j = cov+(x, y_j) / (w_j^T cov+(x, y_j)), cov+(x, y_j) = E+[x y_j] - E+[x] E+[y_j] where "
    "E+ averages over the samples with y_j + b_j > 0; y_j = w_j^T x without bias",
}
FALLBACK = (
    "degenerate unit (no samples, no active samples, non-finite statistics, or var(y_j) = w_j^T cov(x, y_j) "
    f"<= {DEGENERATE_RTOL:g} E[y_j^2] over its samples): a_j = w_j / (w_j^T w_j), or 0 when w_j = 0"
)
_RESERVED_KEYS = frozenset({"schema", "kinds", "images", "estimators", "fallback", "stats"})
_FINISH_BLOCK = 1 << 22  # float64 elements per block of units when computing patterns (32 MiB)
_HOOK_BLOCK = 1 << 23  # output elements per slice of a batch whose statistics are taken together


@dataclass
class LayerFitStats:
    """What one layer's fit saw: `samples` per unit (images x output positions), the share of (sample, unit)
    pairs that were active (positive kind only), how many of its `units` fell back to the default pattern."""

    name: str
    samples: int
    active_share: float | None
    degenerate_units: int
    units: int


@dataclass
class PatternSet:
    """Fitted patterns of one estimator kind; each pattern has its layer's weight shape and dtype (CPU)."""

    kind: str
    patterns: dict[str, torch.Tensor]
    stats: list[LayerFitStats]
    images: int


class _Sums:
    """float64 running sums for one layer and one kind, per unit j: sample count, sum y'_j, sum x, sum x y'_j.

    y'_j = out_j - offset_j with a fixed per-unit offset (the mean output over the unit's samples in the first
    batch that has any): covariances do not change under a shift, and centring y keeps
    E[x y'] - E[x] E[y'] free of cancellation. `sum_x` is per unit (weight shape) or shared by each group's
    units ((groups, *k)).
    """

    def __init__(self, weight: torch.Tensor, groups: int, shared_x: bool, device: torch.device) -> None:
        units = weight.shape[0]
        x_shape = (groups, *weight.shape[1:]) if shared_x else tuple(weight.shape)
        self.count = torch.zeros(units, dtype=torch.float64, device=device)
        self.sum_y = torch.zeros(units, dtype=torch.float64, device=device)
        self.sum_x = torch.zeros(x_shape, dtype=torch.float64, device=device)
        self.sum_xy = torch.zeros(tuple(weight.shape), dtype=torch.float64, device=device)
        self.offset = torch.zeros(units, dtype=torch.float64, device=device)
        self.unit_group = torch.arange(units, device=device) // (units // groups)

    def start_offsets(self, samples_out: torch.Tensor, count: torch.Tensor) -> None:
        """Fix the offset of each unit that has samples for the first time: the mean of its (masked) outputs
        `samples_out` over its `count` samples in this batch."""
        first = (self.count == 0) & (count > 0)
        if bool(first.any()):
            self.offset = torch.where(first, _unit_sum(samples_out) / count.clamp_min(1.0), self.offset)

    def x_rows(self, rows: slice) -> torch.Tensor:
        """sum x for the units in `rows`, shape (rows, *w.shape[1:])."""
        if self.sum_x.shape[0] == self.sum_xy.shape[0]:
            return self.sum_x[rows]
        return self.sum_x.index_select(0, self.unit_group[rows])


class _LayerFit:
    """Per-batch statistics of one Conv2d or Linear layer, fed by a forward hook."""

    def __init__(
        self, name: str, layer: nn.Conv2d | nn.Linear, kinds: Sequence[str], device: torch.device
    ) -> None:
        self.name = name
        self.layer = layer
        self.groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
        self.sums = {kind: _Sums(layer.weight.detach(), self.groups, kind == "all", device) for kind in kinds}
        self.samples = 0

    def hook(self, _module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        """Forward hook: statistics are taken at once, before any in-place op can change `out`. Large outputs
        go in slices of images: the temporaries (mask, centred output) stay under `_HOOK_BLOCK` elements."""
        x = args[0]
        step = max(1, _HOOK_BLOCK // max(1, out[0].numel()))
        for start in range(0, out.shape[0], step):
            self.update(x[start : start + step], out[start : start + step])

    def update(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Add one batch: `x` the layer input, `out` its output (bias included; active means out > 0)."""
        if isinstance(self.layer, nn.Linear):
            x = x.reshape(-1, x.shape[-1])
            out = out.reshape(-1, out.shape[-1])
        else:
            x = self._padded(x)
        samples = out.numel() // out.shape[1]
        self.samples += samples
        unit_shape = (1, -1) + (1,) * (out.dim() - 2)
        for kind, s in self.sums.items():
            if kind == "all":
                count = out.new_full(s.count.shape, samples, dtype=torch.float64)
                s.start_offsets(out, count)
                g = out - s.offset.to(out.dtype).view(unit_shape)
                self._add_shared_x(s.sum_x, x, out.shape)
            else:
                mask = (out > 0).to(out.dtype)
                count = _unit_sum(mask)
                g = out * mask
                s.start_offsets(g, count)
                g.addcmul_(mask, s.offset.to(out.dtype).view(unit_shape), value=-1.0)  # (out - offset) * mask
                self._add_xg(s.sum_x, x, mask)
                del mask
            s.count += count
            s.sum_y += _unit_sum(g)
            self._add_xg(s.sum_xy, x, g)
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

    def _conv_padding(self) -> tuple[int, ...]:
        """Padding for conv2d_weight to apply: the layer's own zero padding, or 0 when `_padded` did it."""
        layer = self.layer
        assert isinstance(layer, nn.Conv2d)
        if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            return (0, 0)
        return tuple(layer.padding)

    def _add_xg(self, acc: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> None:
        """acc[j] += sum over samples of x * g_j (weight shape); `g` has the output's shape."""
        layer = self.layer
        if isinstance(layer, nn.Linear):
            acc.addmm_(g.t().to(torch.float64), x.to(torch.float64))
            return
        padding = self._conv_padding()
        acc += conv2d_weight(x, layer.weight.shape, g, layer.stride, padding, layer.dilation, layer.groups)

    def _add_shared_x(self, acc: torch.Tensor, x: torch.Tensor, out_shape: torch.Size) -> None:
        """acc[group] += sum over samples of x (the same for every unit of a group)."""
        layer = self.layer
        if isinstance(layer, nn.Linear):
            acc += x.sum(dim=0, dtype=torch.float64)
            return
        ones = x.new_ones(out_shape[0], self.groups, *out_shape[2:])
        padding = self._conv_padding()
        acc += conv2d_weight(x, acc.shape, ones, layer.stride, padding, layer.dilation, self.groups)

    def finish(self, kind: str) -> tuple[torch.Tensor, LayerFitStats]:
        """The fitted pattern (weight shape and dtype, on CPU) and this layer's stats for `kind`."""
        s = self.sums[kind]
        weight = self.layer.weight.detach()
        units = weight.shape[0]
        degenerate = self._patterns_into_sums(s)
        s.sum_x = s.sum_x.new_empty(0)  # freed before the result is allocated
        pattern = s.sum_xy.to(device="cpu", dtype=weight.dtype)
        s.sum_xy = s.sum_xy.new_empty(0)
        active = None
        if kind == "positive":
            active = float(s.count.sum()) / (self.samples * units) if self.samples else 0.0
        return pattern, LayerFitStats(self.name, self.samples, active, degenerate, units)

    def _patterns_into_sums(self, s: _Sums) -> int:
        """Overwrite `s.sum_xy` with the patterns, block by block of units; returns the degenerate count."""
        weight = self.layer.weight.detach()
        units = weight.shape[0]
        bias = 0.0 if self.layer.bias is None else self.layer.bias.detach().to(torch.float64)
        mean_y = s.offset + s.sum_y / s.count.clamp_min(1.0) - bias  # E[w^T x] = offset + E[out - offset] - b
        block = max(1, _FINISH_BLOCK // max(1, weight[0].numel()))
        # one float64 weight block, reused: no fresh pages to fault in for every block
        w_block = s.sum_xy.new_empty((min(block, units), weight[0].numel()))
        degenerate = 0
        for start in range(0, units, block):
            rows = slice(start, min(units, start + block))
            w = w_block[: rows.stop - start].copy_(weight[rows].flatten(1))
            ok = _patterns_in_place(w, s.count[rows], s.sum_y[rows], s.x_rows(rows).view_as(w),
                                    s.sum_xy[rows].view_as(w), mean_y[rows])
            degenerate += int((~ok).sum())
        return degenerate


def _unit_sum(t: torch.Tensor) -> torch.Tensor:
    """Per-unit sum of (N, out) or (B, out, H', W'): positions in t's dtype, the batch in float64; (out,)."""
    if t.dim() == 4:
        t = t.sum(dim=(2, 3))
    return t.sum(dim=0, dtype=torch.float64)


def _patterns_in_place(
    w: torch.Tensor,
    count: torch.Tensor,
    sum_y: torch.Tensor,
    sum_x: torch.Tensor,
    sum_xy: torch.Tensor,
    mean_y: torch.Tensor,
) -> torch.Tensor:
    """Overwrite `sum_xy` (float64 sums of a block of units) with their patterns; return the ok-unit mask.

    w, sum_x, sum_xy: (units, K); count, sum_y, mean_y: (units,). sum_y and sum_xy may use y shifted by any
    per-unit constant; mean_y is E[w^T x] without shift. The pattern n cov / (w^T n cov) needs no division by
    n: sum_xy - sum_x * sum_y / n is n cov(x, y).
    """
    n = count.clamp_min(1.0)
    scaled_cov = sum_xy.addcmul_(sum_x, (sum_y / n).unsqueeze(1), value=-1.0)
    variance = _rowdot(w, scaled_cov) / n  # w^T cov(x, y) = var(y)
    ok = (count > 0) & torch.isfinite(variance)
    ok &= variance > DEGENERATE_RTOL * (variance.abs() + mean_y * mean_y)
    scaled_cov.div_(torch.where(ok, variance * n, torch.ones_like(variance)).unsqueeze(1))
    bad = (~ok).nonzero().squeeze(1)
    if bad.numel():
        w_bad = w.index_select(0, bad)
        norm2 = _rowdot(w_bad, w_bad)
        scaled_cov[bad] = w_bad / torch.where(norm2 > 0, norm2, torch.ones_like(norm2)).unsqueeze(1)
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


def fit_patterns(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    kinds: Sequence[str] = ("positive",),
    *,
    device: torch.device | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, PatternSet]:
    """Fit patterns of every requested kind for each Conv2d/Linear layer of an already canonized `model`.

    `batches` yields preprocessed image tensors (B, C, H, W); one pass over them fits all `kinds`. The model
    runs in eval mode on `device` (default: where its parameters are; it is moved there in place) and
    `progress(images_in_batch)` is called after each batch. Layers that never run get the fallback pattern.
    Returns kind -> PatternSet with patterns on the CPU.
    """
    kinds = _check_kinds(kinds)
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
    images = 0
    try:
        with torch.no_grad(), _eval_mode(model), _ieee_float32():
            for batch in batches:
                if not isinstance(batch, torch.Tensor) or batch.dim() < 2:
                    raise SmadlrpError("pattern fitting expects batches of image tensors (B, C, H, W)")
                model(batch.to(device))
                images += batch.shape[0]
                if progress is not None:
                    progress(batch.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    if images == 0:
        raise SmadlrpError("no images to fit patterns on: the data set is empty")
    return _finish(layers, kinds, images)


def _finish(layers: list[_LayerFit], kinds: Sequence[str], images: int) -> dict[str, PatternSet]:
    """Turn the sums into PatternSets, releasing each layer's buffers as soon as its patterns exist."""
    sets = {kind: PatternSet(kind, {}, [], images) for kind in kinds}
    for fit in layers:
        for kind in kinds:
            pattern, stats = fit.finish(kind)
            sets[kind].patterns[fit.name] = pattern
            sets[kind].stats.append(stats)
        fit.sums.clear()
    return sets


def save_patterns(
    path: str | os.PathLike[str], sets: Mapping[str, PatternSet], metadata: Mapping[str, Any]
) -> None:
    """Write `sets` to a safetensors file (atomically): tensors "{kind}/{layer}", JSON header key "smadlrp".

    `metadata` (JSON-serialisable, e.g. the weights fingerprint under "weights_fingerprint") is stored beside
    the schema, kinds, image count, estimator definitions and per-layer stats.
    """
    clash = _RESERVED_KEYS & metadata.keys()
    if clash:
        raise ValueError(f"metadata keys {sorted(clash)} are reserved for the pattern file itself")
    if not sets:
        raise ValueError("no pattern sets to save")
    images = {s.images for s in sets.values()}
    if len(images) != 1:
        raise ValueError("pattern sets saved together must come from one fit (same number of images)")
    header = {
        "schema": SCHEMA,
        "kinds": list(sets),
        "images": images.pop(),
        "estimators": {kind: ESTIMATORS[kind] for kind in sets},
        "fallback": FALLBACK,
        "stats": {kind: [asdict(s) for s in pattern_set.stats] for kind, pattern_set in sets.items()},
        **metadata,
    }
    tensors = {
        f"{kind}/{name}": tensor.detach().cpu().contiguous()
        for kind, pattern_set in sets.items()
        for name, tensor in pattern_set.patterns.items()
    }
    write_document(path, tensors, header)


def _read_file(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The decoded "smadlrp" metadata and the tensors of a pattern file, or SmadlrpError saying why not."""
    meta = read_document(path)
    if meta["schema"] != SCHEMA:
        raise SmadlrpError(f"{path} has schema {meta['schema']!r}; smadlrp reads pattern files of {SCHEMA}")
    return meta, read_tensors(path)


def load_patterns(path: str | os.PathLike[str]) -> tuple[dict[str, PatternSet], dict[str, Any]]:
    """Read a pattern file written by `save_patterns`: (kind -> PatternSet, the full metadata dict)."""
    meta, tensors = _read_file(path)
    try:
        kinds = list(meta["kinds"])
        stats = {kind: [LayerFitStats(**row) for row in meta["stats"][kind]] for kind in kinds}
        images = int(meta["images"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SmadlrpError(f"{path} is a damaged pattern file (metadata: {exc!r})") from exc
    sets: dict[str, PatternSet] = {}
    for kind in kinds:
        prefix = f"{kind}/"
        patterns = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
        if kind not in KINDS or sorted(patterns) != sorted(s.name for s in stats[kind]):
            raise SmadlrpError(f"{path} is a damaged pattern file (kind {kind!r} does not match its tensors)")
        sets[kind] = PatternSet(kind, patterns, stats[kind], images)
    if sum(len(s.patterns) for s in sets.values()) != len(tensors):
        raise SmadlrpError(f"{path} is a damaged pattern file (it holds tensors of an unlisted kind)")
    return sets, meta


def weights_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 hex digest over every entry's name, dtype, shape and raw bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_fingerprint(meta: Mapping[str, Any], expected: str) -> None:
    """Raise SmadlrpError unless the pattern file's metadata names the weights fingerprint `expected`."""
    found = meta.get(FINGERPRINT_KEY)
    if found is None:
        raise SmadlrpError("the pattern file records no weights fingerprint; refit with smadlrp fit-patterns")
    if found != expected:
        raise SmadlrpError(
            f"patterns were fitted on another model (weights {str(found)[:12]}..., this checkpoint has "
            f"{expected[:12]}...); refit with smadlrp fit-patterns"
        )
