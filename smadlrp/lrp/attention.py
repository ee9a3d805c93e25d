"""Attention written out as explicit nodes, so that every step gets its own rule.

To torch.fx an `nn.MultiheadAttention` is one call and torchvision's Swin attention one function. The two
canonizations here replace them by modules that compute the same function with explicit nodes: the q, k and v
projections (Linear layers), the scaled scores `q k^T` (a product), the additive bias and mask (constants), the
softmax, the weighted sum `A v` (a product) and the output projection (a Linear layer). The Linear layers keep the
qualified names of the projections they come from (`...self_attention.q`, `.k`, `.v`, `.out_proj`; Swin's `qkv`
and `proj`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

from smadlrp.core.errors import UsageError
from smadlrp.lrp.window_ops import window_mask, window_partition, window_reverse

# Single calls to torch.fx (their control flow depends on the feature size); wrapped where they are called.
torch.fx.wrap("window_partition")
torch.fx.wrap("window_reverse")
torch.fx.wrap("window_mask")


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """A Linear layer on `weight` (out, in) and `bias`, sharing their storage."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=bias.requires_grad)
    return layer


class ExplicitMultiheadAttention(nn.Module):
    """`nn.MultiheadAttention` (eval mode) as explicit nodes; called like it, returns (output, None). The query
    projection `q` carries the scale 1 / sqrt(head_dim) in its weights and bias.

    Shapes: query (B, L, E) with `batch_first`, else (L, B, E); key and value (B, S, E) alike.
    """

    def __init__(self, mha: nn.MultiheadAttention, name: str) -> None:
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise UsageError(f"cannot explain {name!r}: MultiheadAttention with add_bias_kv or add_zero_attn")
        e = mha.embed_dim
        if mha.in_proj_weight is not None:
            wq, wk, wv = mha.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
        bq, bk, bv = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        scale = 1.0 / math.sqrt(mha.head_dim)  # folded into the query projection: no scaled copy of q is kept
        with torch.no_grad():
            wq, bq = wq * scale, None if bq is None else bq * scale
        self.q, self.k, self.v = _linear(wq, bq), _linear(wk, bk), _linear(wv, bv)
        self.out_proj = _linear(mha.out_proj.weight, mha.out_proj.bias)
        self.heads, self.head_dim, self.batch_first, self.embed_dim = mha.num_heads, mha.head_dim, mha.batch_first, e
        self.name = name

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise UsageError(f"cannot explain {self.name!r}: attention masks are not supported")
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q, k, v = self._heads(self.q(query)), self._heads(self.k(key)), self._heads(self.v(value))
        attention = F.softmax(q @ k.transpose(-2, -1), dim=-1)
        out = (attention @ v).transpose(1, 2)
        out = self.out_proj(out.reshape(out.shape[0], out.shape[1], self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def _heads(self, t: Tensor) -> Tensor:
        """(B, L, E) -> (B, heads, L, head_dim)."""
        return t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim).transpose(1, 2)


class ExplicitWindowAttention(nn.Module):
    """torchvision's `ShiftedWindowAttention` / `ShiftedWindowAttentionV2` (eval mode) as explicit nodes:
    (B, H, W, C) -> (B, H, W, C). The relative position bias (and V2's logit scale) are computed once, as
    buffers: in eval mode they do not depend on the input."""

    relative_position_bias: Tensor
    logit_scale: Tensor

    def __init__(self, attention: ShiftedWindowAttention) -> None:
        super().__init__()
        self.window, self.shift = list(attention.window_size), list(attention.shift_size)
        self.heads = attention.num_heads
        self.cosine = isinstance(attention, ShiftedWindowAttentionV2)
        bias = attention.qkv.bias
        if self.cosine and bias is not None:  # V2 gives the keys no bias
            length = bias.numel() // 3
            bias = torch.cat([bias[:length], torch.zeros_like(bias[length:2 * length]), bias[2 * length:]])
            bias.requires_grad_(attention.qkv.bias.requires_grad)  # type: ignore[union-attr]
        self.qkv = _linear(attention.qkv.weight, bias)
        self.proj = _linear(attention.proj.weight, attention.proj.bias)
        with torch.no_grad():
            self.register_buffer("relative_position_bias", attention.get_relative_position_bias().detach().clone())
            scale = (torch.clamp(attention.logit_scale, max=math.log(100.0)).exp() if self.cosine
                     else torch.tensor((attention.qkv.in_features // self.heads) ** -0.5))
            self.register_buffer("logit_scale", scale.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        windows = window_partition(x, self.window, self.shift)  # (B * windows, N, C)
        batch, (count, size, channels) = x.shape[0], windows.shape
        # (B, windows, heads, N, head_dim) each, so that the bias and mask (windows, heads, N, N) add as one constant
        qkv = self.qkv(windows).reshape(batch, count // batch, size, 3, self.heads, -1).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.cosine:
            scores = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.logit_scale
        else:
            scores = (q * self.logit_scale) @ k.transpose(-2, -1)
        scores = scores + (self.relative_position_bias + window_mask(x.shape, self.window, self.shift,
                                                                     self.relative_position_bias))
        out = (F.softmax(scores, dim=-1) @ v).transpose(2, 3)  # (B, windows, N, heads, head_dim)
        out = self.proj(out.reshape(count, size, channels))
        return window_reverse(out, x.shape, self.window, self.shift)


def explicit_attention(model: nn.Module) -> bool:
    """Replace every `nn.MultiheadAttention` and Swin attention of `model` (in place, eval mode) by its explicit
    form, and switch attention modules that offer an explicit path behind a `fused_attn` flag (timm's) to it;
    True when anything changed."""
    replaced = False
    for name, module in list(model.named_modules()):
        if getattr(module, "fused_attn", None) is True:
            module.fused_attn = False  # type: ignore[assignment]
            replaced = True
            continue
        if isinstance(module, nn.MultiheadAttention):
            new: nn.Module = ExplicitMultiheadAttention(module, name)
        elif isinstance(module, ShiftedWindowAttention):
            new = ExplicitWindowAttention(module)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        replaced = True
    return replaced
