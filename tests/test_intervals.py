"""Confidence intervals: Clopper-Pearson pinned to scipy's exact binomial interval, a seeded bootstrap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from smadlrp.cli import app
from smadlrp.evaluation.intervals import Interval, bootstrap_intervals, clopper_pearson, regularized_beta
from smadlrp.evaluation.metrics import IntervalOptions, curve_figures, d_eer, summarize

# scipy.stats.binomtest(k, n).proportion_ci(confidence_level=c, method="exact"), computed once (scipy 1.x):
SCIPY_EXACT = [
    (0, 10, 0.95, 0.0, 0.30849710781876294),
    (1, 10, 0.95, 0.0025285785444625728, 0.44501611702819543),
    (5, 10, 0.95, 0.1870860284474045, 0.8129139715525955),
    (10, 10, 0.95, 0.6915028921812371, 1.0),
    (7, 204, 0.95, 0.013905160929502822, 0.06941864069625578),
    (44, 4483, 0.95, 0.00714029194505336, 0.013153815847129269),
    (3, 100, 0.99, 0.0034070701031797593, 0.10548125372507822),
    (17, 25, 0.9, 0.49635843762032755, 0.8296963460265371),
    (1, 1, 0.95, 0.025000000000000022, 1.0),
    (250, 25000, 0.95, 0.008803843781601255, 0.011312025024487391),
]


@pytest.mark.parametrize(("k", "n", "confidence", "low", "high"), SCIPY_EXACT)
def test_clopper_pearson_matches_scipy_exact(k: int, n: int, confidence: float, low: float, high: float) -> None:
    interval = clopper_pearson(k, n, confidence)
    assert interval is not None
    assert interval.low == pytest.approx(low, abs=1e-12) and interval.high == pytest.approx(high, abs=1e-12)
    assert interval.contains(k / n)


def test_regularized_beta_identities_and_edges() -> None:
    for x in (0.0, 0.1, 0.5, 0.93, 1.0):
        assert regularized_beta(1.0, 1.0, x) == pytest.approx(x)  # Beta(1, 1) is uniform
        assert regularized_beta(2.0, 1.0, x) == pytest.approx(x * x)
        assert regularized_beta(3.5, 7.0, x) == pytest.approx(1.0 - regularized_beta(7.0, 3.5, 1.0 - x))
    assert clopper_pearson(0, 0) is None
    with pytest.raises(ValueError, match="confidence"):
        clopper_pearson(1, 2, 1.0)


def _scores(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n // 2)
    return labels, np.clip(rng.normal(0.4 + 0.25 * labels, 0.2), 0.0, 1.0)


def test_bootstrap_is_seeded_reproducible_and_contains_the_estimate() -> None:
    labels, scores = _scores(200)
    first = bootstrap_intervals(labels, scores, curve_figures, resamples=300, seed=7)
    again = bootstrap_intervals(labels, scores, curve_figures, resamples=300, seed=7)
    other = bootstrap_intervals(labels, scores, curve_figures, resamples=300, seed=8)
    assert first == again and first != other
    eer = first["d-eer"]
    assert isinstance(eer, Interval) and eer.method == "bootstrap over images"
    assert eer.contains(d_eer(labels, scores).value)  # type: ignore[arg-type]
    assert eer.high - eer.low < 0.2
    assert isinstance(first["bpcer100"], Interval)  # within-class draws keep the 100 morphs BPCER100 needs
    # over subjects the class counts vary: BPCER100 on exactly 100 morphs fails in about half the resamples
    by_subject = bootstrap_intervals(labels, scores, curve_figures, clusters=[str(i) for i in range(200)],
                                     resamples=300, seed=7)
    note = by_subject["bpcer100"]
    assert isinstance(note, str) and note.startswith("estimable in ") and note.endswith(" of 300 resamples")


def test_bootstrap_over_subjects_draws_whole_subjects() -> None:
    labels, scores = _scores(60)
    clusters = [f"s{i // 3}" for i in range(60)]  # three images per subject
    seen: list[int] = []

    def sizes(y: np.ndarray, s: np.ndarray) -> dict[str, float | None]:
        seen.append(y.size)
        return {"n": float(y.size)}

    result = bootstrap_intervals(labels, scores, sizes, clusters=clusters, resamples=50, seed=0)
    assert all(n % 3 == 0 and n == 60 for n in seen)  # 20 subjects drawn, 3 images each
    assert isinstance(result["n"], Interval) and result["n"].method == "bootstrap over subjects"


def test_summary_intervals_exact_at_the_threshold_bootstrap_on_the_curve() -> None:
    labels, scores = _scores(150)  # 75 morphs: BPCER100 is not estimable, nor is its interval
    summary = summarize(labels, scores, 0.5, threshold_source="fixed", intervals=IntervalOptions(resamples=200))
    cm = summary.confusion
    assert summary.intervals["apcer"] == clopper_pearson(cm.fn, cm.n_morph)
    assert summary.intervals["bpcer"] == clopper_pearson(cm.fp, cm.n_bonafide)
    values = summary.as_dict()
    assert values["apcer_ci"] == [summary.intervals["apcer"].low, summary.intervals["apcer"].high]  # type: ignore[union-attr]
    assert values["bpcer100_ci"] is None and "bpcer100_ci_note" not in values
    assert isinstance(summary.intervals["d-eer"], Interval)
    assert summarize(labels, scores, 0.5, threshold_source="fixed").intervals == {}


def test_evaluate_shows_intervals_in_tables_and_json(tiny_data: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["evaluate", "-c", str(tiny_checkpoint), "--data", str(tiny_data), "--device",
                                      "cpu", "--bootstrap", "200", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "r.json").read_text())["metrics"]
    low, high = metrics["apcer_ci"]
    expected = clopper_pearson(metrics["fn"], metrics["n_morph"])
    assert expected is not None and (low, high) == (expected.low, expected.high)
    text = f"{100 * metrics['apcer']:.2f} % [{100 * low:.1f}, {100 * high:.1f}]"
    assert text in result.output
    assert "95 % confidence intervals: Clopper-Pearson (exact binomial) at the threshold; bootstrap over images for " \
           "the curve figures" in " ".join(result.output.split())
