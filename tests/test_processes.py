"""Worker pools from scripts without a main guard, Ctrl-C and killed runs: no endless restarts, no leftovers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from smadlrp.cli import app
from smadlrp.data.synthetic.generator import SynthConfig, generate_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = SynthConfig(identities=6, image_size=32, captures_per_identity=2)
TINY_IMAGES = 24  # 12 bona fide captures (6 x 2) and as many morphs

CALL = 'generate_dataset(Path("OUT"), SynthConfig(identities=6, image_size=32, captures_per_identity=2), workers=2)'
IMPORTS = "from pathlib import Path\nfrom smadlrp.data.synthetic.generator import SynthConfig, generate_dataset\n"
UNGUARDED = f"{IMPORTS}{CALL}\nprint('finished')\n"
GUARDED = f"{IMPORTS}if __name__ == '__main__':\n    {CALL}\n    print('finished')\n"


def _run_script(folder: Path, text: str) -> subprocess.CompletedProcess[str]:
    script = folder / "make_set.py"
    script.write_text(text, encoding="utf-8")
    return subprocess.run([sys.executable, str(script)], cwd=folder, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_unguarded_script_stops_at_once_with_what_to_change(tmp_path: Path) -> None:
    done = _run_script(tmp_path, UNGUARDED)
    assert done.returncode == 1 and "finished" not in done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert 'if __name__ == "__main__":' in last and "workers=1" in last, done.stderr
    assert done.stderr.count("Traceback") == 1, done.stderr  # the script's own, no worker tracebacks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["make_set.py"]  # no .OUT.partial-PID left


@pytest.mark.slow
def test_guarded_script_with_workers_finishes(tmp_path: Path) -> None:
    done = _run_script(tmp_path, GUARDED)
    assert done.returncode == 0 and "finished" in done.stdout, done.stderr
    rows = (tmp_path / "OUT" / "manifest.csv").read_text(encoding="utf-8").splitlines()[1:]
    assert len(rows) == TINY_IMAGES


@pytest.mark.slow
def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = tmp_path / f".OUT.partial-{int(dead.stdout)}"
    running = tmp_path / f".OUT.partial-{os.getppid()}"  # a live process: maybe a run in progress
    for folder in (abandoned, running):
        (folder / "train").mkdir(parents=True)
    generate_dataset(tmp_path / "OUT", TINY)
    assert not abandoned.exists() and running.exists()


def test_synth_into_a_non_empty_folder_names_overwrite(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    result = CliRunner().invoke(app, ["synth", str(tmp_path), "--identities", "6", "--image-size", "32"])
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "mine"
