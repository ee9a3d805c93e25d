"""The output policy: no output option overwrites an input; run folders are locked; per-image names are unique;
failed writes and resumed runs say what happened in one line."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from smadlrp.cli import app
from smadlrp.core.container import write_document
from smadlrp.core.errors import SmadlrpError, UsageError
from smadlrp.core.locks import LOCK_FILE, locked_folder
from smadlrp.core.outputs import FilePlan
from smadlrp.data.paths import output_stems

runner = CliRunner()

Case = Callable[[dict[str, Path]], list[str]]


@pytest.fixture()
def files(tiny_data: Path, tiny_checkpoint: Path, tmp_path: Path) -> dict[str, Path]:
    """Copies of the inputs a command reads (the test destroys nothing shared): a checkpoint, an image of the
    data's test split, a protocol, a score file, and the data folder."""
    data = tmp_path / "data"
    for split in ("train", "val", "test"):
        for label in ("bonafide", "morph"):
            (data / split / label).mkdir(parents=True)
            for source in sorted((tiny_data / split / label).iterdir())[:4]:
                (data / split / label / source.name).write_bytes(source.read_bytes())
    checkpoint = tmp_path / "ck.safetensors"
    checkpoint.write_bytes(tiny_checkpoint.read_bytes())
    image = sorted((data / "test" / "morph").iterdir())[0]
    protocol = tmp_path / "protocol.csv"
    protocol.write_text("path,label,split\n" + "".join(
        f"{p.relative_to(data)},{p.parent.name},{p.parent.parent.name}\n" for p in sorted(data.rglob("*.png"))))
    scores = tmp_path / "scores.csv"
    scores.write_text("path,label,score\na.png,bonafide,0.2\nb.png,morph,0.9\nc.png,bonafide,0.4\nd.png,morph,0.6\n")
    return {"checkpoint": checkpoint, "image": image, "protocol": protocol, "scores": scores, "data": data,
            "out": tmp_path / "out"}


# (command line, the input it must not overwrite); each line names one output option onto one input
CASES: dict[str, tuple[Case, str]] = {
    "info --json": (lambda f: ["info", str(f["checkpoint"]), "--json", str(f["checkpoint"])], "checkpoint"),
    "evaluate --scores": (lambda f: ["evaluate", "-c", str(f["checkpoint"]), "--data", str(f["data"]),
                                     "--scores", str(f["checkpoint"])], "checkpoint"),
    "evaluate --det": (lambda f: ["evaluate", "-c", str(f["checkpoint"]), "--data", str(f["data"]),
                                  "--det", str(f["image"])], "image"),
    "evaluate --json": (lambda f: ["evaluate", "-c", str(f["checkpoint"]), "--protocol", str(f["protocol"]),
                                   "--json", str(f["protocol"])], "protocol"),
    "evaluate --markdown": (lambda f: ["evaluate", "-c", str(f["checkpoint"]), "--data", str(f["data"]),
                                       "--markdown", str(f["image"])], "image"),
    "evaluate --junit": (lambda f: ["evaluate", "-c", str(f["checkpoint"]), "--data", str(f["data"]),
                                    "--junit", str(f["checkpoint"])], "checkpoint"),
    "evaluate --robustness": (lambda f: ["evaluate", "-c", str(f["checkpoint"]), "--data", str(f["data"]),
                                         "--perturb", "jpeg:50", "--robustness", str(f["image"])], "image"),
    "predict --csv": (lambda f: ["predict", str(f["image"]), "-c", str(f["checkpoint"]), "--csv", str(f["image"])],
                      "image"),
    "predict --json": (lambda f: ["predict", str(f["image"]), "-c", str(f["checkpoint"]), "--json",
                                  str(f["checkpoint"])], "checkpoint"),
    "explain --json": (lambda f: ["explain", str(f["image"]), "-c", str(f["checkpoint"]), "--out", str(f["out"]),
                                  "--json", str(f["image"])], "image"),
    "trace --json": (lambda f: ["trace", str(f["image"]), "-c", str(f["checkpoint"]), "--out", str(f["out"]),
                                "--json", str(f["checkpoint"])], "checkpoint"),
    "compare-rules --json": (lambda f: ["compare-rules", "-c", str(f["checkpoint"]), "--data", str(f["data"]),
                                        "--json", str(f["checkpoint"])], "checkpoint"),
    "compare-rules --out": (lambda f: ["compare-rules", "-c", str(f["checkpoint"]), "--protocol", str(f["protocol"]),
                                       "--data", str(f["data"]), "--out", str(f["protocol"].parent)], "protocol"),
    "regions --json": (lambda f: ["regions", "-c", str(f["checkpoint"]), "--data", str(f["data"]),
                                  "--json", str(f["image"])], "image"),
    "metrics --json": (lambda f: ["metrics", str(f["scores"]), "--json", str(f["scores"])], "scores"),
    "metrics --markdown": (lambda f: ["metrics", str(f["scores"]), "--markdown", str(f["scores"])], "scores"),
    "metrics --det": (lambda f: ["metrics", str(f["scores"]), "--det", str(f["scores"])], "scores"),
    "fit-patterns --out": (lambda f: ["fit-patterns", "-c", str(f["checkpoint"]), "--data", str(f["data"]),
                                      "--out", str(f["checkpoint"])], "checkpoint"),
    "fit-patterns --json": (lambda f: ["fit-patterns", "-c", str(f["checkpoint"]), "--data", str(f["data"]),
                                       "--json", str(f["image"])], "image"),
    "finetune --json": (lambda f: ["finetune", "--data", str(f["data"]), "--weights", "none", "--out", str(f["out"]),
                                   "--json", str(f["image"])], "image"),
    "finetune --json protocol": (lambda f: ["finetune", "--protocol", str(f["protocol"]), "--data", str(f["data"]),
                                            "--weights", "none", "--out", str(f["out"]), "--json",
                                            str(f["protocol"])], "protocol"),
    "import-model --out": (lambda f: ["import-model", str(f["checkpoint"]), "--arch", "vgg_compact", "--out",
                                      str(f["checkpoint"])], "checkpoint"),
    "import-model --json": (lambda f: ["import-model", str(f["checkpoint"]), "--arch", "vgg_compact", "--out",
                                       str(f["out"] / "x.safetensors"), "--json", str(f["checkpoint"])], "checkpoint"),
    "split --json": (lambda f: ["split", str(f["data"] / "test"), "--out", str(f["out"] / "p.csv"),
                                "--json", str(f["image"])], "image"),
}


