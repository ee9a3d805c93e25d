"""Per-layer relevance tracing: coverage, conservation layer by layer, TorchLRP's enable/collect pair."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

import smadlrp.lrp as lrp
from smadlrp.core.device import num_threads


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with num_threads(1):
        yield


def bias_free_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect", bias=False), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 8, bias=False), nn.ReLU(), nn.Dropout(), nn.Linear(8, 3, bias=False),
    ).eval()  # fmt: skip


EXPECTED = [
    ("0", "Conv2d"), ("1", "FoldedBatchNorm"), ("2", "ReLU"), ("3", "MaxPool2d"), ("4", "Conv2d"), ("5", "ReLU"),
    ("6", "AvgPool2d"), ("7", "Flatten"), ("8", "Linear"), ("9", "ReLU"), ("10", "Dropout"), ("11", "Linear"),
    ("output", "Output"),
]  # fmt: skip


def inputs() -> Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 16, 16)


def test_records_cover_every_layer_and_conserve_relevance() -> None:
    model, x = bias_free_net(), inputs()
    # BatchNorm with zero mean and unit scale keeps the folded network bias-free
    with lrp.trace() as t:
        relevance = lrp.explain(model, x, "zero")
    records = t.records
    assert [(r.name, r.layer_type) for r in records] == EXPECTED
    assert [r.index for r in records] == list(range(len(EXPECTED)))
    logits = model(x).detach()
    start = logits.max(1).values
    for record in records:
        torch.testing.assert_close(record.relevance.flatten(1).sum(1), start, rtol=1e-4, atol=0.0)
    torch.testing.assert_close(records[0].relevance, relevance)
    assert records[-1].relevance.shape == logits.shape
    assert records[8].relevance.shape == (2, 6 * 4 * 4)
    assert not lrp.trace.is_enabled()


def test_records_show_what_epsilon_absorbs() -> None:
    model, x = bias_free_net(), inputs()
    with lrp.trace() as t:
        lrp.explain(model, x, "epsilon", epsilon=1.0)
    sums = {r.name: float(r.relevance.sum()) for r in t.records}
    # epsilon absorbs at the Conv2d/Linear layers only; the other layers pass relevance on unchanged
    assert sums["11"] < sums["output"]
    assert sums["10"] == pytest.approx(sums["9"], rel=1e-5)
    assert sums["3"] == pytest.approx(sums["2"], rel=1e-5)


def test_torchlrp_pair_collects_and_really_disables() -> None:
    model, x = bias_free_net(), inputs()
    lrp_model = lrp.convert(model)
    leaf = x.clone().requires_grad_(True)
    y = lrp_model(leaf, explain=True, rule="zero")
    lrp.trace.enable_and_clean()
    assert lrp.trace.is_enabled()
    y[:, 1].sum().backward()
    collected = lrp.trace.collect_and_disable()
    assert not lrp.trace.is_enabled()
    assert len(collected) == len(EXPECTED)
    assert collected[0].shape == y.shape  # backward order: the output relevance first ...
    assert leaf.grad is not None
    torch.testing.assert_close(collected[-1], leaf.grad)  # ... the input relevance last

    leaf.grad = None  # relevance accumulates in x.grad: reset it between explanations
    y = lrp_model(leaf, explain=True, rule="zero")
    y[:, 1].sum().backward()  # tracing is off: nothing is recorded and nothing breaks
    assert lrp.trace.collect_and_disable() == []
    torch.testing.assert_close(leaf.grad, collected[-1])


def test_trace_context_restores_previous_state() -> None:
    lrp.trace.enable_and_clean()
    with lrp.trace() as inner:
        lrp.explain(bias_free_net(), inputs(), "zero")
    assert len(inner.records) == len(EXPECTED)
    assert lrp.trace.is_enabled()
    assert lrp.trace.collect_and_disable() == []  # the outer trace saw nothing from the inner one
