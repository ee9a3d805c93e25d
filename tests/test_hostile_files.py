"""Hostile and damaged model files: every one is refused with one line naming the file and what is wrong, exit 1
(exit 2 for option values), and is left as it was."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from smadlrp.cli import app
from smadlrp.core.errors import SmadlrpError
from smadlrp.data.loading import list_images
from smadlrp.detector.checkpoint import CheckpointMeta, load_checkpoint
from smadlrp.detector.inference import score_files
from smadlrp.detector.models import build_model
from smadlrp.detector.train import RESUME_FILE
from smadlrp.lrp.canonize import canonize
from smadlrp.lrp.patterns import FINGERPRINT_KEY, fit_patterns, save_patterns, weights_fingerprint

runner = CliRunner()
NAN = float("nan")


def _one_error(args: list[str], code: int = 1) -> str:
    """Run the CLI; assert exit `code` and that the output ends in its one error line, the only one (returned
    without "error: "; a notice such as the device may come before it)."""
    result = runner.invoke(app, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == code, result.output
    assert [line for line in lines if "error" in line] == lines[-1:], result.output
    assert lines[-1].startswith("error: ") and "internal error" not in result.output
    assert "Traceback" not in result.output
    return lines[-1].removeprefix("error: ")


def _image(tiny_data: Path) -> Path:
    return list_images(tiny_data / "test" / "morph")[0]


# ---- D5: malformed safetensors headers -----------------------------------------------------------------------

def _raw_safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("header", [
    b'{"__metadata__": ["smadlrp"]}',
    b'{"__metadata__": "smadlrp"}',
    b'{"__metadata__": {"smadlrp": 5}}',
    b'{"a": 5}',
    b'{"a": {"dtype": "F32", "shape": [1]}}',
    b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}',
    b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}}',
    b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]}}',
    b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}',
    b'{"a": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}',
    b'{"a": ' + DEEP + b"}",
    b'{"a": ' + b"9" * 5000 + b"}",
], ids=["metadata-list", "metadata-str", "metadata-value-int", "entry-int", "no-offsets", "one-offset",
        "offset-str", "offset-float", "offsets-reversed", "shape-str", "deep-array", "huge-int"])
def test_malformed_header_is_not_a_safetensors_file(tmp_path: Path, header: bytes) -> None:
    path = _raw_safetensors(tmp_path / "m.safetensors", header, b"\0" * 8)
    before = path.read_bytes()
    assert _one_error(["info", str(path)]) == f"{path}: not a safetensors file"
    assert path.read_bytes() == before


def test_deeply_nested_metadata_is_refused(tmp_path: Path) -> None:
    header = json.dumps({"__metadata__": {"smadlrp": DEEP.decode()}}).encode()
    path = _raw_safetensors(tmp_path / "deep.safetensors", header)
    assert _one_error(["info", str(path)]) == f"{path}: smadlrp metadata is not valid JSON"


# ---- D4: checkpoint metadata ----------------------------------------------------------------------------------

def _rewrite(source: Path, target: Path, change: dict[str, Any],
             tensors: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Path:
    """Copy checkpoint `source` to `target` with its metadata document updated by `change` (the D4 recipe)."""
    with safe_open(str(source), "pt") as fh:
        meta = json.loads(fh.metadata()["smadlrp"])
    state = load_file(str(source))
    if tensors is not None:
        tensors(state)
    save_file(state, str(target), metadata={"smadlrp": json.dumps({**meta, **change})})
    return target


def _points(point: Any) -> dict[str, Any]:
    return {"operating_points": {"split": "val", "points": {"eer": point}}}


BAD_METADATA: list[tuple[str, dict[str, Any], str]] = [
    ("huge", {"input_size": 60000}, "input_size"),
    ("size-text", {"input_size": "abc"}, "input_size"),
    ("size-float", {"input_size": 32.5}, "input_size"),
    ("size-list", {"input_size": [32, 32]}, "input_size"),
    ("size-zero", {"input_size": 0}, "input_size"),
    ("size-negative", {"input_size": -4}, "input_size"),
    ("size-bool", {"input_size": True}, "input_size"),
    ("classes-int", {"class_names": 5}, "class_names"),
    ("classes-twice", {"class_names": ["morph", "morph"]}, "class_names"),
    ("classes-empty-name", {"class_names": ["", "morph"]}, "class_names"),
    ("attack-missing", {"attack_class": "print"}, "attack_class"),
    ("arch-int", {"architecture": 5}, "architecture"),
    ("mean-text", {"mean": "abc"}, "mean"),
    ("mean-letters", {"mean": ["a", "b", "c"]}, "mean"),
    ("mean-two", {"mean": [0.5, 0.5]}, "mean"),
    ("std-text", {"std": "xyz"}, "std"),
    ("std-nan", {"std": [NAN, 1, 1]}, "std"),
    ("std-zero", {"std": [0, 1, 1]}, "std"),
    ("std-inf", {"std": [float("inf"), 1, 1]}, "std"),
    ("source-int", {"weights_source": 5}, "weights_source"),
    ("training-list", {"training": [1]}, "training"),
    ("training-data-int", {"training": {"data": 5}}, "training.data"),
    ("alignment-text", {"alignment": "x"}, "alignment"),
    ("points-list", {"operating_points": [1]}, "operating_points"),
    ("points-of-list", {"operating_points": {"points": [1]}}, "operating_points.points"),
    ("threshold-text", _points({"threshold": "high"}), "operating_points.points.eer.threshold"),
    ("threshold-high", _points({"threshold": 7.5}), "operating_points.points.eer.threshold"),
    ("threshold-nan", _points({"threshold": NAN}), "operating_points.points.eer.threshold"),
    ("threshold-negative", _points({"threshold": -0.1}), "operating_points.points.eer.threshold"),
    ("threshold-null-no-reason", _points({"threshold": None}), "operating_points.points.eer"),
    ("apcer-text", _points({"threshold": 0.5, "apcer": "x"}), "operating_points.points.eer.apcer"),
]


@pytest.mark.parametrize(("change", "key"), [(c, k) for _, c, k in BAD_METADATA],
                         ids=[name for name, _, _ in BAD_METADATA])
@pytest.mark.parametrize("command", ["info", "predict"])
def test_bad_metadata_is_refused_naming_the_key(tiny_checkpoint: Path, tiny_data: Path, tmp_path: Path,
                                                 change: dict[str, Any], key: str, command: str) -> None:
    path = _rewrite(tiny_checkpoint, tmp_path / "bad.safetensors", change)
    before = path.read_bytes()
    args = ["info", str(path)] if command == "info" else ["predict", str(_image(tiny_data)), "-c", str(path)]
    message = _one_error(args)
    assert message.startswith(f"{path}: not a valid smadlrp checkpoint: {key}: "), message
    assert len(message) < len(str(path)) + 250  # values are quoted short
    assert path.read_bytes() == before


def test_long_values_are_cut_at_a_word_boundary(tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = _rewrite(tiny_checkpoint, tmp_path / "long.safetensors", {"attack_class": "word " * 100_000})
    message = _one_error(["info", str(path)])
    assert "'word word" in message and "word ..." not in message and len(message) < len(str(path)) + 250


def test_valid_stored_points_still_load(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A null threshold with its reason, and the conservative threshold just above 1.0 that a bona fide score of
    1.0 gives, are what `finetune` writes: both load."""
    for point in ({"threshold": None, "reason": "no morphs"}, {"threshold": 1.0000000000000002, "apcer": 0.0}):
        path = _rewrite(tiny_checkpoint, tmp_path / "ok.safetensors", _points(point))
        assert runner.invoke(app, ["info", str(path)]).exit_code == 0


