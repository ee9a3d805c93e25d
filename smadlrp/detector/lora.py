"""LoRA adaptation of the attention projections of transformer detectors (`smadlrp finetune --lora RANK`), through
peft.

MADation (WACVW 2025) adapts only the query and value projections of a frozen CLIP; that is the default here, and
`--lora-targets` chooses among `q`, `k`, `v` and `out` (the attention's output projection).

Splitting. peft adapts whole Linear layers, but most networks pack q, k and v into one weight. `attach_lora` first
splits them, in place, into separate Linear layers computing exactly what the packed ones computed:

* every `nn.MultiheadAttention` at path `M` (torchvision ViT, open_clip CLIP) becomes a `SplitMultiheadAttention`
  with children `M.q`, `M.k`, `M.v` (rows [0:E), [E:2E), [2E:3E) of `in_proj_weight` and `in_proj_bias`) and `M.out`
  (`out_proj`);
* every packed projection Linear at path `P` called as a module (timm's `Attention.qkv`, torchvision MaxViT's
  `to_qkv`) becomes a `SplitQKV` with children `P.q`, `P.k`, `P.v` (the thirds of its rows); the output projection
  (`proj`, `merge`) stays where it is;
* torchvision Swin's `ShiftedWindowAttention(V2)` reads `qkv.weight` in a functional call, so its `qkv` is split
  the same way and its forward is replaced by a copy of torchvision's `shifted_window_attention` that calls the
  projections as modules. Swin V2 ignores the key bias (torchvision zeroes it in every forward): its split `P.k`
  has no bias, and the ignored values are kept in the buffer `P.k_bias` (for the round trip to the packed layout).

Every LoRA-adapted module is then checked with one forward pass: an adapter that the network bypasses (by reading
a weight functionally) raises SmadlrpError naming it.

LoRA. A projection with weight W (out, in) gets A (rank, in) and B (out, rank), B zero at the start; it computes
`x W^T + b + scaling * (x A^T) B^T` with `scaling = alpha / rank`, i.e. its merged weight is
`W + scaling * B @ A`. The default alpha is the rank (scaling 1), see `LoraSettings`.

Layouts:

* the training model's own `state_dict()` (split layout): peft's, e.g. `M.q.base_layer.weight`,
  `M.q.lora_A.default.weight`, `M.q.lora_B.default.weight`; rebuilding the original network and attaching LoRA with
  the same settings gives the same layout, so it can be loaded back (resume);
* `LoraAdapter.merged_state_dict()`: exactly the keys and shapes of the original network, LoRA merged in;
* `LoraAdapter.adapter_state_dict()`: only `"<module path>.lora_A"` (rank, in) and `"<module path>.lora_B"`
  (out, rank) for each adapted projection, the path in the split layout (e.g.
  `encoder.layers.encoder_layer_0.self_attention.q`, `blocks.0.attn.qkv.v`, `features.0.0.attn.proj`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

from smadlrp.core.errors import SmadlrpError, UsageError, shorten, shown

TARGETS = ("q", "k", "v", "out")  # what `--lora-targets` chooses among
DEFAULT_TARGETS = ("q", "v")  # MADation's choice
PACKED_NAMES = ("qkv", "to_qkv")  # names of packed q/k/v projection Linears (timm, torchvision MaxViT, Swin)
OUT_NAMES = ("proj", "merge", "out_proj")  # names of their sibling output projections
ADAPTER = "default"  # peft's adapter name
TRANSFORMERS = "vit_*, swin_*, maxvit_t, clip_*, timm ViTs"


@dataclass(frozen=True)
class LoraSettings:
    """What `--lora RANK`, `--lora-alpha` and `--lora-targets` ask for.

    `rank`: the inner dimension r of every adapter (A is (r, in), B is (out, r)). `alpha`: the update is scaled by
    alpha / r. `from_options` defaults alpha to the rank, i.e. scaling 1: the merged update is exactly B @ A, so a
    saved adapter reads without a scale, and it is the LoRA paper's own setting (alpha fixed to the first rank
    tried). `targets`: which projections of each attention get adapters, among q, k, v and out.
    """

    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS

    @classmethod
    def from_options(cls, rank: int, alpha: float | None = None,
                     targets: str | Sequence[str] | None = None) -> LoraSettings:
        """Settings from the command-line values (alpha None: the rank; targets None: q and v; a string: "q,v"),
        validated (UsageError)."""
        chosen = DEFAULT_TARGETS if targets is None else parse_targets(targets) if isinstance(targets, str) \
            else tuple(targets)
        settings = cls(rank, float(rank) if alpha is None else alpha, chosen)
        settings.validate()
        return settings

    @property
    def scaling(self) -> float:
        """alpha / rank, the factor of every LoRA update."""
        return self.alpha / self.rank

    def validate(self) -> None:
        """UsageError (one line) for a rank below 1, an alpha that is not a positive finite number, or targets
        that are empty, repeated or unknown."""
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise UsageError(f"--lora {shown(self.rank)}: the LoRA rank must be a whole number of at least 1")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) \
                or self.alpha <= 0:
            raise UsageError(f"--lora-alpha {shown(self.alpha)}: LoRA alpha must be a positive finite number")
        _check_targets(tuple(self.targets))


def _check_targets(targets: tuple[str, ...]) -> None:
    valid = ", ".join(TARGETS)
    if not targets:
        raise UsageError(f"--lora-targets: name at least one of {valid}")
    for target in targets:
        if target not in TARGETS:
            raise UsageError(f"--lora-targets: unknown target {shown(target)}; choose among {valid}")
    repeated = sorted({t for t in targets if targets.count(t) > 1})
    if repeated:
        raise UsageError(f"--lora-targets: {', '.join(repeated)} named twice; choose each of {valid} at most once")


def parse_targets(text: str) -> tuple[str, ...]:
    """"q,v" -> ("q", "v") (spaces and case ignored); UsageError for empty, unknown or repeated names."""
    targets = tuple(part.strip().lower() for part in text.split(",")) if text.strip() else ()
    if "" in targets:
        raise UsageError(f"--lora-targets {shown(text)}: an empty name; write e.g. q,v")
    _check_targets(targets)
    return targets


# --- splitting --------------------------------------------------------------------------------------------------


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """A Linear layer on copies of `weight` (out, in) and `bias` (out), on their device and dtype."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return layer


