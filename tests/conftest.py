"""Shared fixtures: tiny image folders and tiny checkpoints, generated on the fly (no downloads).

Markers (registered in pyproject.toml): `slow` tests are left out of `make test-quick`; `cuda`, `dlib` and `chromium`
tests are skipped, with the reason in the summary, where that hardware, optional extra or program is missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from smadlrp.core.device import num_threads
from smadlrp.data.loading import IMAGENET_MEAN, IMAGENET_STD
from smadlrp.detector.checkpoint import CheckpointMeta, save_checkpoint
from smadlrp.detector.models import build_model

# The test models are tiny: one thread is as fast and is not slowed down by other processes on a busy machine.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def spare_cores() -> Iterator[None]:
    """Two torch threads for the tests of full-size models when pytest runs alone; one beside other pytest-xdist
    workers (`make test`), where two threads per process on two shared cores run up to ten times slower."""
    with num_threads(1 if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 else 2):
        yield


def hopper_photo() -> Path:
    """Grace Hopper's portrait (public domain, US Navy), as matplotlib ships it."""
    from matplotlib import cbook

    return Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def astronaut_photo() -> Path:
    """scikit-image's astronaut photograph (public domain, NASA), found through its package files without importing
    it; the test is skipped without scikit-image (the dev extra)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-image (dev extra) provides the astronaut photograph")
    return Path(spec.submodule_search_locations[0]) / "data" / "astronaut.png"


@cache
def missing(marker: str) -> str | None:
    """Why the tests marked `marker` cannot run here, or None when they can."""
    if marker == "cuda":
        return None if torch.cuda.is_available() else "needs a CUDA device (marker cuda)"
    if marker == "chromium":
        return None if shutil.which("chromium") else "needs chromium (Debian package chromium)"
    if marker == "dlib":
        absent = [name for name in ("dlib", "face_recognition_models") if importlib.util.find_spec(name) is None]
        return f"needs the align extra, not installed: {', '.join(absent)} (marker dlib)" if absent else None
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests whose hardware or optional extra is missing, naming what is missing."""
    for item in items:
        for marker in ("cuda", "dlib", "chromium"):
            reason = missing(marker) if item.get_closest_marker(marker) else None
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


def write_tiny_dataset(root: Path, per_class: int = 8, size: int = 32, seed: int = 0) -> Path:
    """`root/{train,val,test}/{bonafide,morph}/*.png`: noise images; morphs carry a bright doubled bar (learnable)."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val", "test"):
        for label, name in enumerate(("bonafide", "morph")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(60, 140, size=(size, size, 3)).astype(np.uint8)
                if label:
                    row = int(rng.integers(4, size - 8))
                    img[row:row + 2] = 250
                    img[row + 4:row + 6] = 250
                Image.fromarray(img).save(folder / f"{split}_{name}_{i:02d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight vgg_compact checkpoint at 32 px with classes bonafide/morph."""
    torch.manual_seed(0)
    model, source = build_model("vgg_compact", 2, "none")
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    meta = CheckpointMeta("vgg_compact", ["bonafide", "morph"], "morph", 32, IMAGENET_MEAN, IMAGENET_STD, source)
    save_checkpoint(path, model, meta)
    return path


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic set (20 identities, 32 px): folders, masks and a manifest.csv with morph types."""
    from smadlrp.data.synthetic.generator import SynthConfig, generate_dataset

    root = tmp_path_factory.mktemp("synth") / "set"
    generate_dataset(root, SynthConfig(identities=20, image_size=32, captures_per_identity=2, seed=3))
    return root


def render_in_chromium(page: Path, work: Path) -> str:
    """Render `page` in headless Chromium at a phone's width: assert a screenshot is made with no console error,
    failed request or refused fetch, and return the rendered DOM."""
    import subprocess

    command = ["chromium", "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=0",
               "--window-size=390,2000", f"--user-data-dir={work / 'profile'}"]
    shot = work / "phone.png"
    done = subprocess.run([*command, f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and shot.stat().st_size > 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "net::ERR" in line
               or "Refused to" in line]
    assert not console, console
    dom = subprocess.run([*command, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60)
    assert dom.returncode == 0, dom.stderr[-2000:]
    return dom.stdout
