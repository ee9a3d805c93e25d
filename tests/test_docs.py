"""Executable documentation: every `$ smadlrp` command and every Python block of README.md and docs/*.md runs.

How blocks run, and the markers that steer them, are described in docs/contributing-docs.md. In short:

- a fenced `console` or `bash` block runs each of its `$ smadlrp ...` commands (continuation lines end with
  `\\`) in-process through typer's CliRunner and fails on a non-zero exit; output lines are not run;
- a fenced `python` block is executed; all Python blocks of a page share one namespace;
- each page runs in its own temporary folder, blocks in page order; HOME points at a fake home whose
  `~/.cache/smadlrp/synthetic-v2` holds a tiny synthetic set, which is also the embedded default set;
- `<!-- docs-test: ... -->` right above a block substitutes fast settings or skips it with a reason;
  `<!-- docs-test page: fixtures PATH ... -->` puts tiny fixture files into the page's folder;
- `<!-- docs-test: figure KEY -->` / `figures KEY, KEY` ties the following block to the committed
  docs/demo-figures.json (`make docs-figures` writes it): the quoted values must equal it. A local `make demo`
  is never compared: its figures differ across machines.

docs/cli.md is generated from the code and checked by tests/test_cli.py; it is not run here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import astronaut_photo, hopper_photo
from PIL import Image
from typer.testing import CliRunner

from smadlrp.cli import app
from smadlrp.data.loading import IMAGENET_MEAN, IMAGENET_STD
from smadlrp.data.synthetic import generator
from smadlrp.detector.checkpoint import CheckpointMeta, save_checkpoint
from smadlrp.detector.models import build_model

pytestmark = pytest.mark.slow  # every example of the docs runs, many through the whole command line
ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "cli.md")]
FIGURES_FILE = ROOT / "docs" / "demo-figures.json"
TINY_SET = generator.SynthConfig(identities=20, image_size=32, captures_per_identity=2)

MARKER = re.compile(r"^<!-- docs-test(?P<page> page)?:(?P<body>.*?)-->$")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")
SHELL_SYNTAX = re.compile(r"[|;&<>`]|\$\(")


# ---------------------------------------------------------------------------------------------- parsing


@dataclass
class Directives:
    """What the markers above a block ask for."""

    substitutions: list[tuple[str, str]] = field(default_factory=list)
    skip: str | None = None
    figures: list[str] = field(default_factory=list)
    fixtures: list[str] = field(default_factory=list)


@dataclass
class Block:
    """One fenced block (or, for figure checks, one paragraph or table) of a page."""

    page: Path
    line: int  # 1-based line of the opening fence (or of the paragraph's first line)
    lang: str  # "console", "bash", "python", ... ; "" for a fence without language; "prose" for text
    text: str
    directives: Directives

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.lang == "python" or (self.lang in ("console", "bash") and bool(self.commands()))

    def commands(self) -> list[str]:
        """The `$ smadlrp ...` commands of a console block, continuation lines joined."""
        commands, current, continuing = [], "", False
        for raw in self.text.splitlines():
            line = raw.strip()
            if continuing:
                current += " " + line
            elif line.startswith("$ "):
                current = line[2:]
            else:
                continue
            continuing = current.endswith("\\")
            current = current.removesuffix("\\").rstrip()
            if not continuing and current.startswith("smadlrp "):
                commands.append(current)
        return commands

    def output(self) -> str:
        """A console block's output: every line that is not a command or its continuation."""
        lines, continuing = [], False
        for raw in self.text.splitlines():
            if continuing or raw.strip().startswith("$ "):
                continuing = raw.rstrip().endswith("\\")
                continue
            lines.append(raw)
        return "\n".join(lines)


def parse_marker(body: str, where: str, page_wide: bool) -> Directives:
    """`substitute OLD => NEW; skip (REASON); needs NAME; figure KEY; figures A, B; fixtures PATH PATH`
    (page: fixtures, substitute)."""
    found = Directives()
    for part in filter(None, (p.strip() for p in body.split(";"))):
        verb, _, rest = part.partition(" ")
        rest = rest.strip()
        if verb == "substitute" and "=>" in rest:
            old, _, new = rest.partition("=>")
            found.substitutions.append((old.strip(), new.strip()))
        elif verb == "skip" and not page_wide and re.fullmatch(r"\(.+\)", rest):
            found.skip = rest[1:-1]
        elif verb == "needs" and not page_wide and rest:
            present = shutil.which(rest) or importlib.util.find_spec(rest)
            found.skip = found.skip or (None if present else f"needs {rest} (a program on PATH or a Python module)")
        elif verb in ("figure", "figures") and not page_wide and rest:
            found.figures += [key.strip() for key in rest.split(",")]
        elif verb == "fixtures" and page_wide and rest:
            found.fixtures += rest.replace(",", " ").split()
        else:
            raise ValueError(f"{where}: unknown docs-test directive {part!r} (see docs/contributing-docs.md)")
    return found


