"""docs/images/perturbations.png: one synthetic face under every perturbation of `smadlrp.data.perturb`.

    python scripts/perturbation_figure.py docs/images/perturbations.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from smadlrp.core.figures import save_figure
from smadlrp.data.perturb import parse_perturbation, sample_rng
from smadlrp.data.synthetic.generator import SynthConfig, plan_samples, render_sample

SPECS = ("jpeg:30", "resize:0.5", "blur:1.5", "noise:0.05", "gamma:1.5", "gamma:0.67", "print-scan")


def main(out: Path) -> None:
    config = SynthConfig()
    plan = next(p for p in plan_samples(config) if p.label == "morph" and p.morph_type == "complete")
    face = Image.fromarray(render_sample(config, plan).image)
    panels = [("clean", face)] + [(spec, parse_perturbation(spec)(face, sample_rng(0, 0))) for spec in SPECS]
    fig = Figure(figsize=(2.0 * 4, 2.25 * 2), layout="constrained")
    for ax, (title, image) in zip(fig.subplots(2, 4).ravel(), panels, strict=True):
        ax.imshow(np.asarray(image), interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
    save_figure(fig, out, dpi=100)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
