"""Faults of processes end as one red line and the documented exit code: usage errors, bad torchrun variables,
errors in DataLoader workers, Ctrl-C while loading or training, warnings of the image library."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from smadlrp.cli import app
from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.data.loading import make_loader
from smadlrp.detector.train import Finetuner

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["finetune", "--epochs", "3", "--batch-size", "4", "--image-size", "32", "--weights", "none", "--device",
         "cpu"]
runner = CliRunner()


def error_lines(output: str) -> list[str]:
    """The non-empty lines of a command's stderr."""
    return [line for line in output.splitlines() if line.strip()]


def the_error_line(output: str, *parts: str, alone: bool = True) -> str:
    """The single `error:` line of `output` (with `alone`, its only line), holding every one of `parts`; no
    traceback."""
    lines = error_lines(output) if alone else [line for line in error_lines(output) if line.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output and "internal error" not in output, output
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


# ---- usage errors (D17) ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "named"), [
    (["finetune", "--batch-size", "0"], "'--batch-size'"),
    (["finetune", "--no-such-option"], "--no-such-option"),
    (["finetune", "--epochs", "abc"], "'--epochs'"),
    (["fine-tune"], "'fine-tune'"),
    (["evaluate", "--data", "FILE"], "'--data'"),
    (["evaluate", "--json", "DIR"], "'--json'"),
    (["--config", "DIR", "info", "x.safetensors"], "'--config'"),
])
def test_a_usage_error_is_one_red_line_with_exit_2(args: list[str], named: str, tmp_path: Path) -> None:
    (tmp_path / "FILE").write_text("not a folder", encoding="utf-8")
    (tmp_path / "DIR").mkdir()
    args = [str(tmp_path / arg) if arg in ("FILE", "DIR") else arg for arg in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    the_error_line(result.stderr, named, "--help`)")
    assert "Usage:" not in result.output and "╭" not in result.output


def test_help_and_no_arguments_still_show_the_help() -> None:
    assert runner.invoke(app, ["finetune", "--help"]).exit_code == 0
    bare = runner.invoke(app, [])
    assert bare.exit_code == 2 and "finetune" in bare.output and "error:" not in bare.output


# ---- torchrun's variables (D16) ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("variables", "line"), [
    ({"WORLD_SIZE": "abc"}, "error: WORLD_SIZE='abc' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "5"}, "error: RANK=5, WORLD_SIZE=2, LOCAL_RANK=5: not a valid place"),
    ({"WORLD_SIZE": "2", "RANK": "0", "SMADLRP_DIST_TIMEOUT": "1e309"}, "error: rank 0: SMADLRP_DIST_TIMEOUT='1e309':"),
    ({"WORLD_SIZE": "2", "RANK": "0", "SMADLRP_DIST_TIMEOUT": "inf"}, "error: rank 0: SMADLRP_DIST_TIMEOUT='inf':"),
    ({"WORLD_SIZE": "2", "RANK": "0", "SMADLRP_DIST_TIMEOUT": "nan"}, "error: rank 0: SMADLRP_DIST_TIMEOUT='nan':"),
    ({"WORLD_SIZE": "2", "RANK": "0", "SMADLRP_DIST_TIMEOUT": "abc"}, "error: rank 0: SMADLRP_DIST_TIMEOUT='abc':"),
])
def test_a_bad_torchrun_variable_is_one_line_with_exit_2(variables: dict[str, str], line: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    result = runner.invoke(app, ["evaluate", "--device", "cpu"])
    assert result.exit_code == 2
    the_error_line(result.stderr, line)


def test_a_long_variable_value_is_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "x" * 100_000)
    result = runner.invoke(app, ["evaluate", "--device", "cpu"])
    assert result.exit_code == 2
    assert len(the_error_line(result.stderr, "WORLD_SIZE='xxx")) < 200


# ---- DataLoader workers (D6) -------------------------------------------------------------------------------------
def truncated_jpeg(path: Path) -> Path:
    """A JPEG whose header reads and whose pixels do not (the second half of the file is missing)."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


@pytest.mark.slow
def test_an_unreadable_image_in_a_worker_is_the_workers_one_line(tiny_data: Path, tiny_checkpoint: Path,
                                                                  tmp_path: Path) -> None:
    data = shutil.copytree(tiny_data, tmp_path / "data")
    bad = truncated_jpeg(data / "test" / "morph" / "trunc.jpg")
    result = runner.invoke(app, ["evaluate", "-c", str(tiny_checkpoint), "--data", str(data), "--workers", "2",
                                 "--threshold", "0.5", "--device", "cpu"])
    assert result.exit_code == 1
    line = the_error_line(result.stderr, alone=False)
    assert line == f"error: {bad}: not a readable image (image file is truncated (1 bytes not processed))"
    assert "DataLoader worker" not in result.output


class _Refusing(torch.utils.data.Dataset[tuple[torch.Tensor, int, int]]):
    """Two items; the second raises a usage error (exit code 2)."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        if index == 1:
            raise UsageError("item 1: refused")
        return torch.zeros(3), 0, index


