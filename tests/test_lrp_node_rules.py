"""The node rules of transformers and normalisation layers against dense float64 hand computations.

Each test builds a tiny layer or model in float64, lets the engine compute a rule's relevance (through the op
kind's `apply` of the registry, an autograd function of `node_rules` called directly, or the public
`Explainer`), and compares it with the rule's formula written out densely: explicit Jacobian matrices per token
or group, loops over small tensors, einsum. See /work/shared/reference/lrp-rules.md, "Transformers and
normalisation layers".
"""

from __future__ import annotations

import gc
import itertools
import math
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

import smadlrp.lrp as lrp
from smadlrp.core.errors import UsageError
from smadlrp.lrp.attention import ExplicitMultiheadAttention, ExplicitWindowAttention
from smadlrp.lrp.node_rules import ProductFunction, Recomputed, SoftmaxFunction, SumFunction
from smadlrp.lrp.op_kinds import OP_KINDS, NodeCall, NodePlan
from smadlrp.lrp.tracing import LeafModule
from smadlrp.lrp.window_ops import window_partition, window_reverse

F64 = torch.float64
TOL = 1e-10


def close(actual: Tensor, expected: Tensor, tol: float = TOL) -> None:
    """Equal to `tol` (absolute and relative), same shape."""
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def apply_kind(kind: str, plain: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any] | None = None,
               carrying: tuple[int, ...] = (0,), attention: str = "cp") -> Tensor:
    """The node `plain(*args, **kwargs)` computed by the registry's op kind `kind` with its rule attached, as
    in a relevance pass of LRP-0 with `attention`."""
    composite = lrp.build_composite("zero", {"attention": attention})
    call = NodeCall(plain, args, kwargs or {}, NodePlan(kind, "node", "op", carrying), composite, F64)
    apply = OP_KINDS[kind].apply
    assert apply is not None
    return apply(call)


def relevance_at(y: Tensor, inputs: list[Tensor], r: Tensor) -> list[Tensor]:
    """The relevance the rules attached to `y` give `inputs` for the relevance `r` at `y`."""
    return list(torch.autograd.grad(y, inputs, r))


def leaf(*shape: int, scale: float = 1.0) -> Tensor:
    """A float64 random leaf requiring grad."""
    return (scale * torch.randn(*shape, dtype=F64)).requires_grad_(True)


def norm_reference(x: Tensor, y: Tensor, r: Tensor, scale: Tensor, centred: bool) -> Tensor:
    """`R_x = x * J^T (R / y)` for one normalised vector, J = diag(scale) (I - 1/n) (without the centring when
    not `centred`), written as an explicit n x n matrix."""
    n = x.numel()
    centring = torch.eye(n, dtype=F64) - (1.0 / n if centred else 0.0)
    jacobian = torch.diag(scale) @ centring
    return x * (jacobian.T @ (r / y))


# --- 1. normalisation layers: sigma constant, the z-rule on the centring -----------------------------------------