class SplitQKV(nn.Module):
    """A packed q/k/v projection Linear (in -> 3 E) as three Linear layers `q`, `k`, `v` (in -> E each): (..., in)
    -> (..., 3 E), `cat([q(x), k(x), v(x)], -1)`, what the packed layer computed.

    `ignore_key_bias` (Swin V2): the key projection gets no bias; the packed bias's key third is kept, unused, in
    the buffer `k_bias`.
    """

    k_bias: Tensor | None

    def __init__(self, packed: nn.Linear, ignore_key_bias: bool = False) -> None:
        super().__init__()
        if packed.out_features % 3:
            raise SmadlrpError(f"cannot split a q/k/v projection with {packed.out_features} outputs (not 3 E)")
        wq, wk, wv = packed.weight.chunk(3)
        bq, bk, bv = packed.bias.chunk(3) if packed.bias is not None else (None, None, None)
        self.q, self.v = _linear(wq, bq), _linear(wv, bv)
        self.k = _linear(wk, None if ignore_key_bias else bk)
        self.register_buffer("k_bias", bk.detach().clone() if ignore_key_bias and bk is not None else None)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


class SplitMultiheadAttention(nn.Module):
    """`nn.MultiheadAttention` with separate Linear projections `q`, `k`, `v` and `out`, computing what it computed
    (through `F.scaled_dot_product_attention`), for calls with `need_weights=False`, no key padding mask and an
    optional `attn_mask` ((L, S) or (B * heads, L, S), boolean or additive float). Returns (output, None).

    Shapes: query (B, L, E) with `batch_first`, else (L, B, E), or unbatched (L, E); key and value likewise with
    S tokens.
    """

    def __init__(self, mha: nn.MultiheadAttention, path: str) -> None:
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise UsageError(f"--lora: cannot adapt {path!r}: MultiheadAttention with add_bias_kv or add_zero_attn")
        if mha.in_proj_weight is not None:
            wq, wk, wv = mha.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
        bq, bk, bv = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        self.q, self.k, self.v = _linear(wq, bq), _linear(wk, bk), _linear(wv, bv)
        self.out = _linear(mha.out_proj.weight, mha.out_proj.bias)
        self.heads, self.head_dim, self.embed_dim = mha.num_heads, mha.head_dim, mha.embed_dim
        self.batch_first, self.dropout, self.path = mha.batch_first, mha.dropout, path

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if key_padding_mask is not None or need_weights or is_causal:
            asked = "need_weights=True" if need_weights else "key_padding_mask" if key_padding_mask is not None \
                else "is_causal=True"
            raise SmadlrpError(f"the LoRA-split attention {self.path!r} was called with {asked}; it supports "
                               "need_weights=False with an optional attn_mask only")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, length, sources = query.shape[0], query.shape[1], key.shape[1]
        q = self.q(query).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(key).view(batch, sources, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(value).view(batch, sources, self.heads, self.head_dim).transpose(1, 2)
        mask = attn_mask
        if mask is not None:
            if mask.dtype == torch.bool:  # True: may not attend (MultiheadAttention's meaning, not SDPA's)
                mask = torch.zeros_like(mask, dtype=q.dtype).masked_fill_(mask, float("-inf"))
            if mask.dim() == 3:
                mask = mask.view(batch, self.heads, length, sources)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = self.out(out.transpose(1, 2).reshape(batch, length, self.embed_dim))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def _window_attention(attention: ShiftedWindowAttention, x: Tensor, logit_scale: Tensor | None) -> Tensor:
    """torchvision's `shifted_window_attention` with the q/k/v and output projections called as modules (so that
    their LoRA adapters take part): (B, H, W, C) -> (B, H, W, C)."""
    window, heads = attention.window_size, attention.num_heads
    relative_position_bias = attention.get_relative_position_bias()
    batch, height, width, channels = x.shape
    pad_r = (window[1] - width % window[1]) % window[1]
    pad_b = (window[0] - height % window[0]) % window[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_h, pad_w, _ = x.shape
    shift = list(attention.shift_size)
    if window[0] >= pad_h:  # a window as large as the feature map: no shift
        shift[0] = 0
    if window[1] >= pad_w:
        shift[1] = 0
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    num_windows = (pad_h // window[0]) * (pad_w // window[1])
    x = x.view(batch, pad_h // window[0], window[0], pad_w // window[1], window[1], channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch * num_windows, window[0] * window[1], channels)

    qkv = attention.qkv(x)  # a SplitQKV; V2's key bias is absent from it, as torchvision zeroes it
    qkv = qkv.reshape(x.size(0), x.size(1), 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:  # V2: cosine attention
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        q = q * (channels // heads) ** -0.5
        attn = q.matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift) > 0:
        mask = x.new_zeros((pad_h, pad_w))
        h_slices = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
        w_slices = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                mask[h[0]:h[1], w[0]:w[1]] = count
                count += 1
        mask = mask.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
        mask = mask.permute(0, 2, 1, 3).reshape(num_windows, window[0] * window[1])
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        attn = attn.view(x.size(0) // num_windows, num_windows, heads, x.size(1), x.size(1))
        attn = attn + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, x.size(1), x.size(1))
    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention.attention_dropout, training=attention.training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), channels)
    x = attention.proj(x)
    x = F.dropout(x, p=attention.dropout, training=attention.training)
    x = x.view(batch, pad_h // window[0], pad_w // window[1], window[0], window[1], channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, pad_h, pad_w, channels)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :height, :width, :].contiguous()


class SplitWindowAttention(ShiftedWindowAttention):
    """torchvision's `ShiftedWindowAttention` whose `qkv` is a `SplitQKV`, called as a module: (B, H, W, C) ->
    (B, H, W, C). An existing module is converted in place by `attach_lora` (its class is swapped)."""

    def forward(self, x: Tensor) -> Tensor:
        return _window_attention(self, x, None)


class SplitWindowAttentionV2(ShiftedWindowAttentionV2):
    """`SplitWindowAttention` for Swin V2 (cosine attention with a learnt logit scale)."""

    def forward(self, x: Tensor) -> Tensor:
        return _window_attention(self, x, self.logit_scale)


@dataclass(frozen=True)
class _Unit:
    """One attention whose projections were split: its kind ("mha", "packed", "window"), the path of the split
    module (the MultiheadAttention, or the packed Linear), and the paths of its q, k, v and out Linear layers in the
    split model (out: None when it has none)."""

    kind: str
    path: str
    projections: dict[str, str | None]


def _join(*parts: str) -> str:
    return ".".join(part for part in parts if part)


def _split_attention(model: nn.Module) -> list[_Unit]:
    """Split the packed projections of every attention of `model` in place (module docstring); the units split."""
    units: list[_Unit] = []
    for path, module in list(model.named_modules()):
        if isinstance(module, (SplitQKV, SplitMultiheadAttention)) or _is_lora_layer(module):
            raise SmadlrpError("--lora: the model already carries LoRA adapters (attach_lora was called before)")
        if isinstance(module, nn.MultiheadAttention):
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, SplitMultiheadAttention(module, path))
            units.append(_Unit("mha", path, {t: _join(path, t) for t in TARGETS}))
        elif isinstance(module, ShiftedWindowAttention) and isinstance(module.qkv, nn.Linear):
            v2 = isinstance(module, ShiftedWindowAttentionV2)
            module.qkv = SplitQKV(module.qkv, ignore_key_bias=v2)
            module.__class__ = SplitWindowAttentionV2 if v2 else SplitWindowAttention
            qkv = _join(path, "qkv")
            units.append(_Unit("window", qkv, {"q": f"{qkv}.q", "k": f"{qkv}.k", "v": f"{qkv}.v",
                                               "out": _join(path, "proj")}))
        else:
            for name in PACKED_NAMES:
                packed = getattr(module, name, None)
                if isinstance(packed, nn.Linear) and packed.out_features % 3 == 0:
                    setattr(module, name, SplitQKV(packed))
                    qkv = _join(path, name)
                    out = next((n for n in OUT_NAMES if isinstance(getattr(module, n, None), nn.Linear)), None)
                    units.append(_Unit("packed", qkv, {"q": f"{qkv}.q", "k": f"{qkv}.k", "v": f"{qkv}.v",
                                                       "out": None if out is None else _join(path, out)}))
                    break
    return units


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def _matrix(layer: nn.Module, which: str) -> nn.Linear:
    """The LoRA matrix `which` ("A" or "B") of a peft LoRA layer, as its Linear layer (weight (rank, in) or
    (out, rank))."""
    matrices = getattr(layer, f"lora_{which}")
    assert isinstance(matrices, nn.ModuleDict)
    matrix = matrices[ADAPTER]
    assert isinstance(matrix, nn.Linear)
    return matrix


# --- attaching --------------------------------------------------------------------------------------------------


class LoraAdapter:
    """A model carrying LoRA adapters (`attach_lora`), the original state-dict layout it came from, and the views a
    trainer needs: the trainable parameters, the merged state dict of the original layout, the adapter tensors."""

    def __init__(self, model: nn.Module, settings: LoraSettings, arch_name: str, original: dict[str, torch.Size],
                 units: list[_Unit], adapted: list[str], head_prefixes: tuple[str, ...]) -> None:
        self.model = model
        self.settings = settings
        self.arch_name = arch_name
        self.original_layout = original  # key -> shape of the original network's state dict, in its order
        self.units = units
        self.adapted = adapted  # module paths of the LoRA layers, in the split model
        self.head_prefixes = head_prefixes
        self._trainable = [p for p in model.parameters() if p.requires_grad]

    def _layers(self) -> Iterator[tuple[str, nn.Module]]:
        for path in self.adapted:
            yield path, self.model.get_submodule(path)

    def train(self, mode: bool = True) -> None:
        """Put the model in training mode (`mode` True; call this instead of `model.train()`) or eval mode. In
        training mode the batch-norm layers of the frozen network stay in eval mode: their running statistics are
        buffers outside LoRA and the head, and are kept as they were, like every other frozen tensor."""
        self.model.train(mode)
        if mode:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                        p.requires_grad for p in module.parameters()):
                    module.eval()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters to optimise: the LoRA A and B matrices and the head, in the model's order."""
        return list(self._trainable)

    @property
    def trainable_count(self) -> int:
        """The number of trainable scalars (LoRA and head)."""
        return sum(p.numel() for p in self._trainable)

    def lora_parameter_names(self) -> list[str]:
        """The names of the LoRA parameters in the training model's state dict (split layout)."""
        return [_join(path, f"lora_{ab}", ADAPTER, "weight") for path in self.adapted for ab in ("A", "B")]

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """`"<module path>.lora_A"` (rank, in) and `"<module path>.lora_B"` (out, rank) of every adapted projection
        (paths of the split layout), contiguous CPU copies; the update of a projection is (alpha / rank) * B @ A."""
        state: dict[str, Tensor] = {}
        for path, layer in self._layers():
            for ab in ("A", "B"):
                weight = _matrix(layer, ab).weight
                state[f"{path}.lora_{ab}"] = weight.detach().to("cpu", copy=True).contiguous()
        return state

    def merged_state_dict(self) -> dict[str, Tensor]:
        """A state dict of the original network (exactly its keys and shapes, in its order) with every LoRA update
        merged into its projection's weight and the split projections packed again; copies: the training model is
        left as it is. Loaded into a freshly built original network, it computes what the adapted model computes."""
        with torch.no_grad():
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            for path, layer in self._layers():
                a = state.pop(_join(path, "lora_A", ADAPTER, "weight"))
                b = state.pop(_join(path, "lora_B", ADAPTER, "weight"))
                base = state.pop(_join(path, "base_layer", "weight"))
                scaling = float(layer.scaling[ADAPTER])  # type: ignore[index]
                state[f"{path}.weight"] = (base + scaling * (b.to(base.dtype) @ a.to(base.dtype))).to(base.dtype)
                if _join(path, "base_layer", "bias") in state:
                    state[f"{path}.bias"] = state.pop(_join(path, "base_layer", "bias"))
            for unit in self.units:
                _pack(unit, state, self.original_layout)
        missing = [k for k in self.original_layout if k not in state]
        extra = [k for k in state if k not in self.original_layout]
        wrong = [k for k in self.original_layout if k in state and state[k].shape != self.original_layout[k]]
        if missing or extra or wrong:
            raise SmadlrpError(f"cannot merge the LoRA adapters of {self.arch_name} back into its layout "
                               f"(missing {missing[:2]}, unexpected {extra[:2]}, reshaped {wrong[:2]})")
        return {k: state[k] for k in self.original_layout}

    def describe(self) -> dict[str, Any]:
        """JSON-able summary: rank, alpha, scaling, targets, adapted modules, trainable and total parameters (all
        parameters of the training model, LoRA included)."""
        return {
            "rank": self.settings.rank,
            "alpha": self.settings.alpha,
            "scaling": self.settings.scaling,
            "targets": list(self.settings.targets),
            "adapted_modules": len(self.adapted),
            "trainable_parameters": self.trainable_count,
            "total_parameters": sum(p.numel() for p in self.model.parameters()),
        }


def _pack(unit: _Unit, state: dict[str, Tensor], original: dict[str, torch.Size]) -> None:
    """Replace the split tensors of `unit` in `state` (merged, in the split layout) by the original packed ones."""
    p = unit.path

    def take(name: str) -> Tensor | None:
        return state.pop(f"{p}.{name}", None)

    if unit.kind == "mha":
        weights = [take(f"{t}.weight") for t in ("q", "k", "v")]
        biases = [take(f"{t}.bias") for t in ("q", "k", "v")]
        if f"{p}.in_proj_weight" in original:
            state[f"{p}.in_proj_weight"] = torch.cat(weights)  # type: ignore[arg-type]
        else:
            for t, weight in zip(("q", "k", "v"), weights, strict=True):
                state[f"{p}.{t}_proj_weight"] = weight  # type: ignore[assignment]
        if biases[0] is not None:
            state[f"{p}.in_proj_bias"] = torch.cat(biases)  # type: ignore[arg-type]
        state[f"{p}.out_proj.weight"] = take("out.weight")  # type: ignore[assignment]
        out_bias = take("out.bias")
        if out_bias is not None:
            state[f"{p}.out_proj.bias"] = out_bias
        return
    state[f"{p}.weight"] = torch.cat([take(f"{t}.weight") for t in ("q", "k", "v")])  # type: ignore[misc]
    q_bias, k_bias, v_bias, ignored = take("q.bias"), take("k.bias"), take("v.bias"), take("k_bias")
    if q_bias is not None and v_bias is not None:
        state[f"{p}.bias"] = torch.cat([q_bias, k_bias if k_bias is not None else ignored, v_bias])  # type: ignore[list-item]


def attach_lora(model: nn.Module, settings: LoraSettings, head_prefixes: tuple[str, ...], arch_name: str,
                image_size: int) -> LoraAdapter:
    """Adapt the attention projections of `model` (in place) with LoRA: split packed projections, inject peft's
    LoRA layers on the `settings.targets` projections, and make only the LoRA matrices and the parameters whose
    names start with one of `head_prefixes` (e.g. "heads.head.") trainable. One forward pass of a (1, 3,
    `image_size`, `image_size`) input checks that every adapter is called.

    UsageError when `model` has no attention projection (a CNN) or the rank exceeds a projection's width;
    SmadlrpError when an adapter would be bypassed. After an error `model` may be left with its projections split
    (computing the same function): build it again rather than reuse it.
    """
    import peft

    settings.validate()
    original = {k: v.shape for k, v in model.state_dict().items()}
    units = _split_attention(model)
    if not units:
        raise UsageError(f"--lora: {arch_name} has no attention projections to adapt; LoRA applies to transformers "
                         f"({TRANSFORMERS})")
    paths = [path for unit in units for t in settings.targets if (path := unit.projections[t]) is not None]
    if not paths:
        raise UsageError(f"--lora-targets {','.join(settings.targets)}: {arch_name} has no such projections")
    for path in paths:
        layer = model.get_submodule(path)
        assert isinstance(layer, nn.Linear)
        width = min(layer.in_features, layer.out_features)
        if settings.rank > width:
            raise UsageError(f"--lora {settings.rank}: the rank exceeds the width {width} of {arch_name}'s "
                             f"projection {path}; choose at most {width}")
    # peft annotates lora_alpha as int, but takes any number: its scaling is lora_alpha / r
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=paths,  # type: ignore[arg-type]
                             lora_dropout=0.0, bias="none")
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)  # no model.config needed; warns nothing
    adapted = [path for path, module in model.named_modules() if _is_lora_layer(module)]
    if sorted(adapted) != sorted(paths):
        raise SmadlrpError(f"--lora: peft adapted {len(adapted)} module(s) of {arch_name}, {len(paths)} asked")
    lora = {id(p) for path in adapted for ab in "AB" for p in _matrix(model.get_submodule(path), ab).parameters()}
    heads_found = set()
    for name, param in model.named_parameters():
        prefix = next((h for h in head_prefixes if name.startswith(h)), None)
        param.requires_grad_(id(param) in lora or prefix is not None)
        if prefix is not None:
            heads_found.add(prefix)
    absent = [h for h in head_prefixes if h not in heads_found]
    if absent:
        raise SmadlrpError(f"--lora: {arch_name} has no head parameters named {absent[0]}*")
    adapter = LoraAdapter(model, settings, arch_name, original, units, adapted, head_prefixes)
    check_adapters_called(model, adapted, torch.zeros(1, 3, image_size, image_size), arch_name)
    return adapter


