"""The architecture registry: every entry builds with its head replaced and is explainable by the LRP engine."""

from __future__ import annotations

import pytest
import torch

from smadlrp.detector.models import ARCHITECTURES, get_architecture
from smadlrp.lrp import check_supported


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_architecture_is_explainable(name: str) -> None:
    """Built on the meta device (no memory, no initialisation cost): traced, canonized, a rule at every node."""
    arch = get_architecture(name)
    with torch.device("meta"):
        model = arch.build(3).eval()
    head = [n for n, _ in model.named_parameters() if n.startswith(arch.head)]
    assert head, f"{name}: no parameter under the head prefixes {arch.head}"
    assert all(p.shape[0] == 3 for n, p in model.named_parameters() if n.startswith(arch.head) and n.endswith(".bias"))
    check_supported(model)
