"""Synthetic data set: generation time, per-image cost, and the no-global-shortcut check at full size.

Usage:
    python benchmarks/bench_synth.py                     # default set into a temporary folder
    python benchmarks/bench_synth.py --identities 300 --out /tmp/synth   # keeps the set in /tmp/synth

Prints the wall time and images/s of `generate_dataset`, the CPU time all its processes used (on a shared
machine, CPU time / 2 is what two idle cores would take), the single-process cost of one bona fide image
and of one morph (measured side by side in this process), and the ROC AUC of a logistic regression trained
on the train split's per-image global statistics and scored on the test split (should stay <= 0.65).
"""

from __future__ import annotations

import argparse
import csv
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from smadlrp.data.synthetic import generator as synthetic


def per_image_cost(config: synthetic.SynthConfig, count: int) -> dict[str, float]:
    """Milliseconds per finished image in one process, no file writing, as `generate_dataset` makes them:
    a bona fide image includes drawing its capture; a morph starts from its contributors' captures."""
    plans = synthetic.plan_samples(config)
    bona = [p for p in plans if p.label == "bonafide"][:count]
    morphs = [p for p in plans if p.label == "morph"][:count]
    renders = [tuple(synthetic.contributor(config, *c) for c in p.captures) for p in morphs]
    start = time.perf_counter()
    for plan in bona:
        synthetic.render_sample(config, plan)
    middle = time.perf_counter()
    for plan, pair in zip(morphs, renders, strict=True):
        synthetic.render_sample(config, plan, pair)
    end = time.perf_counter()
    return {"bonafide": 1000 * (middle - start) / len(bona), "morph": 1000 * (end - middle) / len(morphs)}


def shortcut_auc(root: Path) -> tuple[float, dict[str, float], int]:
    """Test ROC AUC of a logistic regression on global statistics (fit on train), single-feature AUCs and
    the test split's size."""
    with (root / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] in ("train", "test")]
    features: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    labels: dict[str, list[int]] = {"train": [], "test": []}
    for row in rows:
        pixels = np.asarray(Image.open(root / row["path"]).convert("RGB"))
        features[row["split"]].append(synthetic.global_statistics(pixels))
        labels[row["split"]].append(int(row["label"] == "morph"))
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(np.array(features["train"]), labels["train"])
    test = np.array(features["test"])
    auc = float(roc_auc_score(labels["test"], model.predict_proba(test)[:, 1]))
    single = {}
    for i, name in enumerate(synthetic.GLOBAL_STATISTICS):
        a = float(roc_auc_score(labels["test"], test[:, i]))
        single[name] = max(a, 1 - a)
    return auc, single, len(labels["test"])


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=synthetic.SynthConfig.identities)
    parser.add_argument("--size", type=int, default=synthetic.SynthConfig.image_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder to write and keep (default: a temporary folder, removed afterwards)")
    args = parser.parse_args()
    config = synthetic.SynthConfig(identities=args.identities, image_size=args.size, seed=args.seed)
    temporary = Path(tempfile.mkdtemp(prefix="bench-synth-"))
    out = args.out or temporary / "set"
    try:
        cpu = cpu_seconds()
        summary = synthetic.generate_dataset(out, config, overwrite=True, workers=args.workers)
        cpu = cpu_seconds() - cpu
        print(f"generate_dataset: {summary.total} images in {summary.seconds:.1f} s "
              f"({summary.total / summary.seconds:.1f} images/s); CPU time {cpu:.1f} s "
              f"(two idle cores: about {cpu / 2:.1f} s)")
        for split in synthetic.SPLITS:
            morphs = ", ".join(f"{t} {n}" for t, n in summary.morph_counts[split].items())
            print(f"  {split:5s}: {summary.counts[split]['bonafide']} bona fide, "
                  f"{summary.counts[split]['morph']} morphs ({morphs})")
        cost = per_image_cost(config, 40)
        print(f"one image, one process: bona fide {cost['bonafide']:.1f} ms, morph {cost['morph']:.1f} ms "
              f"(morph / bona fide = {cost['morph'] / cost['bonafide']:.2f})")
        auc, single, n_test = shortcut_auc(out)
        verdict = "ok" if auc <= 0.65 else "TOO HIGH"
        print(f"global-statistics logistic regression, test ROC AUC = {auc:.3f} on {n_test} images "
              f"(limit 0.65: {verdict})")
        print("  single features: " + ", ".join(f"{k} {v:.3f}" for k, v in single.items()))
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


if __name__ == "__main__":
    main()
