"""Checkpoint format: round trip, atomic writes, and every refusal a user can meet."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from smadlrp.cli import app
from smadlrp.core.container import read_document
from smadlrp.core.errors import SmadlrpError
from smadlrp.detector.checkpoint import CHECKPOINT_SCHEMA, CheckpointMeta, load_checkpoint, save_checkpoint
from smadlrp.detector.models import build_model

runner = CliRunner()


def test_round_trip_keeps_function_and_metadata(tiny_checkpoint: Path) -> None:
    model, meta = load_checkpoint(tiny_checkpoint)
    assert meta.schema == CHECKPOINT_SCHEMA and meta.architecture == "vgg_compact"
    assert meta.attack_index == 1 and meta.input_size == 32
    torch.manual_seed(0)
    reference, _ = build_model("vgg_compact", 2, "none")
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(model(x), reference.eval()(x))


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    model, _ = build_model("vgg_compact", 2, "none")
    meta = CheckpointMeta("vgg_compact", ["bonafide", "morph"], "morph", 64, [0.5] * 3, [0.5] * 3, "test")
    readable = save_checkpoint(tmp_path / "ok.safetensors", model, meta)
    umask = os.umask(0)
    os.umask(umask)
    assert readable.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it, not mkstemp's 0600
    readable.unlink()
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"old")

    class Boom(RuntimeError):
        pass

    def exploding_state_dict() -> dict[str, torch.Tensor]:
        raise Boom()

    model.state_dict = exploding_state_dict  # type: ignore[method-assign]
    with pytest.raises(Boom):
        save_checkpoint(target, model, meta)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def _write_with_doc(path: Path, doc: dict[str, object] | None, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path), metadata=None if doc is None else {"smadlrp": json.dumps(doc)})
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"\x80\x02}q\x00."), "not a safetensors file"),
        (lambda p: p.write_bytes(b""), "not a safetensors file"),
        (lambda p: _write_with_doc(p, None, {"a": torch.zeros(2)}), "without smadlrp metadata"),
        (lambda p: _write_with_doc(p, {"schema": "smadlrp.detector.checkpoint/99"}, {"a": torch.zeros(2)}),
         "unknown checkpoint schema"),
        (lambda p: _write_with_doc(p, {"schema": CHECKPOINT_SCHEMA, "architecture": "vgg_compact"},
                                   {"a": torch.zeros(2)}), "incomplete checkpoint metadata"),
    ],
)
def test_bad_files_are_refused(tmp_path: Path, make: object, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    make(path)  # type: ignore[operator]
    with pytest.raises(SmadlrpError, match=message):
        load_checkpoint(path)


def test_unknown_architecture_and_mismatched_tensors(tiny_checkpoint: Path, tmp_path: Path) -> None:
    doc = read_document(tiny_checkpoint)
    unknown = _write_with_doc(tmp_path / "u.safetensors", {**doc, "architecture": "vgg99"}, {"a": torch.zeros(1)})
    with pytest.raises(SmadlrpError, match="unknown architecture 'vgg99'"):
        load_checkpoint(unknown)
    wrong = _write_with_doc(tmp_path / "w.safetensors", doc, {"features.0.weight": torch.zeros(1)})
    with pytest.raises(SmadlrpError, match="does not hold vgg_compact weights|needs"):
        load_checkpoint(wrong)


def test_truncated_file_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_checkpoint.read_bytes()[:-100])
    with pytest.raises(SmadlrpError, match="truncated"):
        load_checkpoint(cut)


def test_info_prints_metadata_and_refuses_bad_files(tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["info", str(tiny_checkpoint)])
    assert result.exit_code == 0
    for text in ("vgg_compact", "smadlrp.detector.checkpoint/1", "morph", "random initialisation"):
        assert text in result.output
    (tmp_path / "x.pth").write_bytes(b"\x80\x02}q\x00.")
    bad = runner.invoke(app, ["info", str(tmp_path / "x.pth")])
    assert bad.exit_code == 1 and "not a safetensors file" in bad.output and "import-model" in bad.output
    assert "Traceback" not in bad.output


def test_import_model_needs_trust_for_whole_pickles(tmp_path: Path) -> None:
    model, _ = build_model("vgg_compact", 2, "none")
    torch.save(model, tmp_path / "whole.pth")
    torch.save(model.state_dict(), tmp_path / "state.pth")
    refused = runner.invoke(app, ["import-model", str(tmp_path / "whole.pth"), "--arch", "vgg_compact",
                                  "--out", str(tmp_path / "a.safetensors")])
    assert refused.exit_code == 1 and "--trust-pickle" in refused.output
    assert not (tmp_path / "a.safetensors").exists()
    for source, extra in (("whole.pth", ["--trust-pickle"]), ("state.pth", [])):
        out = tmp_path / f"{source}.safetensors"
        result = runner.invoke(app, ["import-model", str(tmp_path / source), "--arch", "vgg_compact", "--out",
                                     str(out), *extra])
        assert result.exit_code == 0, result.output
        loaded, meta = load_checkpoint(out)
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(loaded(x), model.eval()(x))
        assert meta.weights_source == f"imported from {source}"
    wrong = runner.invoke(app, ["import-model", str(tmp_path / "state.pth"), "--arch", "alexnet",
                                "--out", str(tmp_path / "b.safetensors")])
    assert wrong.exit_code == 1 and "does not hold alexnet weights" in wrong.output


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model"])
def test_import_model_unwraps_training_script_checkpoints_and_names_the_key(tmp_path: Path, key: str) -> None:
    torch.manual_seed(1)
    model, _ = build_model("vgg_compact", 2, "none")
    weights = {f"module.{k}": v for k, v in model.state_dict().items()}  # as saved from DataParallel
    torch.save({"epoch": 7, key: weights, "optimizer": {"lr": 0.01}}, tmp_path / "train.pth")
    out = tmp_path / "c.safetensors"
    result = runner.invoke(app, ["import-model", str(tmp_path / "train.pth"), "--arch", "vgg_compact", "--out",
                                 str(out), "--json", str(tmp_path / "c.json")])
    assert result.exit_code == 0, result.output
    assert f"using the weights under its '{key}' key" in result.output
    loaded, meta = load_checkpoint(out)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    assert meta.weights_source == f"imported from train.pth (key {key})"
    assert json.loads((tmp_path / "c.json").read_text())["key"] == key


def test_import_model_without_weights_lists_the_keys(tmp_path: Path) -> None:
    torch.save({"epoch": 7, "net": {"w": torch.ones(2)}, "best": 0.1}, tmp_path / "odd.pth")
    result = runner.invoke(app, ["import-model", str(tmp_path / "odd.pth"), "--arch", "vgg_compact", "--out",
                                 str(tmp_path / "d.safetensors")])
    assert result.exit_code == 1 and "state_dict, model_state_dict, model" in result.output
    assert "its keys: 'epoch', 'net', 'best'" in result.output


def test_info_shows_square_brackets_of_metadata(tmp_path: Path) -> None:
    model, source = build_model("vgg_compact", 2, "none")
    meta = CheckpointMeta("vgg_compact", ["bonafide", "morph"], "morph", 32, [0.5] * 3, [0.5] * 3,
                          "file [red]E[x y][/red]")
    save_checkpoint(tmp_path / "m.safetensors", model, meta)
    result = runner.invoke(app, ["info", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 0 and "file [red]E[x y][/red]" in " ".join(result.output.split())
