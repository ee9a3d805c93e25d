"""Confidence intervals: Clopper-Pearson (exact binomial) for error rates at a fixed threshold, and a seeded
percentile bootstrap (over subjects when known, else over images) for figures read off the score curve.

Pure functions over numbers and arrays; no scipy: the beta quantile comes from the regularised incomplete beta
function (its continued fraction, evaluated with the modified Lentz method) and bisection.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

_TINY = 1e-300
_CF_EPS = 1e-15
_CF_MAX_TERMS = 20_000
MIN_ESTIMABLE_SHARE = 0.9  # a bootstrap interval needs the figure in at least this share of the resamples


@dataclass(frozen=True)
class Interval:
    """A two-sided confidence interval [low, high] (fractions) at `confidence`, from `method`."""

    low: float
    high: float
    confidence: float
    method: str  # "clopper-pearson" or "bootstrap over subjects" / "bootstrap over images"

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz); converges fast for x < (a + 1) / (a + b + 2)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _CF_MAX_TERMS):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + aa / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _CF_EPS:
            return h
    raise ArithmeticError(f"the incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = P(X <= x) for X ~ Beta(a, b), a, b > 0."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def beta_quantile(p: float, a: float, b: float) -> float:
    """The x with I_x(a, b) = p, by bisection to float resolution (I_x is increasing in x)."""
    low, high = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if mid in (low, high):
            break
        if regularized_beta(a, b, mid) < p:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> Interval | None:
    """Exact binomial interval for k errors out of n trials: the beta quantiles alpha/2 of Beta(k, n - k + 1)
    and 1 - alpha/2 of Beta(k + 1, n - k), with 0 for k = 0 and 1 for k = n. None when n = 0."""
    _check_confidence(confidence)
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"k must lie in [0, n], got k={k}, n={n}")
    alpha = 1.0 - confidence
    low = 0.0 if k == 0 else beta_quantile(alpha / 2.0, k, n - k + 1)
    high = 1.0 if k == n else beta_quantile(1.0 - alpha / 2.0, k + 1, n - k)
    return Interval(low, high, confidence, "clopper-pearson")


def _stratified_draw(labels: npt.NDArray[np.int64], rng: np.random.Generator) -> Callable[[], npt.NDArray[np.intp]]:
    """A function drawing image indices with replacement within each label, each label's count kept."""
    strata = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    return lambda: np.concatenate([stratum[rng.integers(0, stratum.size, stratum.size)] for stratum in strata])


def _cluster_draw(clusters: Sequence[str], rng: np.random.Generator) -> Callable[[], npt.NDArray[np.intp]]:
    """A function drawing as many clusters as there are, with replacement, and returning all their images."""
    _, members = np.unique(np.asarray(clusters, dtype=str), return_inverse=True)
    order = np.argsort(members, kind="stable")  # cluster c is order[offsets[c]:offsets[c] + sizes[c]]
    sizes = np.bincount(members)
    offsets = np.cumsum(sizes) - sizes

    def draw() -> npt.NDArray[np.intp]:
        picks = rng.integers(0, sizes.size, size=sizes.size)
        lengths = sizes[picks]
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return order[np.repeat(offsets[picks], lengths) + within]

    return draw


Statistics = Callable[[npt.NDArray[np.int64], npt.NDArray[np.float64]], Mapping[str, float | None]]


def bootstrap_intervals(labels: npt.ArrayLike, scores: npt.ArrayLike, statistics: Statistics, *,
                        clusters: Sequence[str] | None = None, resamples: int = 1000, confidence: float = 0.95,
                        seed: int = 0) -> dict[str, Interval | str]:
    """Percentile bootstrap of every figure `statistics(labels, scores)` returns.

    Resamples draw whole clusters with replacement (a subject with all of its images) when `clusters` (N,)
    names one per image, else single images within each class (so both class counts stay as they are); the same
    seed gives the same intervals. A figure gets an Interval
    when it is estimable in at least MIN_ESTIMABLE_SHARE of the resamples, else the reason as a string.
    """
    _check_confidence(confidence)
    if resamples < 1:
        raise ValueError("resamples must be at least 1")
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    if clusters is not None:
        draw, unit = _cluster_draw(clusters, rng), "subjects"
    else:
        draw, unit = _stratified_draw(y, rng), "images"
    drawn: dict[str, list[float]] = {}
    for _ in range(resamples):
        index = draw()
        for name, value in statistics(y[index], s[index]).items():
            values = drawn.setdefault(name, [])
            if value is not None:
                values.append(value)
    alpha = 1.0 - confidence
    out: dict[str, Interval | str] = {}
    for name, values in drawn.items():
        if len(values) < MIN_ESTIMABLE_SHARE * resamples:
            out[name] = f"estimable in {len(values)} of {resamples} resamples"
        else:
            low, high = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
            out[name] = Interval(float(low), float(high), confidence, f"bootstrap over {unit}")
    return out