def parse_page(page: Path) -> tuple[Directives, list[Block]]:
    """The page-wide directives and every block of `page`, in order, with the directives of its marker."""
    lines = page.read_text(encoding="utf-8").splitlines()
    page_directives, blocks, pending = Directives(), [], None
    i = 0
    while i < len(lines):
        line, where = lines[i], f"{page.relative_to(ROOT)}:{i + 1}"
        if line.startswith("<!-- docs-test"):  # a marker may span lines
            end = next((j for j in range(i, len(lines)) if "-->" in lines[j]), i)
            line, i = " ".join(s.strip() for s in lines[i:end + 1]), end
        marker = MARKER.match(line.strip())
        if marker:
            directives = parse_marker(marker["body"], where, bool(marker["page"]))
            if marker["page"]:
                page_directives.substitutions += directives.substitutions
                page_directives.fixtures += directives.fixtures
            else:
                pending = directives
            i += 1
            continue
        fence = FENCE.match(line)
        if fence:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is None:
                raise ValueError(f"{where}: fenced block is never closed")
            blocks.append(Block(page, i + 1, fence["lang"], "\n".join(lines[i + 1:end]), pending or Directives()))
            pending, i = None, end + 1
            continue
        if pending is not None and line.strip():  # a marker above prose: the paragraph or table below it
            end = next((j for j in range(i, len(lines)) if not lines[j].strip()), len(lines))
            blocks.append(Block(page, i + 1, "prose", "\n".join(lines[i:end]), pending))
            pending, i = None, end
            continue
        i += 1
    if pending is not None:
        raise ValueError(f"{page.relative_to(ROOT)}: a docs-test marker at the end of the page has no block")
    return page_directives, blocks


PARSED = {page: parse_page(page) for page in PAGES}
RUNNABLE = [block for _, blocks in PARSED.values() for block in blocks if block.runnable]


# --------------------------------------------------------------------------------------------- fixtures


def _tiny_checkpoint(path: Path) -> None:
    torch.manual_seed(0)
    model, source = build_model("vgg_compact", 2, "none")
    save_checkpoint(path, model, CheckpointMeta("vgg_compact", ["bonafide", "morph"], "morph", TINY_SET.image_size,
                                                IMAGENET_MEAN, IMAGENET_STD, source))


def _tiny_patterns(path: Path) -> None:
    checkpoint = path.parent / "run" / "best.safetensors"
    if not checkpoint.exists():
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        _tiny_checkpoint(checkpoint)
    _run_cli(f"smadlrp fit-patterns --checkpoint {checkpoint} --kind both --max-images 16 --out {path}")


def _tiny_state_dict(path: Path) -> None:
    torch.manual_seed(0)
    model, _ = build_model("vgg_compact", 2, "none")
    torch.save(model.state_dict(), path)


def _photographs(path: Path) -> None:
    """A folder of two portraits (Grace Hopper; scikit-image's astronaut, NASA, public domain) and a picture of
    sky without a face."""
    path.mkdir()
    shutil.copy2(hopper_photo(), path / "grace.jpg")
    shutil.copy2(astronaut_photo(), path / "eileen.png")
    sky = np.linspace([90, 140, 220], [200, 225, 250], 256).astype(np.uint8)
    Image.fromarray(np.repeat(sky[:, None, :], 256, axis=1)).save(path / "sky.png")


# The files and folders a page can ask for with `<!-- docs-test page: fixtures PATH ... -->`, each made once per
# session.
FIXTURES: dict[str, Callable[[Path], None]] = {
    "demo/run/best.safetensors": _tiny_checkpoint,
    "demo/patterns.safetensors": _tiny_patterns,
    "model_ft.pth": _tiny_state_dict,
    "photos": _photographs,
}