@pytest.mark.parametrize("value", [NAN, float("inf")])
def test_non_finite_weights_are_refused_at_load(tiny_checkpoint: Path, tiny_data: Path, tmp_path: Path,
                                                value: float) -> None:
    def poison(state: dict[str, torch.Tensor]) -> None:
        state["classifier.bias"][1] = value

    path = _rewrite(tiny_checkpoint, tmp_path / "nan.safetensors", {}, poison)
    message = _one_error(["predict", str(_image(tiny_data)), "-c", str(path)])
    assert message == f"{path}: not a valid smadlrp checkpoint: tensor classifier.bias holds NaN or infinity"


def test_a_nan_score_is_never_a_decision(tiny_checkpoint: Path, tiny_data: Path) -> None:
    """A model whose output overflows to NaN scores: refused naming the image, never "bona fide"."""
    model, meta = load_checkpoint(tiny_checkpoint)
    with torch.no_grad():
        model.classifier.weight.fill_(3e38)  # finite weights, infinite logits, NaN softmax
    image = _image(tiny_data)
    with pytest.raises(SmadlrpError) as caught:
        score_files(model, meta, [image], batch_size=2, device=torch.device("cpu"))
    assert caught.value.message == f"{image}: its score is NaN or infinity: the model output cannot be evaluated"