@pytest.mark.parametrize("form", ["module", "function"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_rule_equals_dense_jacobian(form: str, with_bias: bool) -> None:
    """LayerNorm: R_x = x * J^T (R / y) per token with J = diag(w / sigma) (I - 1/D), sigma a constant; with a
    zero bias the rule conserves relevance per token."""
    torch.manual_seed(0)
    batch, tokens, dim = 2, 3, 5
    ln = nn.LayerNorm(dim, eps=1e-5).double()
    with torch.no_grad():
        ln.weight.copy_(torch.randn(dim, dtype=F64))
        ln.bias.copy_(torch.randn(dim, dtype=F64) if with_bias else torch.zeros(dim, dtype=F64))
    x = leaf(batch, tokens, dim)
    if form == "module":
        y = apply_kind("norm", ln, (x,))
    else:
        y = apply_kind("norm", F.layer_norm, (x, (dim,), ln.weight, ln.bias), {"eps": ln.eps})
    close(y, ln(x))
    r = torch.randn(batch, tokens, dim, dtype=F64)
    (r_x,) = relevance_at(y, [x], r)
    expected = torch.empty_like(r_x)
    for b, t in itertools.product(range(batch), range(tokens)):
        v = x[b, t].detach()
        sigma = torch.sqrt(((v - v.sum() / dim) ** 2).sum() / dim + ln.eps)
        expected[b, t] = norm_reference(v, y[b, t].detach(), r[b, t], ln.weight.detach() / sigma, centred=True)
    close(r_x, expected)
    if not with_bias:
        close(r_x.sum(-1), r.sum(-1))


@pytest.mark.parametrize("with_bias", [True, False])
def test_group_norm_rule_equals_dense_jacobian(with_bias: bool) -> None:
    """GroupNorm: R_x = x * J^T (R / y) per sample and group, J = diag(w_c / sigma) (I - 1/n) over the group's
    channels and positions; with a zero bias the rule conserves relevance per group."""
    torch.manual_seed(1)
    batch, channels, groups, height, width = 2, 4, 2, 2, 3
    gn = nn.GroupNorm(groups, channels).double()
    with torch.no_grad():
        gn.weight.copy_(torch.randn(channels, dtype=F64))
        gn.bias.copy_(torch.randn(channels, dtype=F64) if with_bias else torch.zeros(channels, dtype=F64))
    x = leaf(batch, channels, height, width)
    y = apply_kind("norm", gn, (x,))
    close(y, gn(x))
    r = torch.randn_like(y)
    (r_x,) = relevance_at(y, [x], r)
    per_group = channels // groups
    expected = torch.empty_like(r_x)
    for b, g in itertools.product(range(batch), range(groups)):
        cs = slice(g * per_group, (g + 1) * per_group)
        v = x[b, cs].detach().reshape(-1)
        n = v.numel()
        sigma = torch.sqrt(((v - v.sum() / n) ** 2).sum() / n + gn.eps)
        w = gn.weight.detach()[cs].repeat_interleave(height * width)
        out = norm_reference(v, y[b, cs].detach().reshape(-1), r[b, cs].reshape(-1), w / sigma, centred=True)
        expected[b, cs] = out.reshape(per_group, height, width)
    close(r_x, expected)
    if not with_bias:
        close(r_x.reshape(batch, groups, -1).sum(-1), r.reshape(batch, groups, -1).sum(-1))


@pytest.mark.parametrize("form", ["module", "function"])
def test_rms_norm_rule_is_identity(form: str) -> None:
    """RMSNorm (no bias): J = diag(w / rms) is diagonal and J x = y, so the rule is the identity R_x = R_y;
    checked against the dense formula too."""
    torch.manual_seed(2)
    dim = 5
    rms = nn.RMSNorm(dim, eps=1e-6).double()
    with torch.no_grad():
        rms.weight.copy_(torch.randn(dim, dtype=F64))
    x = leaf(2, 3, dim)
    y = apply_kind("norm", rms, (x,)) if form == "module" else apply_kind(
        "norm", F.rms_norm, (x, (dim,), rms.weight, rms.eps))
    close(y, rms(x))
    r = torch.randn_like(y)
    (r_x,) = relevance_at(y, [x], r)
    close(r_x, r)
    for b, t in itertools.product(range(2), range(3)):
        v = x[b, t].detach()
        scale = rms.weight.detach() / torch.sqrt((v * v).sum() / dim + 1e-6)
        close(r_x[b, t], norm_reference(v, y[b, t].detach(), r[b, t], scale, centred=False))


@pytest.mark.parametrize(("p", "dim"), [(2.0, -1), (1.0, 1)])
def test_normalize_rule_is_identity(p: float, dim: int) -> None:
    """`F.normalize` = x / ||x||_p with the norm constant: J = I / ||x||, so R_x = x * J^T (R / y) = R."""
    torch.manual_seed(3)
    x = leaf(2, 3, 4)
    y = apply_kind("norm", F.normalize, (x,), {"p": p, "dim": dim})
    close(y, F.normalize(x, p=p, dim=dim))
    r = torch.randn_like(y)
    (r_x,) = relevance_at(y, [x], r)
    close(r_x, r)
    moved_x, moved_y, moved_r = (t.detach().movedim(dim, -1).reshape(-1, t.shape[dim]) for t in (x, y, r))
    expected = torch.stack([
        norm_reference(v, w, s, torch.full_like(v, 1.0 / float(v.abs().pow(p).sum() ** (1 / p))), centred=False)
        for v, w, s in zip(moved_x, moved_y, moved_r, strict=True)
    ])
    close(r_x.movedim(dim, -1).reshape(-1, x.shape[dim]), expected)


# --- 2. softmax (AttnLRP) -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [-1, 1])
def test_softmax_rule_equals_formula_and_explicit_jacobian(dim: int) -> None:
    """AttnLRP's softmax rule: R_x = x * (R - s sum(R)) along dim, and equally R_x_j = x_j sum_i J_ij R_i / s_i
    with the explicit Jacobian J_ij = s_i (delta_ij - s_j); with CP attention the output is a constant."""
    torch.manual_seed(4)
    x = leaf(2, 3, 4, scale=2.0)
    s = apply_kind("softmax", F.softmax, (x,), {"dim": dim}, attention="attnlrp")
    close(s, torch.softmax(x, dim))
    r = torch.randn_like(s)
    (r_x,) = relevance_at(s, [x], r)
    sd = s.detach()
    close(r_x, x.detach() * (r - sd * r.sum(dim, keepdim=True)))
    rows_x, rows_s, rows_r = (t.detach().movedim(dim, -1).reshape(-1, 4 if dim == -1 else 3) for t in (x, s, r))
    expected = []
    for xv, sv, rv in zip(rows_x, rows_s, rows_r, strict=True):
        n = len(sv)
        jacobian = torch.tensor([[sv[i].item() * (float(i == j) - sv[j].item()) for j in range(n)] for i in range(n)],
                                dtype=F64)
        expected.append(torch.stack([xv[j] * sum(jacobian[i, j] * rv[i] / sv[i] for i in range(n)) for j in range(n)]))
    close(r_x.movedim(dim, -1).reshape(rows_x.shape), torch.stack(expected))
    constant = apply_kind("softmax", F.softmax, (x,), {"dim": dim}, attention="cp")
    assert not constant.requires_grad
    close(constant, torch.softmax(x, dim))


def test_softmax_masked_logit_gets_zero() -> None:
    """A masked logit (-inf) gets exactly 0 relevance, no NaN anywhere; the others follow the formula."""
    torch.manual_seed(5)
    logits = torch.randn(2, 5, dtype=F64)
    logits[0, 1] = logits[1, 4] = -math.inf
    x = logits.requires_grad_(True)
    s = SoftmaxFunction.apply(x, Recomputed(lambda t: torch.softmax(t, -1)), -1)
    assert s[0, 1] == 0 and s[1, 4] == 0
    r = s.detach() * torch.randn(2, 5, dtype=F64)  # relevance arriving at a tensor is s * c: 0 where s is
    (r_x,) = relevance_at(s, [x], r)
    assert not r_x.isnan().any() and r_x.isfinite().all()
    assert r_x[0, 1].item() == 0.0 and r_x[1, 4].item() == 0.0
    finite = x.detach().isfinite()
    expected = torch.where(finite, x.detach(), 0.0) * (r - s.detach() * r.sum(-1, keepdim=True))
    close(r_x[finite], expected[finite])


# --- 3. products of two activations (uniform rule) ----------------------------------------------------------------


@pytest.mark.parametrize("matmul", [False, True], ids=["autograd", "written-out"])
def test_product_rule_matmul_dense(matmul: bool) -> None:
    """z = u @ v: R_u_ik = 1/2 sum_j u_ik v_kj / z_ij R_ij, R_v_kj = 1/2 sum_i u_ik v_kj / z_ij R_ij, and
    R_u + R_v sums to R; through autograd's vector-Jacobian products and through the written-out ones, with v
    broadcast over a batch of two."""
    torch.manual_seed(6)
    u, v = leaf(2, 3, 4), leaf(4, 2)
    z = ProductFunction.apply(u, v, torch.matmul, matmul)
    r = torch.randn(2, 3, 2, dtype=F64)
    r_u, r_v = relevance_at(z, [u, v], r)
    ud, vd, zd = u.detach(), v.detach(), z.detach()
    expected_u, expected_v = torch.zeros(2, 3, 4, dtype=F64), torch.zeros(4, 2, dtype=F64)
    for b, i, k, j in itertools.product(range(2), range(3), range(4), range(2)):
        share = 0.5 * ud[b, i, k] * vd[k, j] / zd[b, i, j] * r[b, i, j]
        expected_u[b, i, k] += share
        expected_v[k, j] += share
    close(r_u, expected_u)
    close(r_v, expected_v)
    close(r_u.sum() + r_v.sum(), r.sum())


def test_product_rule_elementwise_with_broadcast() -> None:
    """z = u * v element-wise (v broadcast over rows): half of R to u, the other half to v, summed over the
    broadcast rows."""
    torch.manual_seed(7)
    u, v = leaf(3, 4), leaf(1, 4)
    z = apply_kind("product", torch.mul, (u, v), carrying=(0, 1))
    close(z, u * v)
    r = torch.randn(3, 4, dtype=F64)
    r_u, r_v = relevance_at(z, [u, v], r)
    expected_u = torch.zeros(3, 4, dtype=F64)
    expected_v = torch.zeros(1, 4, dtype=F64)
    for i, k in itertools.product(range(3), range(4)):
        share = 0.5 * u[i, k].item() * v[0, k].item() / z[i, k].item() * r[i, k].item()
        expected_u[i, k] += share
        expected_v[0, k] += share
    close(r_u, expected_u)
    close(r_v, expected_v)
    close(r_u.sum() + r_v.sum(), r.sum())


def test_product_rule_einsum_through_op_kind() -> None:
    """torch.einsum("bik,bkj->bij", u, v) through the product kind (operands at positions 1 and 2): the uniform
    rule per batch item, conserving."""
    torch.manual_seed(8)
    u, v = leaf(2, 3, 4), leaf(2, 4, 2)
    z = apply_kind("product", torch.einsum, ("bik,bkj->bij", u, v), carrying=(1, 2))
    close(z, u @ v)
    r = torch.randn(2, 3, 2, dtype=F64)
    r_u, r_v = relevance_at(z, [u, v], r)
    contrib = torch.einsum("bik,bkj->bikj", u.detach(), v.detach())  # u_ik v_kj per batch item
    shares = 0.5 * contrib / z.detach()[:, :, None, :] * r[:, :, None, :]
    close(r_u, shares.sum(3))
    close(r_v, shares.sum(1))
    close(r_u.sum() + r_v.sum(), r.sum())


@pytest.mark.parametrize("matmul", [False, True], ids=["autograd", "written-out"])
@pytest.mark.parametrize("constant", ["u", "v"])
def test_product_rule_constant_operand_takes_nothing(constant: str, matmul: bool) -> None:
    """When one operand of u @ v carries no relevance (a constant of the pass, CP-LRP's attention weights), the
    other gets all of it: the factor is 1 instead of 1/2, and the relevance is conserved."""
    torch.manual_seed(9)
    u, v = leaf(3, 4), leaf(4, 2)
    if constant == "u":
        u.requires_grad_(False)
    else:
        v.requires_grad_(False)
    z = ProductFunction.apply(u, v, torch.matmul, matmul)
    r = torch.randn(3, 2, dtype=F64)
    carrier = v if constant == "u" else u
    (r_c,) = relevance_at(z, [carrier], r)
    expected = torch.zeros_like(carrier, requires_grad=False)
    for i, k, j in itertools.product(range(3), range(4), range(2)):
        share = u[i, k].item() * v[k, j].item() / z[i, j].item() * r[i, j].item()
        if constant == "u":
            expected[k, j] += share
        else:
            expected[i, k] += share
    close(r_c, expected)
    close(r_c.sum(), r.sum())


def test_attention_probabilities_are_recomputed_not_kept() -> None:
    """AttnLRP on A = softmax(x), z = A @ v: once A @ v has run, nothing keeps A alive (not the product's rule,
    not the call it came from): the product's backward computes A again from the logits the softmax keeps, and
    the relevance is the rules' (uniform rule on A @ v, then x (R_A - A sum R_A)). A is computed once in the
    backward pass: the product's rule hands it on to the softmax's."""
    torch.manual_seed(10)
    x, v = leaf(2, 4, 4), leaf(2, 4, 3)
    calls = []

    def softmax(t: Tensor, dim: int) -> Tensor:
        calls.append(dim)
        return F.softmax(t, dim)

    a = apply_kind("softmax", softmax, (x,), {"dim": -1}, attention="attnlrp")
    z = apply_kind("product", torch.matmul, (a, v), carrying=(0, 1), attention="attnlrp")
    kept = weakref.ref(a)
    del a
    gc.collect()
    assert kept() is None
    r = z.detach() * torch.randn(2, 4, 3, dtype=F64)
    r_x, r_v = relevance_at(z, [x, v], r)
    a_ref, s = torch.softmax(x.detach(), -1), r / z.detach()
    r_a = 0.5 * a_ref * (s @ v.detach().mT)
    close(r_v, 0.5 * v.detach() * (a_ref.mT @ s))
    close(r_x, x.detach() * (r_a - a_ref * r_a.sum(-1, keepdim=True)))
    assert len(calls) == 2  # the forward pass and one recomputation


# --- 4. sums with a constant term (positional embeddings) ---------------------------------------------------------


@pytest.mark.parametrize("absolute", [False, True])
def test_sum_rule_with_broadcast_term(absolute: bool) -> None:
    """y = a + p with p (1, T, D) broadcast over the batch: the z-rule R_a = a / y R, R_p = sum_b p / y R (or
    with the absolute split |a| / (|a| + |p|) R); the two shares add up to R."""
    torch.manual_seed(10)
    a, p = leaf(2, 3, 4), leaf(1, 3, 4)
    y = SumFunction.apply(a, p, absolute)
    close(y, a + p)
    r = torch.randn(2, 3, 4, dtype=F64)
    r_a, r_p = relevance_at(y, [a, p], r)
    ad, pd = a.detach(), p.detach().expand(2, 3, 4)
    den = ad.abs() + pd.abs() if absolute else ad + pd
    share_a, share_p = (ad.abs(), pd.abs()) if absolute else (ad, pd)
    close(r_a, share_a / den * r)
    close(r_p, (share_p / den * r).sum(0, keepdim=True))
    close(r_a.sum() + r_p.sum(), r.sum())


class PositionalModel(nn.Module):
    """Tokens (B, T, 3) -> Linear to D -> + learned positional embedding (1, T, D) -> mean over tokens -> 2
    logits."""

    def __init__(self, tokens: int, dim: int, bias: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(3, dim, bias=bias)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim))
        self.head = nn.Linear(dim, 2, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head((self.embed(x) + self.pos).mean(1))


@pytest.mark.parametrize("bias", [True, False])
def test_positional_embedding_term_through_api(bias: bool) -> None:
    """Through the public API, a learned positional embedding is a term: `terms["pos"]` = sum(p / y R_y) per
    sample, the input relevance is LRP-0 by hand; with every bias zero, relevance + term = the target logit."""
    torch.manual_seed(11)
    tokens, dim = 3, 4
    model = PositionalModel(tokens, dim, bias).double().eval()
    if bias:
        with torch.no_grad():
            model.embed.bias.normal_()  # type: ignore[union-attr]
            model.head.bias.normal_()  # type: ignore[union-attr]
    x = torch.randn(2, tokens, 3, dtype=F64)
    result = lrp.Explainer(model, "zero").explain(x)
    assert result.relevance.dtype == F64 and set(result.terms) == {"pos"}
    with torch.no_grad():
        w1, w2 = model.embed.weight, model.head.weight
        b1 = model.embed.bias if bias else torch.zeros(dim, dtype=F64)
        b2 = model.head.bias if bias else torch.zeros(2, dtype=F64)
        a = torch.einsum("bti,di->btd", x, w1) + b1  # the embedded tokens
        y = a + model.pos
        h = y.sum(1) / tokens
        logits = torch.einsum("bd,kd->bk", h, w2) + b2
        close(result.logits, logits)
        c = result.target
        z_c = logits[torch.arange(2), c]
        r_h = h * w2[c] / z_c[:, None] * z_c[:, None]  # LRP-0 on the head, starting from the logit
        r_y = (y / tokens) / h[:, None, :] * r_h[:, None, :]  # the mean's z-rule
        r_pos = model.pos / y * r_y
        r_a = a / y * r_y
        r_x = torch.einsum("bti,di,btd->bti", x, w1, r_a / a)  # LRP-0 on the embedding
    close(result.terms["pos"], r_pos.sum((1, 2)))
    close(result.relevance, r_x)
    if not bias:
        close(result.total(), z_c)
        close(result.relevance.sum((1, 2)) + result.terms["pos"], z_c)


# --- 5. attention written out as explicit nodes -------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cross", [False, True])
def test_explicit_multihead_attention_equals_original(batch_first: bool, bias: bool, cross: bool) -> None:
    """`ExplicitMultiheadAttention` computes what `nn.MultiheadAttention` (eval) does, self- and cross-attention,
    batch first or not, with and without in-projection bias."""
    torch.manual_seed(12)
    mha = nn.MultiheadAttention(8, 2, bias=bias, batch_first=batch_first).double().eval()
    if bias:
        with torch.no_grad():
            mha.in_proj_bias.normal_()  # type: ignore[union-attr]
            mha.out_proj.bias.normal_()  # type: ignore[union-attr]
    explicit = ExplicitMultiheadAttention(mha, "attn").eval()
    shape_q, shape_k = ((2, 3, 8), (2, 5, 8)) if batch_first else ((3, 2, 8), (5, 2, 8))
    q = torch.randn(*shape_q, dtype=F64)
    k = torch.randn(*shape_k, dtype=F64) if cross else q
    v = torch.randn(*shape_k, dtype=F64) if cross else q
    with torch.no_grad():
        expected, _ = mha(q, k, v, need_weights=False)
        actual, weights = explicit(q, k, v)
    assert weights is None
    close(actual, expected)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("shift", [[0, 0], [2, 2]])
@pytest.mark.parametrize("size", [(6, 7), (9, 5)])
def test_explicit_window_attention_equals_torchvision(version: int, shift: list[int], size: tuple[int, int]) -> None:
    """`ExplicitWindowAttention` computes what torchvision's `ShiftedWindowAttention(V2)` does on inputs larger
    than a window whose sides are not multiples of it (padding, shift and mask really used)."""
    torch.manual_seed(13)
    cls = ShiftedWindowAttention if version == 1 else ShiftedWindowAttentionV2
    attention = cls(8, [4, 4], shift, 2).double().eval()
    with torch.no_grad():
        attention.qkv.bias.normal_()  # type: ignore[union-attr]
        attention.proj.bias.normal_()  # type: ignore[union-attr]
        if version == 1:
            attention.relative_position_bias_table.normal_()
    explicit = ExplicitWindowAttention(attention).eval()
    x = torch.randn(2, *size, 8, dtype=F64)
    with torch.no_grad():
        close(explicit(x), attention(x))


class MultiheadModel(nn.Module):
    """Tokens (B, 4, 3) -> Linear -> + positional embedding -> LayerNorm -> nn.MultiheadAttention, residual ->
    mean over tokens -> 2 logits (the attention canonized into explicit nodes by the engine)."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed, self.pos, self.norm = nn.Linear(3, 8), nn.Parameter(torch.randn(1, 4, 8)), nn.LayerNorm(8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.pos
        q = self.norm(h) if self.batch_first else self.norm(h).transpose(0, 1)
        a, _ = self.attention(q, q, q, need_weights=False)
        return self.head((h + (a if self.batch_first else a.transpose(0, 1))).mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
def test_canonized_multihead_attention_conserves(batch_first: bool) -> None:
    """End to end through the canonization: a model with nn.MultiheadAttention, every bias zero, CP attention
    and LRP-0: the logits are the model's, and relevance + positional term = the target logit."""
    torch.manual_seed(17)
    model = MultiheadModel(batch_first).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    x = torch.randn(2, 4, 3, dtype=F64)
    result = lrp.Explainer(model, "zero", attention="cp").explain(x)
    with torch.no_grad():
        close(result.logits, model(x))
    assert set(result.terms) == {"pos"}
    close(result.total(), result.logits[torch.arange(2), result.target])


@pytest.mark.parametrize("shift", [[0, 0], [2, 2], [1, 3]])
@pytest.mark.parametrize("size", [(4, 4), (6, 7), (9, 5), (3, 2)])
def test_window_reverse_inverts_partition(shift: list[int], size: tuple[int, int]) -> None:
    """window_reverse(window_partition(x)) == x, whatever the padding and shift; each window has 4 x 4 rows."""
    torch.manual_seed(14)
    x = torch.randn(2, *size, 3, dtype=F64)
    windows = window_partition(x, [4, 4], shift)
    assert windows.shape[1:] == (16, 3)
    assert torch.equal(window_reverse(windows, x.shape, [4, 4], shift), x)


# --- 6. a small attention block end to end ------------------------------------------------------------------------


class AttentionBlock(nn.Module):
    """A pre-norm transformer block on (B, T, D) tokens: positional embedding, LayerNorm, explicit softmax
    attention with 2 heads, residual, LayerNorm, GELU MLP, residual, LayerNorm, mean over tokens, 2 logits.
    `linearised=True` computes the same value with every sigma, GELU gain and attention probability detached
    (the network LRP-0 with CP attention must equal gradient x input of)."""

    def __init__(self, tokens: int = 4, dim: int = 6, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.pos = nn.Parameter(torch.randn(1, tokens, dim))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.act = nn.GELU()
        self.head = nn.Linear(dim, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.compute(x, self.pos, linearised=False)

    def compute(self, x: Tensor, pos: Tensor, linearised: bool) -> Tensor:
        """The block's logits, with `pos` as the positional embedding."""
        x = x + pos
        attention = self.attention(self.norm(self.norm1, x, linearised), linearised)
        x = x + self.proj(attention)
        hidden = self.fc1(self.norm(self.norm2, x, linearised))
        if linearised:
            gain = torch.where(hidden == 0, 0.0, F.gelu(hidden) / torch.where(hidden == 0, 1.0, hidden))
            hidden = hidden * gain.detach()
        else:
            hidden = self.act(hidden)
        x = x + self.fc2(hidden)
        return self.head(self.norm(self.norm3, x, linearised).mean(1))

    def attention(self, h: Tensor, linearised: bool) -> Tensor:
        batch, tokens = h.shape[0], h.shape[1]
        q, k, v = (f(h).reshape(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
                   for f in (self.q, self.k, self.v))
        scores = (q * (1.0 / math.sqrt(self.head_dim))) @ k.transpose(-2, -1)
        weights = torch.softmax(scores, -1).detach() if linearised else F.softmax(scores, dim=-1)
        out = (weights @ v).transpose(1, 2)
        return out.reshape(batch, tokens, self.heads * self.head_dim)

    @staticmethod
    def norm(layer: nn.LayerNorm, x: Tensor, linearised: bool) -> Tensor:
        if not linearised:
            return layer(x)  # type: ignore[no-any-return]
        centred = x - x.mean(-1, keepdim=True)
        sigma = torch.sqrt((centred * centred).mean(-1, keepdim=True) + layer.eps).detach()
        return centred / sigma * layer.weight + layer.bias


def _block(zero_bias: bool) -> AttentionBlock:
    torch.manual_seed(15)
    model = AttentionBlock().double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_() if zero_bias else p.normal_(0.0, 0.5)
            elif name.endswith("weight") and "norm" in name:
                p.normal_(1.0, 0.3)
    return model


@pytest.mark.parametrize("zero_bias", [True, False])
def test_attention_block_cp_equals_linearised_gradient(zero_bias: bool) -> None:
    """A transformer block with CP attention and LRP-0: the input relevance and the positional term equal
    gradient x input of the network linearised at the forward pass (sigma, GELU gain and attention
    probabilities frozen); with every bias zero, relevance + term = the target logit."""
    model = _block(zero_bias)
    x = torch.randn(2, 4, 6, dtype=F64)
    result = lrp.Explainer(model, "zero", attention="cp").explain(x)
    assert set(result.terms) == {"pos"}
    leaf_x = x.clone().requires_grad_(True)
    leaf_pos = model.pos.detach().expand(2, -1, -1).clone().requires_grad_(True)
    logits = model.compute(leaf_x, leaf_pos, linearised=True)
    close(result.logits, logits.detach())
    chosen = logits[torch.arange(2), result.target]
    grad_x, grad_pos = torch.autograd.grad(chosen.sum(), [leaf_x, leaf_pos])
    close(result.relevance, grad_x * x)
    close(result.terms["pos"], (grad_pos * leaf_pos.detach()).sum((1, 2)))
    if zero_bias:
        close(result.relevance.sum((1, 2)) + result.terms["pos"], chosen.detach())


def test_attention_block_attnlrp_absorbed_share_is_finite() -> None:
    """With AttnLRP (softmax rule, uniform rule on q k^T and A v) and every bias zero, the softmax's bias term
    absorbs a share of the logit: measured, finite, and the relevance itself finite."""
    model = _block(zero_bias=True)
    x = torch.randn(2, 4, 6, dtype=F64)
    result = lrp.Explainer(model, "zero", attention="attnlrp").explain(x)
    assert result.relevance.isfinite().all()
    chosen = result.logits[torch.arange(2), result.target]
    absorbed = 1.0 - result.total() / chosen
    print(f"AttnLRP: share of the logit absorbed per sample: {absorbed.tolist()}")
    assert all(math.isfinite(share) for share in absorbed.tolist())
    cp = lrp.Explainer(model, "zero", attention="cp").explain(x)
    assert not torch.allclose(result.relevance, cp.relevance)  # the softmax rule really runs


# --- 7. a user's op kind ------------------------------------------------------------------------------------------


class MyAct(nn.Module):
    """A custom element-wise activation, x * tanh(softplus(x)), defined outside torch.nn."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.tanh(F.softplus(x))


class LeafAct(LeafModule, MyAct):
    """The same activation, marked as a leaf of the engine's trace."""


class ConvAct(nn.Module):
    """Conv2d -> activation -> global average pool -> Linear to 2 logits."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.act = act
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


def conv_act_reference(model: ConvAct, x: Tensor, target: Tensor) -> Tensor:
    """LRP-0 of `model` with the identity rule on its activation, by hand: the conv as an explicit matrix."""
    with torch.no_grad():
        batch, n_in = len(x), x[0].numel()
        basis = torch.eye(n_in, dtype=F64).view(n_in, *x.shape[1:])
        matrix = F.conv2d(basis, model.conv.weight).flatten(1).T  # (n_out, n_in)
        z = x.flatten(1) @ matrix.T + model.conv.bias.repeat_interleave(matrix.shape[0] // 2)  # type: ignore[union-attr]
        act = z * torch.tanh(F.softplus(z))
        positions = matrix.shape[0] // 2
        h = act.view(batch, 2, positions).mean(2)
        logits = h @ model.fc.weight.T + model.fc.bias
        rows = torch.arange(batch)
        z_c = logits[rows, target]
        r_h = h * model.fc.weight[target] / z_c[:, None] * z_c[:, None]
        r_act = (act.view(batch, 2, positions) / positions / h[:, :, None] * r_h[:, :, None]).flatten(1)
        r_z = r_act  # the identity rule
        return torch.einsum("bi,ji,bj->bi", x.flatten(1), matrix, r_z / z).view(x.shape)


def _refused_then_explained(model: ConvAct, x: Tensor, node: str) -> None:
    with pytest.raises(UsageError) as refused:
        lrp.explain(model, x, "zero")
    message = str(refused.value)
    assert "\n" not in message and node in message
    lrp.register_op(lrp.OpKind("my_act", "identity: R_x = R_y", modules=(MyAct,), apply=lrp.pass_through))
    try:
        result = lrp.Explainer(model, "zero").explain(x)
    finally:
        lrp.unregister_op("my_act")
    assert "my_act" not in OP_KINDS
    close(result.relevance, conv_act_reference(model, x, result.target))


def test_register_op_for_a_leaf_module() -> None:
    """A custom activation that is a leaf of the trace: refused (one line naming the node) before its op kind
    is registered, explained with the identity rule after, matching LRP-0 by hand; unregistered afterwards."""
    torch.manual_seed(16)
    model = ConvAct(LeafAct()).double().eval()
    _refused_then_explained(model, torch.randn(2, 1, 5, 5, dtype=F64), "act")


def test_register_op_for_a_plain_user_module() -> None:
    """As above for a plain nn.Module subclass, as the op_kinds docstring shows: `register_op` with
    `modules=(MyAct,)` must make it explainable."""
    torch.manual_seed(16)
    model = ConvAct(MyAct()).double().eval()
    _refused_then_explained(model, torch.randn(2, 1, 5, 5, dtype=F64), "act")


# --- 8. signals handed on between rules ---------------------------------------------------------------------------


def test_signal_is_refused_after_an_in_place_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """LayerNorm -> in-place ReLU -> Linear: the ReLU overwrites the norm's output y, so the Linear's signal is one
    of relu(y), and the norm must divide by y instead of taking it: the relevance is that of no signals at all."""
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(inplace=True), nn.Linear(6, 3)).double().eval()
    x = torch.randn(5, 4, dtype=F64)
    with_signals = lrp.explain(model, x, "epsilon")
    for module in ("layers", "node_rules"):
        monkeypatch.setattr(f"smadlrp.lrp.{module}.slot_of", lambda t: None)
    close(with_signals, lrp.explain(model, x, "epsilon"))


class ProductRead(nn.Module):
    """`z = a(x) @ b(x)^T`, read by a Linear after a transposition and a flattening (attention's `A @ v` before
    its output projection), or, with `relu`, after an in-place ReLU on the flattened copy."""

    def __init__(self, relu: bool) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 5), nn.Linear(4, 5), nn.Linear(9, 2)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        z = torch.matmul(self.a(x), self.b(x).transpose(1, 2))  # (B, 3, 3)
        flat = z.transpose(1, 2).flatten(1)
        return self.out(flat.relu_() if self.relu else flat)


@pytest.mark.parametrize("relu", [False, True])
def test_signal_through_a_rearrangement(relu: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Linear reads the product's output through a transposition and a copy, so autograd hands the product a
    view of the relevance the Linear offered: the product takes the same view of the signal, and the relevance is
    that of dividing (float64). After an in-place ReLU on the copy, nothing is taken."""
    torch.manual_seed(13)
    model, x = ProductRead(relu).double().eval(), torch.randn(6, 3, 4, dtype=F64)
    outcomes: list[bool] = []
    take = lrp.signals.SignalSlot.take

    def counting(slot: lrp.signals.SignalSlot, relevance: Tensor) -> Tensor | None:
        signal = take(slot, relevance)
        outcomes.append(signal is not None)
        return signal

    monkeypatch.setattr(lrp.signals.SignalSlot, "take", counting)
    with_signals = lrp.explain(model, x, "epsilon")
    assert outcomes == [not relu]
    for module in ("layers", "node_rules"):
        monkeypatch.setattr(f"smadlrp.lrp.{module}.slot_of", lambda t: None)
    close(with_signals, lrp.explain(model, x, "epsilon"), 1e-12)