@pytest.mark.slow
def test_a_worker_error_keeps_its_message_and_exit_code() -> None:
    with pytest.raises(SmadlrpError) as caught:
        list(make_loader(_Refusing(), 1, workers=1))
    assert (caught.value.message, caught.value.exit_code) == ("item 1: refused", 2)


# ---- Ctrl-C (D6, D17) --------------------------------------------------------------------------------------------
class _InterruptedFinaliser:
    """An object whose finaliser gets Ctrl-C: Python can only report that KeyboardInterrupt ("Exception ignored
    in ..."), as when it lands in logging's fork handler while a DataLoader starts its workers."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGINT)


@pytest.mark.slow
def test_ctrl_c_that_a_library_swallowed_still_ends_training_as_interrupted(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGINT whose KeyboardInterrupt is lost, then the RuntimeError torch raises for the workers that the SIGINT
    ended: "interrupted in epoch 1 ...", exit 130, nothing else on stderr."""
    def lose_ctrl_c_then_lose_the_workers(self: Finetuner, callbacks: object) -> None:
        _InterruptedFinaliser()
        raise RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")

    monkeypatch.setattr(Finetuner, "_train_pass", lose_ctrl_c_then_lose_the_workers)
    result = runner.invoke(app, [*TRAIN, "--data", str(tiny_data), "--out", str(tmp_path / "run")])
    assert result.exit_code == 130
    the_error_line(result.stderr, "error: interrupted in epoch 1, before anything was saved", alone=False)
    assert "Exception ignored" not in result.stderr and "KeyboardInterrupt" not in result.stderr


def test_a_swallowed_ctrl_c_stops_training_at_the_next_batch(tiny_data: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    step = torch.optim.SGD.step

    def lose_ctrl_c(self: torch.optim.SGD, *args: object, **kwargs: object) -> object:
        calls.append(1)
        _InterruptedFinaliser()
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", lose_ctrl_c)
    result = runner.invoke(app, [*TRAIN, "--optimizer", "sgd", "--data", str(tiny_data), "--out",
                                 str(tmp_path / "run")])
    assert result.exit_code == 130 and calls == [1]
    the_error_line(result.stderr, "error: interrupted in epoch 1", alone=False)


def test_a_runtime_error_without_ctrl_c_is_still_a_bug(tiny_data: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(self: Finetuner, callbacks: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Finetuner, "_train_pass", fail)
    result = runner.invoke(app, [*TRAIN, "--data", str(tiny_data), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    lines = [line for line in error_lines(result.stderr) if line.startswith("error")]
    assert lines == ["error: internal error: RuntimeError: a bug (run `smadlrp --debug ...` for the traceback)"]


INTERRUPT_AT_TORCH = """
import os, signal, sys

class InterruptAtTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, InterruptAtTorch())
sys.argv = ["smadlrp", "--version"]
from smadlrp.__main__ import main
main()
"""


@pytest.mark.slow
def test_ctrl_c_while_the_command_line_loads_is_one_line_with_exit_130() -> None:
    done = subprocess.run([sys.executable, "-c", INTERRUPT_AT_TORCH], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 130
    assert done.stderr == "error: interrupted\n" and done.stdout == ""


@pytest.mark.slow
def test_ctrl_c_of_finetune_with_workers_is_interrupted_with_exit_130(tiny_data: Path, tmp_path: Path) -> None:
    """SIGINT to the process group (as a terminal sends it) once training runs with two DataLoader workers."""
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "smadlrp", *TRAIN[:2], "1000", *TRAIN[3:], "--data", str(tiny_data), "--workers", "2",
         "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (out / "history.json").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr
    the_error_line(stderr, "error: interrupted in epoch ", alone=False)


# ---- the image library's warnings (D17) --------------------------------------------------------------------------
def test_a_decompression_bomb_warning_is_a_notice_line(tiny_data: Path, tiny_checkpoint: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 800)  # the 32 x 32 test images have 1024 pixels
    result = runner.invoke(app, ["evaluate", "-c", str(tiny_checkpoint), "--data", str(tiny_data), "--threshold",
                                 "0.5", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    notices = [line for line in error_lines(result.stderr) if "1024 pixels" in line]
    assert notices and all(line.startswith("warning: Image size (1024 pixels) exceeds limit of 800 pixels")
                           for line in notices), result.stderr
    assert "DecompressionBombWarning" not in result.stderr and "PIL" not in result.stderr
