"""A grid search over a rule's parameters for compare-rules: one explainer per combination, the most faithful
setting (largest AOPC: the score falls fastest when the most relevant patches are replaced) named in one line.

    --rule gamma-transformer --grid projection_gamma=0,0.05,0.25 --grid dense_gamma=0.05,0.25
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

from smadlrp.core.errors import UsageError
from smadlrp.explain.compare import Comparison
from smadlrp.lrp import Explainer

Build = Callable[[Sequence[str], Mapping[str, float]], dict[str, Explainer]]


def parse_grid(specs: Sequence[str]) -> dict[str, list[float]]:
    """`PARAM=V1,V2,...` specs -> parameter -> values; UsageError (one line) for a malformed spec."""
    grid: dict[str, list[float]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        try:
            parsed = [float(v) for v in values.split(",")] if sep and name else []
        except ValueError:
            parsed = []
        if not parsed or name in grid:
            raise UsageError(f"--grid {spec!r}: write PARAM=V1,V2,... with numbers, each parameter once")
        grid[name] = parsed
    return grid


def setting_name(rule: str, params: Mapping[str, float]) -> str:
    """`gamma-transformer(projection_gamma=0.05,dense_gamma=0.25)`."""
    return f"{rule}({','.join(f'{k}={v:g}' for k, v in params.items())})"


def grid_explainers(rules: Sequence[str], grid: Mapping[str, Sequence[float]], build: Build) -> dict[str, Explainer]:
    """Without a grid, `build(rules, {})`; with one, one explainer per combination of the one rule's parameters,
    named by `setting_name`."""
    if not grid:
        return build(rules, {})
    if len(rules) != 1:
        raise UsageError(f"--grid searches the parameters of one --rule, got {len(rules)}: {', '.join(rules)}")
    (rule,) = rules
    explainers: dict[str, Explainer] = {}
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values, strict=True))
        explainers[setting_name(rule, params)] = build([rule], params)[rule]
    return explainers


def best_setting_line(result: Comparison, names: Sequence[str]) -> str:
    """The grid setting with the largest AOPC, as the `--param` options that choose it."""
    best = max((result.method(name) for name in names), key=lambda m: m.aopc)
    params = best.name[best.name.index("(") + 1:-1].split(",")
    options = " ".join(f"--param {p}" for p in params)
    return f"most faithful setting: {best.name} (AOPC {best.aopc:.4f}); use {options}"