@pytest.mark.parametrize("case", CASES)
def test_no_output_option_overwrites_an_input(case: str, files: dict[str, Path]) -> None:
    make, target = CASES[case]
    if case == "compare-rules --out":  # the folder's fixed CSV name is the protocol's
        files["protocol"] = files["protocol"].rename(files["protocol"].with_name("compare-rules.csv"))
    before = {name: path.read_bytes() for name, path in files.items() if path.is_file()}
    result = runner.invoke(app, make(files))
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert "would overwrite" in lines[-1] and str(files[target].name) in lines[-1], result.output
    assert sum(line.startswith("error:") for line in lines) == 1
    assert {name: path.read_bytes() for name, path in files.items() if path.is_file()} == before


def test_two_options_naming_one_file_are_refused(files: dict[str, Path], tmp_path: Path) -> None:
    same = tmp_path / "report.txt"
    result = runner.invoke(app, ["evaluate", "-c", str(files["checkpoint"]), "--data", str(files["data"]),
                                 "--json", str(same), "--markdown", str(same)])
    assert result.exit_code == 2 and "name the same file" in result.output and not same.exists()


def test_the_default_pattern_file_never_replaces_a_checkpoint_of_that_name(files: dict[str, Path]) -> None:
    checkpoint = files["checkpoint"].rename(files["checkpoint"].with_name("patterns.safetensors"))
    before = checkpoint.read_bytes()
    result = runner.invoke(app, ["fit-patterns", "-c", str(checkpoint), "--data", str(files["data"])])
    assert result.exit_code == 2 and "the default --out" in result.output and "would overwrite the checkpoint" \
        in result.output
    assert checkpoint.read_bytes() == before


def test_an_output_reached_through_a_symlink_or_hard_link_is_the_same_file(tmp_path: Path) -> None:
    image = tmp_path / "data" / "a.png"
    image.parent.mkdir()
    image.write_bytes(b"x")
    (tmp_path / "link.png").symlink_to(image)
    os.link(image, tmp_path / "hard.png")
    for output in (tmp_path / "link.png", tmp_path / "data" / ".." / "data" / "a.png"):
        plan = FilePlan()
        plan.writes("--det", output)
        with pytest.raises(UsageError, match="would overwrite an image"):
            plan.reads("an image", [image], keep=False)
    plan = FilePlan()  # inputs first, then a hard link of the same name elsewhere as the output
    plan.reads("an image", image)
    (tmp_path / "other").mkdir()
    os.link(image, tmp_path / "other" / "a.png")
    with pytest.raises(UsageError, match="would overwrite an image"):
        plan.writes("--csv", tmp_path / "other" / "a.png")
    FilePlan().writes("--csv", tmp_path / "new.csv")  # a new file is no input