@pytest.fixture(scope="session")
def fake_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home folder whose default synthetic set (~/.cache/smadlrp/synthetic-v2) is a tiny one."""
    home = tmp_path_factory.mktemp("home")
    generator.generate_dataset(home / ".cache" / "smadlrp" / f"synthetic-v{generator.FORMAT_VERSION}", TINY_SET,
                               workers=1)
    return home


@pytest.fixture
def docs_env(fake_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Commands and snippets see the fake home and take the tiny set as the embedded default set."""
    monkeypatch.setenv("HOME", str(fake_home))
    monkeypatch.delenv(generator.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(generator, "DEFAULT_CONFIG", TINY_SET)
    return fake_home


@pytest.fixture(scope="session")
def fixture_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fixtures")


def _placeholders(home: Path) -> dict[str, str]:
    """Values a substitution can name: {data}, {morph} and {bonafide} (test images of the tiny set), {portrait}
    (a photograph of a face)."""
    data = generator.default_dataset_dir()
    assert str(data).startswith(str(home))
    return {"data": str(data), "morph": str(sorted((data / "test" / "morph").glob("complete_*.png"))[0]),
            "bonafide": str(sorted((data / "test" / "bonafide").glob("*.png"))[0]), "portrait": str(hopper_photo())}


# ------------------------------------------------------------------------------------------------ running


runner = CliRunner()


def _run_cli(command: str) -> None:
    if SHELL_SYNTAX.search(command):
        pytest.fail(f"unsupported shell syntax in `{command}`: write one plain command, or mark the block skip")
    args = [os.path.expanduser(a) if a.startswith("~") else a for a in shlex.split(command)[1:]]
    result = runner.invoke(app, args)
    if result.exit_code != 0:
        pytest.fail(f"`{command}` exited {result.exit_code}:\n{result.output}", pytrace=False)


@dataclass
class PageState:
    folder: Path
    namespace: dict[str, Any]
    ok: dict[int, bool]  # line of each block that ran -> whether it succeeded


STATES: dict[Path, PageState] = {}


def _page_state(page: Path, tmp_root: Path, store: Path) -> PageState:
    if page not in STATES:
        folder = tmp_root / page.stem
        folder.mkdir()
        for name in PARSED[page][0].fixtures:
            if name not in FIXTURES:
                raise ValueError(f"{page.name}: unknown fixture {name!r}; known: {', '.join(FIXTURES)}")
            source = store / name
            if not source.exists():
                source.parent.mkdir(parents=True, exist_ok=True)
                FIXTURES[name](source)
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, folder / name)
            else:
                shutil.copy2(source, folder / name)
        STATES[page] = PageState(folder, {"__name__": "__main__"}, {})
    return STATES[page]


def _prepared(block: Block, placeholders: dict[str, str]) -> str:
    """The block's text after its marker's substitutions (each must match) and the page's (where they match)."""
    text = block.text
    for old, new in block.directives.substitutions:
        if old not in text:
            pytest.fail(f"{block.id}: the marker substitutes {old!r}, which the block does not contain", pytrace=False)
        text = text.replace(old, new.format(**placeholders))
    for old, new in PARSED[block.page][0].substitutions:
        text = text.replace(old, new.format(**placeholders))
    return text


def _run_block(block: Block, state: PageState, placeholders: dict[str, str]) -> None:
    text = _prepared(block, placeholders)
    if block.lang == "python":
        try:
            exec(compile(text, block.id, "exec"), state.namespace)  # noqa: S102 - the docs' own code
        except Exception as exc:  # noqa: BLE001 - any failure of a snippet fails its test, with its line
            frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == block.id]
            where = f" (line {block.line + frames[-1].lineno} of the page)" if frames else ""
            pytest.fail(f"{block.id}{where}: {exc.__class__.__name__}: {exc}", pytrace=False)
    else:
        for command in Block(block.page, block.line, block.lang, text, block.directives).commands():
            _run_cli(command)


