"""Attention with its packed q, k and v projections split into separate Linear layers computing exactly what the
packed ones computed (what peft's LoRA, which adapts whole Linear layers, needs to adapt q and v alone).

`split_attention` splits, in place:

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

from smadlrp.core.errors import SmadlrpError, UsageError

TARGETS = ("q", "k", "v", "out")  # the projections of one attention
PACKED_NAMES = ("qkv", "to_qkv")  # names of packed q/k/v projection Linears (timm, torchvision MaxViT, Swin)
OUT_NAMES = ("proj", "merge", "out_proj")  # names of their sibling output projections


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
        """The packed product again, `x W^T + b` with W the three base weights, plus every LoRA update in one
        low-rank product `(x A^T) B^T` (A the adapters' A stacked, B their scaled B placed on their thirds): as fast
        as the packed layer, where peft's own forward adds two full-size passes per adapter."""
        layers: list[Any] = [self.q, self.k, self.v]  # Linear layers, or peft LoRA layers wrapping them
        bases = [getattr(layer, "base_layer", layer) for layer in layers]
        width = bases[0].out_features
        bias = torch.cat([b.bias if b.bias is not None else x.new_zeros(width) for b in bases]) \
            if any(b.bias is not None for b in bases) else None
        out = F.linear(x, torch.cat([b.weight for b in bases]), bias)
        adapters = [(third, layer, name) for third, layer in enumerate(layers)
                    if is_lora_layer(layer) and not layer.merged and not layer.disable_adapters
                    for name in layer.active_adapters]
        if not adapters:
            return out
        down = torch.cat([layer.lora_A[name].weight for _, layer, name in adapters])  # (adapters * rank, in)
        up = torch.cat([torch.cat([layer.lora_B[name].weight * layer.scaling[name] if third == row
                                   else x.new_zeros(width, layer.r[name]) for third, layer, name in adapters], 1)
                        for row in range(3)])  # (3 E, adapters * rank)
        return out + F.linear(F.linear(x, down), up)


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
class AttentionUnit:
    """One attention whose projections were split: its kind ("mha", "packed", "window"), the path of the split
    module (the MultiheadAttention, or the packed Linear), and the paths of its q, k, v and out Linear layers in the
    split model (out: None when it has none)."""

    kind: str
    path: str
    projections: dict[str, str | None]


def join(*parts: str) -> str:
    """A dotted module path from its non-empty parts."""
    return ".".join(part for part in parts if part)


def split_attention(model: nn.Module) -> list[AttentionUnit]:
    """Split the packed projections of every attention of `model` in place (module docstring); the units split."""
    units: list[AttentionUnit] = []
    for path, module in list(model.named_modules()):
        if isinstance(module, (SplitQKV, SplitMultiheadAttention)) or is_lora_layer(module):
            raise SmadlrpError("--lora: the model already carries LoRA adapters (attach_lora was called before)")
        if isinstance(module, nn.MultiheadAttention):
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, SplitMultiheadAttention(module, path))
            units.append(AttentionUnit("mha", path, {t: join(path, t) for t in TARGETS}))
        elif isinstance(module, ShiftedWindowAttention) and isinstance(module.qkv, nn.Linear):
            v2 = isinstance(module, ShiftedWindowAttentionV2)
            module.qkv = SplitQKV(module.qkv, ignore_key_bias=v2)
            module.__class__ = SplitWindowAttentionV2 if v2 else SplitWindowAttention
            qkv = join(path, "qkv")
            units.append(AttentionUnit("window", qkv, {"q": f"{qkv}.q", "k": f"{qkv}.k", "v": f"{qkv}.v",
                                               "out": join(path, "proj")}))
        else:
            for name in PACKED_NAMES:
                packed = getattr(module, name, None)
                if isinstance(packed, nn.Linear) and packed.out_features % 3 == 0:
                    setattr(module, name, SplitQKV(packed))
                    qkv = join(path, name)
                    out = next((n for n in OUT_NAMES if isinstance(getattr(module, n, None), nn.Linear)), None)
                    units.append(AttentionUnit("packed", qkv, {"q": f"{qkv}.q", "k": f"{qkv}.k", "v": f"{qkv}.v",
                                                       "out": None if out is None else join(path, out)}))
                    break
    return units


def is_lora_layer(module: nn.Module) -> bool:
    """A peft LoRA layer (it wraps its `base_layer` and holds `lora_A`)."""
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")