def test_explain_names_are_unique_when_paths_flatten_alike(files: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "q"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.png").write_bytes(files["image"].read_bytes())
    bona = sorted((files["data"] / "test" / "bonafide").iterdir())[0]
    (folder / "sub__a.png").write_bytes(bona.read_bytes())
    assert output_stems([folder / "sub" / "a.png", folder / "sub__a.png"]) == ["sub__a", "sub__a~2"]
    result = runner.invoke(app, ["explain", str(folder), "-c", str(files["checkpoint"]), "--out",
                                 str(tmp_path / "qout"), "--json", str(tmp_path / "q.json")])
    assert result.exit_code == 0, result.output
    assert "(sub__a~2)" in " ".join(result.output.split())  # the table names the numbered files
    written = sorted(p.name for p in (tmp_path / "qout").iterdir())
    assert len(written) == 4 and "sub__a~2.epsilon.heatmap.png" in written
    import json

    images = json.loads((tmp_path / "q.json").read_text())["images"]
    assert {Path(i["path"]).name: (i["name"], sorted(i["files"])[0]) for i in images} == {
        "a.png": ("sub__a", "sub__a.epsilon.heatmap.png"), "sub__a.png": ("sub__a~2", "sub__a~2.epsilon.heatmap.png")}


def test_explain_refuses_an_out_folder_whose_outputs_would_replace_input_images(files: dict[str, Path],
                                                                               tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    first = folder / "x.png"
    first.write_bytes(files["image"].read_bytes())
    clash = folder / "x.epsilon.heatmap.png"  # an input that a heatmap of x.png would replace
    clash.write_bytes(files["image"].read_bytes())
    before = clash.read_bytes()
    result = runner.invoke(app, ["explain", str(first), str(clash), "-c", str(files["checkpoint"]), "--out",
                                 str(folder)])
    assert result.exit_code == 2 and "holds the input image" in result.output
    assert clash.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["x.epsilon.heatmap.png",
                                                                                         "x.png"]


# ---- run folders -------------------------------------------------------------------------------------------

FINETUNE = ["finetune", "--arch", "vgg_compact", "--image-size", "32", "--weights", "none", "--batch-size", "8",
            "--epochs", "1"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.slow
def test_a_run_folder_held_by_a_live_process_is_refused(files: dict[str, Path]) -> None:
    out = files["out"]
    out.mkdir()
    (out / LOCK_FILE).write_text(f"{os.getpid()} {os.uname().nodename}\n")
    result = runner.invoke(app, [*FINETUNE, "--data", str(files["data"]), "--out", str(out)])
    assert result.exit_code == 1 and f"in use by smadlrp process {os.getpid()}" in result.output
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written, the holder's lock kept
    resumed = runner.invoke(app, ["finetune", "--resume", str(out)])
    assert resumed.exit_code == 1 and "in use by smadlrp process" in resumed.output


@pytest.mark.slow
def test_a_stale_lock_and_killed_writes_are_cleaned_up(files: dict[str, Path]) -> None:
    out = files["out"]
    out.mkdir()
    (out / LOCK_FILE).write_text(f"{_dead_pid()} {os.uname().nodename}\n")
    leftovers = [out / ".best.safetensors.k2j4.tmp", out / ".tmpAb12Cd"]
    for path in leftovers:
        path.write_bytes(b"\0" * 100)
    (out / "best.safetensors").write_bytes(b"half")  # a first save killed before the resume state
    result = runner.invoke(app, [*FINETUNE, "--data", str(files["data"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "taking it over" in result.output and "removed 2 temporary file(s)" in result.output
    assert "stopped before its first epoch was saved" in result.output
    assert not any(p.exists() for p in leftovers) and not (out / LOCK_FILE).exists()
    assert (out / "resume.safetensors").is_file()


def test_resume_of_a_run_that_saved_nothing_says_so(files: dict[str, Path]) -> None:
    out = files["out"]
    out.mkdir()
    (out / "last.safetensors").write_bytes(b"half")
    result = runner.invoke(app, ["finetune", "--resume", str(out)])
    assert result.exit_code == 1 and "nothing to resume" in result.output
    assert f"start it again with --out {out}" in result.output
    (out / "last.safetensors").unlink()
    (out / ".tmpAb12Cd").write_bytes(b"\0")  # a kill during the very first write leaves only this
    again = runner.invoke(app, ["finetune", "--resume", str(out)])
    assert again.exit_code == 1 and f"start it again with --out {out}" in again.output


def test_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    with locked_folder(tmp_path / "run") as folder:
        with pytest.raises(SmadlrpError, match="in use by smadlrp process"):
            with locked_folder(folder):
                pass
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SmadlrpError, match="exists and is not a folder"):
        with locked_folder(blocker):
            pass


@pytest.mark.slow
def test_resume_refuses_changed_training_options(files: dict[str, Path]) -> None:
    out = files["out"]
    first = runner.invoke(app, [*FINETUNE, "--data", str(files["data"]), "--out", str(out), "--lr", "0.01"])
    assert first.exit_code == 0, first.output
    before = (out / "resume.safetensors").read_bytes()
    changed = runner.invoke(app, ["finetune", "--resume", str(out), "--lr", "5", "--arch", "resnet18",
                                  "--data", str(files["out"].parent), "--epochs", "2"])
    lines = changed.output.strip().splitlines()
    assert changed.exit_code == 2 and "--lr 5.0 (the run's: 0.01)" in lines[-1], changed.output
    assert "--arch resnet18 (the run's: vgg_compact)" in lines[-1] and "--data" in lines[-1]
    assert (out / "resume.safetensors").read_bytes() == before
    same = runner.invoke(app, ["finetune", "--resume", str(out), "--lr", "0.01", "--data", str(files["data"]),
                               "--epochs", "2"])
    assert same.exit_code == 0 and "resuming" in same.output, same.output


@pytest.mark.slow
@pytest.mark.parametrize(("interrupt_at", "message"), [
    ("batch 1", "interrupted in epoch 1, before anything was saved; start the run again with --out"),
    ("saving epoch 2", "interrupted in epoch 2; 1 completed epoch(s) are saved. Continue with: smadlrp finetune "
                       "--resume"),
])
def test_ctrl_c_names_the_epochs_that_are_saved(interrupt_at: str, message: str, files: dict[str, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while epoch 2 is being saved: the resume state on disk holds epoch 1, and the message says so."""
    from smadlrp.detector.train import Callbacks, Finetuner, TrainConfig, read_resume

    config = TrainConfig(epochs=3, batch_size=8, image_size=32, weights="none", data=str(files["data"]))
    trainer = Finetuner(config, files["data"], files["out"], torch.device("cpu"))
    save = trainer._save_resume

    def save_or_stop() -> None:
        if trainer.state.epoch == 2:
            raise KeyboardInterrupt
        save()

    def stop(_: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_save_resume", save_or_stop)
    callbacks = Callbacks(batch_end=stop) if interrupt_at == "batch 1" else Callbacks()
    with pytest.raises(SmadlrpError) as caught:
        trainer.run(callbacks)
    assert caught.value.exit_code == 130 and caught.value.message.startswith(message)
    if interrupt_at == "saving epoch 2":
        assert read_resume(files["out"])[1]["state"]["epoch"] == 1


# ---- failed writes -----------------------------------------------------------------------------------------

def test_a_full_disk_during_a_safetensors_write_is_one_line(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes writes past 64 KiB fail with EFBIG, as a full disk does with ENOSPC."""
    target = tmp_path / "big.safetensors"
    target.write_bytes(b"old")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, hard))
    try:
        with pytest.raises(SmadlrpError) as caught:
            write_document(target, {"w": torch.zeros(100_000)}, {"schema": "smadlrp.test/1"})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert caught.value.message.startswith(f"cannot write {target}: ") and "\n" not in caught.value.message
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["big.safetensors"]


def test_finetune_into_a_folder_that_cannot_be_made_is_one_line(files: dict[str, Path], tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = runner.invoke(app, [*FINETUNE, "--data", str(files["data"]), "--out", str(blocker / "run")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and lines[-1].startswith(f"error: cannot write {blocker / 'run'}: "), result.output
