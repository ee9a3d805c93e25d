"""S-MAD error rates over score arrays: confusion matrix, APCER/BPCER, D-EER, operating points, AUC, DET points.

Convention (ISO/IEC 30107-3 vocabulary): the attack class is *morph* = label 1 = positive, bona fide =
label 0. A score is s = P(morph) and an image is called a morph when s >= t. Rates are fractions in [0, 1].
A value that the data cannot support is `None` together with a one-line reason, never a number.
Pure functions over 1-D numpy arrays: no torch, no printing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from smadlrp.core.errors import SmadlrpError, UsageError

MORPH = 1
BONAFIDE = 0

_ROUNDING = 1e-9  # absorbs float error in alpha * N (0.29 * 100 = 28.999999999999996)

FloatArray = npt.NDArray[np.float64]


def as_arrays(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[npt.NDArray[np.int64], FloatArray]:
    """Validate and convert: labels (N,) in {0, 1}, scores (N,) finite floats."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"labels and scores must be 1-D arrays of one length, got {y.shape} and {s.shape}")
    if y.size and not np.isin(y, (BONAFIDE, MORPH)).all():
        raise ValueError("labels must be 0 (bona fide) or 1 (morph)")
    if not np.isfinite(s).all():
        raise SmadlrpError("scores contain NaN or infinity: the model output cannot be evaluated")
    return y.astype(np.int64), s