def check_adapters_called(model: nn.Module, adapted: list[str], example: Tensor, arch_name: str) -> None:
    """Run `example` (B, 3, H, W) through `model` (eval mode, no gradients; its modes are restored) and raise
    SmadlrpError naming the first LoRA layer among `adapted` (module paths) whose adapter was not called, i.e. that
    the network bypasses by reading its weights directly."""
    called: set[str] = set()
    handles = []
    for path in adapted:
        lora_a = _matrix(model.get_submodule(path), "A")
        handles.append(lora_a.register_forward_pre_hook(lambda _m, _x, path=path: called.add(path)))
    modes = {module: module.training for module in model.modules()}
    parameter = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(example.to(parameter.device, parameter.dtype))
    except SmadlrpError:
        raise
    except Exception as exc:  # noqa: BLE001 - the network's own failure on the split projections, any type
        problem = shorten(" ".join(f"{exc.__class__.__name__}: {exc}".split()), 100)
        raise SmadlrpError(f"--lora: {arch_name} does not run with split attention projections ({problem}); it "
                           "reads them in a way LoRA cannot adapt") from exc
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    skipped = [path for path in adapted if path not in called]
    if skipped:
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        raise SmadlrpError(f"--lora: the adapter on {skipped[0]}{more} of {arch_name} is never called: the network "
                           "reads that projection's weight directly, which would bypass LoRA")