@pytest.mark.parametrize("command", ["predict", "explain"])
def test_predict_and_explain_refuse_a_nan_output(command: str, tiny_checkpoint: Path, tiny_data: Path,
                                                 tmp_path: Path) -> None:
    """A valid, finite std so small that the normalised pixels overflow: the CLI says NaN, never "bona fide"."""
    checkpoint = _rewrite(tiny_checkpoint, tmp_path / "tiny-std.safetensors", {"std": [1e-40, 1e-40, 1e-40]})
    image = _image(tiny_data)
    line = _one_error([command, str(image), "-c", str(checkpoint), *(["--out", str(tmp_path / "x")]
                                                                      if command == "explain" else [])])
    assert line == f"{image}: its score is NaN or infinity: the model output cannot be evaluated"


# ---- import-model: what it writes passes the same checks; what it cannot read is said plainly -------------------

@pytest.fixture(scope="module")
def state_pth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model, _ = build_model("vgg_compact", 2, "none")
    path = tmp_path_factory.mktemp("pth") / "state.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize(("options", "message"), [
    (["--image-size", "1000000"], "--image-size: 1000000 is not a whole number of pixels in 16..4096"),
    (["--classes", "morph,morph"], "--classes: ['morph', 'morph'] is not a list of at least 2 distinct non-empty "
                                   "names"),
    (["--attack-class", "print"], "--attack-class: 'print' is not one of the class names ['bonafide', 'morph']"),
])
def test_import_model_writes_no_invalid_checkpoint(state_pth: Path, tmp_path: Path, options: list[str],
                                                   message: str) -> None:
    out = tmp_path / "out.safetensors"
    args = ["import-model", str(state_pth), "--arch", "vgg_compact", "--out", str(out), *options]
    assert _one_error(args, code=2) == message
    assert not out.exists()


def _truncated(state_pth: Path, path: Path) -> None:
    path.write_bytes(state_pth.read_bytes()[:2000])


def _truncated_legacy(state_pth: Path, path: Path) -> None:
    model, _ = build_model("vgg_compact", 2, "none")
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:2000])


@pytest.mark.parametrize(("make", "message"), [
    (lambda s, p: p.write_text("hi\n"), "not a PyTorch model file (neither a torch.save zip archive nor a pickle)"),
    (lambda s, p: p.write_text("import torch\n"),
     "not a PyTorch model file (neither a torch.save zip archive nor a pickle)"),
    (lambda s, p: p.write_bytes(b""), "an empty file, not a PyTorch model"),
    (_truncated, "a damaged or truncated PyTorch file (PytorchStreamReader failed reading zip archive"),
    (_truncated_legacy, "a damaged or truncated PyTorch file ("),
], ids=["text", "python-text", "empty", "truncated", "truncated-legacy"])
@pytest.mark.parametrize("trust", [[], ["--trust-pickle"]], ids=["", "trusted"])
def test_import_model_tells_garbage_from_pickled_objects(state_pth: Path, tmp_path: Path,
                                                         make: Callable[[Path, Path], None], message: str,
                                                         trust: list[str]) -> None:
    source = tmp_path / "x.pth"
    make(state_pth, source)
    before = source.read_bytes()
    out = tmp_path / "y.safetensors"
    line = _one_error(["import-model", str(source), "--arch", "vgg_compact", "--out", str(out), *trust])
    assert line.startswith(f"{source}: {message}") and len(line) < len(str(source)) + 150
    assert "pickle" not in line.replace("nor a pickle", "")
    assert source.read_bytes() == before and not out.exists()


# ---- D14: tampered resume states ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_folder(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    result = runner.invoke(app, ["finetune", "--data", str(tiny_data), "--arch", "vgg_compact", "--image-size",
                                 "32", "--weights", "none", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