def class_scores(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Sorted morph scores (Nm,) and sorted bona fide scores (Nb,)."""
    y, s = as_arrays(labels, scores)
    return np.sort(s[y == MORPH]), np.sort(s[y == BONAFIDE])


def check_threshold(threshold: float) -> float:
    """The threshold as a float; ValueError for NaN."""
    if math.isnan(threshold):
        raise ValueError("threshold must not be NaN")
    return float(threshold)


def _rates(morph_sorted: FloatArray, bona_sorted: FloatArray, thresholds: FloatArray) -> tuple[FloatArray, FloatArray]:
    """APCER(t) and BPCER(t) for each threshold; both classes must be non-empty. Shapes (T,), (T,)."""
    missed = np.searchsorted(morph_sorted, thresholds, side="left")
    below = np.searchsorted(bona_sorted, thresholds, side="left")
    return missed / morph_sorted.size, (bona_sorted.size - below) / bona_sorted.size


def missing_class(n_morph: int, n_bonafide: int) -> str | None:
    """A reason when a class is absent, else None."""
    if n_morph == 0 and n_bonafide == 0:
        return "the split is empty"
    if n_morph == 0:
        return "the split has no morphs"
    if n_bonafide == 0:
        return "the split has no bona fide images"
    return None


@dataclass(frozen=True)
class ConfusionMatrix:
    """Counts at one threshold with morph as the positive class.

    tp: morph called morph; tn: bona fide called bona fide; fp: bona fide called morph (BPCER);
    fn: morph called bona fide (APCER).
    """

    tp: int
    tn: int
    fp: int
    fn: int

    @classmethod
    def from_scores(cls, labels: npt.ArrayLike, scores: npt.ArrayLike, threshold: float) -> ConfusionMatrix:
        """Call an image a morph when its score >= threshold and count the four outcomes."""
        y, s = as_arrays(labels, scores)
        called_morph = s >= check_threshold(threshold)
        is_morph = y == MORPH
        return cls(
            tp=int(np.sum(is_morph & called_morph)),
            tn=int(np.sum(~is_morph & ~called_morph)),
            fp=int(np.sum(~is_morph & called_morph)),
            fn=int(np.sum(is_morph & ~called_morph)),
        )

    @property
    def n_morph(self) -> int:
        return self.tp + self.fn

    @property
    def n_bonafide(self) -> int:
        return self.tn + self.fp

    @property
    def total(self) -> int:
        return self.n_morph + self.n_bonafide

    @property
    def apcer(self) -> float | None:
        """FN / (TP + FN): share of morphs accepted as bona fide; None without morphs."""
        return self.fn / self.n_morph if self.n_morph else None

    @property
    def bpcer(self) -> float | None:
        """FP / (TN + FP): share of bona fide images called morphs; None without bona fide images."""
        return self.fp / self.n_bonafide if self.n_bonafide else None

    @property
    def accuracy(self) -> float | None:
        """(TP + TN) / total; None for an empty split."""
        return (self.tp + self.tn) / self.total if self.total else None


def apcer(labels: npt.ArrayLike, scores: npt.ArrayLike, t: float) -> float | None:
    """Share of morphs with score < t; None when there are no morphs."""
    return ConfusionMatrix.from_scores(labels, scores, t).apcer


def bpcer(labels: npt.ArrayLike, scores: npt.ArrayLike, t: float) -> float | None:
    """Share of bona fide images with score >= t; None when there are none."""
    return ConfusionMatrix.from_scores(labels, scores, t).bpcer


@dataclass(frozen=True)
class EER:
    """Detection equal error rate: `value` (fraction) at `threshold`, or None with `reason`."""

    value: float | None
    threshold: float | None
    reason: str | None = None

    @property
    def estimable(self) -> bool:
        return self.value is not None


def d_eer(labels: npt.ArrayLike, scores: npt.ArrayLike) -> EER:
    """D-EER: the rate where APCER(t) = BPCER(t).

    t sweeps the unique scores plus one point just above the largest (APCER 1, BPCER 0). APCER - BPCER is
    non-decreasing in t and starts at -1, so it changes sign exactly once. At the first t where it is >= 0:
    if it is 0 there, that t and its rate are returned; otherwise the two operating points on either side
    are joined by a straight line (rates and threshold interpolated with one weight) and its crossing is
    returned. Ties make the curve jump, so no threshold may reach the interpolated rate exactly. A perfect
    detector gives 0 (threshold = lowest morph score), one scoring every image alike 0.5, and an inverted one
    (every morph below every bona fide image) 1.
    """
    return d_eer_sorted(*class_scores(labels, scores))


def d_eer_sorted(morph: FloatArray, bona: FloatArray) -> EER:
    """`d_eer` on sorted morph (Nm,) and bona fide (Nb,) scores."""
    reason = missing_class(morph.size, bona.size)
    if reason is not None:
        return EER(None, None, f"needs both classes: {reason}")
    grid = np.unique(np.concatenate([morph, bona]))
    thresholds = np.append(grid, np.nextafter(grid[-1], np.inf))
    a, b = _rates(morph, bona, thresholds)
    diff = a - b
    i = int(np.argmax(diff >= 0))
    if diff[i] == 0:
        return EER(float(a[i]), float(thresholds[i]))
    w = -diff[i - 1] / (diff[i] - diff[i - 1])
    value = a[i - 1] + w * (a[i] - a[i - 1])
    threshold = thresholds[i - 1] + w * (thresholds[i] - thresholds[i - 1])
    return EER(float(value), float(threshold))


@dataclass(frozen=True)
class OperatingPoint:
    """One rate read at a threshold that holds the other rate at or below a target, without interpolation.

    fixed: the rate held ("apcer" or "bpcer"); target: its limit (fraction); value: the other rate at the
    threshold; reached: the fixed rate actually reached (<= target); required: how many samples of the
    fixed class the target needs (ceil(1 / target)). value/reached/threshold are None when not estimable.
    """

    fixed: str
    target: float
    value: float | None
    reached: float | None
    threshold: float | None
    required: int
    reason: str | None = None

    @property
    def estimable(self) -> bool:
        return self.value is not None


def _check_target(name: str, target: float) -> tuple[int, float]:
    """Validate a target rate in (0, 1]; return the sample count it needs and the target."""
    if not 0.0 < target <= 1.0:
        raise UsageError(f"{name} must be a rate in (0, 1], got {target}")
    return math.ceil(1.0 / target - _ROUNDING), float(target)


def _not_estimable(fixed: str, required: int, n_fixed: int, n_other: int) -> str | None:
    """Why an operating point cannot be read, or None when it can."""
    classes = ("morphs", "bona fide")
    fixed_class, other_class = classes if fixed == "apcer" else classes[::-1]
    if n_fixed < required:
        return f"needs >= {required} {fixed_class}, split has {n_fixed}"
    if n_other == 0:
        return f"needs {other_class}, split has none"
    return None


def bpcer_at_apcer(labels: npt.ArrayLike, scores: npt.ArrayLike, alpha: float) -> OperatingPoint:
    """BPCER at the conservative threshold for APCER <= alpha (BPCER_N with N = 1 / alpha).

    Morph scores sorted m(1) <= ... <= m(N), k = floor(alpha N), t* = m(k+1) or +inf when k = N: the largest
    threshold with at most k morphs below it. Not estimable with fewer than 1/alpha morphs or no bona fide.
    """
    return bpcer_at_apcer_sorted(*class_scores(labels, scores), alpha)


def bpcer_at_apcer_sorted(morph: FloatArray, bona: FloatArray, alpha: float) -> OperatingPoint:
    """`bpcer_at_apcer` on sorted morph (Nm,) and bona fide (Nb,) scores."""
    required, alpha = _check_target("alpha", alpha)
    reason = _not_estimable("apcer", required, morph.size, bona.size)
    if reason is not None:
        return OperatingPoint("apcer", alpha, None, None, None, required, reason)
    k = math.floor(alpha * morph.size + _ROUNDING)
    t = float(morph[k]) if k < morph.size else math.inf
    a, b = _rates(morph, bona, np.array([t]))
    return OperatingPoint("apcer", alpha, float(b[0]), float(a[0]), t, required)


def apcer_at_bpcer(labels: npt.ArrayLike, scores: npt.ArrayLike, beta: float) -> OperatingPoint:
    """APCER at the conservative threshold for BPCER <= beta (NIST's "APCER at BPCER = beta").

    Bona fide scores sorted b(1) >= ... >= b(N), k = floor(beta N), t* = the next float above b(k+1) (so
    that at most k bona fide scores are >= t*), or -inf when k = N. Not estimable with fewer than 1/beta
    bona fide images or no morphs.
    """
    return apcer_at_bpcer_sorted(*class_scores(labels, scores), beta)


def apcer_at_bpcer_sorted(morph: FloatArray, bona: FloatArray, beta: float) -> OperatingPoint:
    """`apcer_at_bpcer` on sorted morph (Nm,) and bona fide (Nb,) scores."""
    required, beta = _check_target("beta", beta)
    reason = _not_estimable("bpcer", required, bona.size, morph.size)
    if reason is not None:
        return OperatingPoint("bpcer", beta, None, None, None, required, reason)
    k = math.floor(beta * bona.size + _ROUNDING)
    t = float(np.nextafter(bona[::-1][k], np.inf)) if k < bona.size else -math.inf
    a, b = _rates(morph, bona, np.array([t]))
    return OperatingPoint("bpcer", beta, float(a[0]), float(b[0]), t, required)


def roc_auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float | None:
    """ROC AUC = P(morph score > bona fide score) + P(tie) / 2; None when a class is missing."""
    return roc_auc_sorted(*class_scores(labels, scores))


def roc_auc_sorted(morph: FloatArray, bona: FloatArray) -> float | None:
    """`roc_auc` on sorted morph (Nm,) and bona fide (Nb,) scores."""
    if morph.size == 0 or bona.size == 0:
        return None
    below = np.searchsorted(bona, morph, side="left")
    at_or_below = np.searchsorted(bona, morph, side="right")
    return float(np.sum(below + at_or_below) / (2.0 * morph.size * bona.size))


def det_points(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """DET curve points (APCER, BPCER), each (T,), at every unique score and just above the largest.

    Ordered by increasing threshold (APCER rising, BPCER falling). SmadlrpError when a class is missing.
    """
    morph, bona = class_scores(labels, scores)
    reason = missing_class(morph.size, bona.size)
    if reason is not None:
        raise SmadlrpError(f"a DET curve needs bona fide and morph scores: {reason}")
    grid = np.unique(np.concatenate([morph, bona]))
    return _rates(morph, bona, np.append(grid, np.nextafter(grid[-1], np.inf)))