@pytest.fixture(scope="session")
def pages_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pages")


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_docs_block_runs(block: Block, docs_env: Path, fixture_store: Path, pages_root: Path,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    state = _page_state(block.page, pages_root, fixture_store)
    monkeypatch.chdir(state.folder)
    placeholders = _placeholders(docs_env)
    for earlier in (b for b in RUNNABLE if b.page == block.page and b.line < block.line):
        if earlier.directives.skip is None:  # blocks share the page's folder: earlier ones run first
            _run_once(earlier, state, placeholders, dependent=block)
    if block.directives.skip is not None:
        pytest.skip(block.directives.skip)
    _run_once(block, state, placeholders)


def _run_once(block: Block, state: PageState, placeholders: dict[str, str], dependent: Block | None = None) -> None:
    """Run `block` unless it already ran; a later block whose predecessor failed fails and names it."""
    if block.line not in state.ok:
        state.ok[block.line] = False
        _run_block(block, state, placeholders)
        state.ok[block.line] = True
    elif not state.ok[block.line]:
        pytest.fail(f"{block.id}, which {dependent.id if dependent else 'this block'} builds on, failed",
                    pytrace=False)


# ------------------------------------------------------------------------------------------ demo figures


def _normalised(text: str) -> str:
    return " ".join(text.split())


def stale_figures(page: Path, figures: dict[str, str]) -> Iterator[str]:
    """One line per figure a block of `page` names that is missing from the figures file or not quoted."""
    for block in PARSED[page][1]:
        for key in block.directives.figures:
            if key not in figures:
                yield f"{block.id}: figure {key!r} is not in {FIGURES_FILE.name} (`make docs-figures` writes it)"
                continue
            quoted = block.output() if block.lang in ("console", "bash") else block.text
            if _normalised(figures[key]) in _normalised(quoted):
                continue
            lines = figures[key].splitlines()
            if len(lines) == 1:
                yield f"{block.id}: stale, {FIGURES_FILE.name} has {key} = {figures[key]!r}"
            else:  # a table or an output: name its first line that the block lacks
                missing = next((line for line in lines if _normalised(line) not in _normalised(quoted)), lines[0])
                yield (f"{block.id}: stale, {key} in {FIGURES_FILE.name} has the line {missing.strip()!r}, which "
                       "the block lacks (scripts/demo_figures.py rewrites a whole-block figure)")


PAGES_WITH_FIGURES = [page for page in PAGES if any(b.directives.figures for b in PARSED[page][1])]


@pytest.mark.parametrize("page", PAGES_WITH_FIGURES, ids=[str(p.relative_to(ROOT)) for p in PAGES_WITH_FIGURES])
def test_demo_figures_are_current(page: Path) -> None:
    figures = json.loads(FIGURES_FILE.read_text(encoding="utf-8"))["figures"]
    stale = list(stale_figures(page, figures))
    assert not stale, "quoted demo figures differ from docs/demo-figures.json:\n" + "\n".join(stale)


# ------------------------------------------------------------------------------ the demo and its figures


def _script(name: str) -> Any:
    """A module of scripts/ (not a package), imported from its file."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def demo_run(tmp_path: Path) -> Path:
    """A folder as scripts/demo.sh leaves it before its last step, with small made-up results."""
    demo = tmp_path / "demo"
    (demo / "docs-images").mkdir(parents=True)
    metrics = {"d-eer": 0.1111, "apcer": 0.2222, "bpcer": 0.0333, "n_bonafide": 156, "n_morph": 156, "auc": 0.98,
               "threshold": 0.5}  # unlike any real demo, so that they differ from the committed figures
    (demo / "evaluate.json").write_text(json.dumps({"metrics": metrics}), encoding="utf-8")
    method = {"name": "epsilon", "kind": "rule", "aopc": 0.5, "aopc_vs_random": 1.0, "localisation": None,
              "per_type": {}}
    compare = {"methods": [method], "n_images": 4, "split": "test", "patch_size": 4, "steps": 2}
    (demo / "compare.json").write_text(json.dumps(compare), encoding="utf-8")
    for name in ("explain-example", "trace-example"):
        (demo / f"{name}.txt").write_text(f"{name} output\n", encoding="utf-8")
    (demo / "docs-images" / "demo-grid.png").write_bytes(b"grid")
    return demo


def test_demo_leaves_the_docs_alone(demo_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`make demo` keeps its figures in its folder and prints them beside the committed ones: a clone stays clean."""
    committed = {path: path.read_bytes() for path in [FIGURES_FILE, *PAGES, *(ROOT / "docs" / "images").glob("*.png")]}
    _script("demo_figures").main(demo_run)
    assert {path: path.read_bytes() for path in committed} == committed
    assert json.loads((demo_run / FIGURES_FILE.name).read_text(encoding="utf-8"))["figures"]["evaluate.d-eer"] == \
        "11.11 %"
    printed = capsys.readouterr().out
    readme = json.loads(FIGURES_FILE.read_text(encoding="utf-8"))["figures"]
    for key, ours in (("evaluate.d-eer", "11.11 %"), ("evaluate.apcer", "22.22 %"), ("evaluate.bpcer", "3.33 %")):
        assert any(ours in line and readme[key] in line for line in printed.splitlines()), printed
    assert "vary across machines" in printed


def test_docs_figures_publishes_the_demo(demo_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make docs-figures` copies the demo's figures, images and whole-block quotes into the docs."""
    root = tmp_path / "clone"
    (root / "docs" / "images").mkdir(parents=True)
    (root / "README.md").write_text("<!-- docs-test: figure evaluate.d-eer -->\n12.82 %\n\nmore\n", encoding="utf-8")
    module = _script("demo_figures")
    monkeypatch.setattr(module, "ROOT", root)
    monkeypatch.setattr(module, "COMMITTED", root / "docs" / FIGURES_FILE.name)
    module.main(demo_run, publish_docs=True)
    assert (root / "docs" / FIGURES_FILE.name).read_bytes() == (demo_run / FIGURES_FILE.name).read_bytes()
    assert (root / "docs" / "images" / "demo-grid.png").read_bytes() == b"grid"
    assert (root / "README.md").read_text(encoding="utf-8") == \
        "<!-- docs-test: figure evaluate.d-eer -->\n11.11 %\n\nmore\n"