TAMPERED: list[tuple[str, Callable[[dict[str, Any], dict[str, torch.Tensor]], None], str]] = [
    ("no-optim-scalars", lambda d, t: d.pop("optim_scalars"), "optim_scalars is missing"),
    ("no-rng", lambda d, t: t.pop("rng/torch"), "tensor rng/torch is missing"),
    ("unknown-config-key", lambda d, t: d["config"].update(colour="red"), "config has an unknown key 'colour'"),
    ("epoch-text", lambda d, t: d["state"].update(epoch="x"), "state.epoch is 'x', not a whole number >= 0"),
    ("lr-text", lambda d, t: d["config"].update(lr="fast"), "config.lr is 'fast', not of type float"),
    ("lr-inf", lambda d, t: d["config"].update(lr=float("inf")), "config: --lr inf: must be a finite number > 0"),
    ("history-row", lambda d, t: d["state"]["history"][0].update(val_loss="x"),
     "state.history[0].val_loss is 'x', not of type float"),
    ("other-arch", lambda d, t: d["config"].update(arch="resnet18"),
     "its model tensors do not fit resnet18 (first mismatch: "),
    ("bad-rng", lambda d, t: t.update({"rng/torch": torch.zeros(3, dtype=torch.uint8)}), ""),
]


@pytest.mark.parametrize(("tamper", "problem"), [(t, p) for _, t, p in TAMPERED], ids=[n for n, _, _ in TAMPERED])
def test_tampered_resume_state_is_refused(run_folder: Path, tmp_path: Path,
                                          tamper: Callable[[dict[str, Any], dict[str, torch.Tensor]], None],
                                          problem: str) -> None:
    folder = tmp_path / "run"
    shutil.copytree(run_folder, folder)
    path = folder / RESUME_FILE
    with safe_open(str(path), "pt") as fh:
        doc = json.loads(fh.metadata()["smadlrp"])
    tensors = load_file(str(path))
    tamper(doc, tensors)
    save_file(tensors, str(path), metadata={"smadlrp": json.dumps(doc)})
    before = path.read_bytes()
    message = _one_error(["finetune", "--resume", str(folder), "--epochs", "2", "--device", "cpu"])
    assert message.startswith(f"{path}: not a valid smadlrp resume state: {problem}"), message
    assert path.read_bytes() == before


# ---- D18: non-finite patterns and training options ------------------------------------------------------------

def test_nan_patterns_with_the_right_fingerprint_are_refused(tiny_checkpoint: Path, tiny_data: Path,
                                                             tmp_path: Path) -> None:
    model, _ = load_checkpoint(tiny_checkpoint)
    sets = fit_patterns(canonize(model, share_weights=True), [torch.randn(4, 3, 32, 32)], ("positive",))
    name = sorted(sets["positive"].patterns)[0]
    sets["positive"].patterns[name][0] = NAN
    path = tmp_path / "patterns.safetensors"
    save_patterns(path, sets, {FINGERPRINT_KEY: weights_fingerprint(model.state_dict())})
    before = path.read_bytes()
    message = _one_error(["explain", str(_image(tiny_data)), "-c", str(tiny_checkpoint), "--patterns", str(path),
                          "--rule", "patternnet", "--out", str(tmp_path / "out")])
    assert message == f"{path} is a damaged pattern file (tensor positive/{name} holds NaN or infinity)"
    assert path.read_bytes() == before


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--lr", "inf", "--lr inf: must be a finite number > 0"),
    ("--lr", "nan", "--lr nan: must be a finite number > 0"),
    ("--weight-decay", "-5", "--weight-decay -5.0: must be a finite number >= 0"),
    ("--weight-decay", "inf", "--weight-decay inf: must be a finite number >= 0"),
])
def test_non_finite_training_options_are_refused(tiny_data: Path, tmp_path: Path, option: str, value: str,
                                                 message: str) -> None:
    out = tmp_path / "run"
    args = ["finetune", "--data", str(tiny_data), "--weights", "none", "--image-size", "32", "--device", "cpu",
            "--out", str(out), option, value]
    assert _one_error(args, code=2) == message


def test_checkpoint_meta_validate_is_what_saving_checks(tmp_path: Path) -> None:
    model, _ = build_model("vgg_compact", 2, "none")
    meta = CheckpointMeta("vgg_compact", ["bonafide", "morph"], "morph", 5000, [0.5] * 3, [0.5] * 3, "none")
    from smadlrp.detector.checkpoint import save_checkpoint

    with pytest.raises(SmadlrpError, match="not a valid smadlrp checkpoint: input_size: 5000 is not"):
        save_checkpoint(tmp_path / "x.safetensors", model, meta)
    assert not (tmp_path / "x.safetensors").exists()
