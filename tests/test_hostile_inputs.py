"""Hostile input files: configuration files, protocol files and score CSVs that are malformed, binary, huge or
hold odd file names give one short error line (or read back whole), never an internal error."""

from __future__ import annotations

import csv
import io
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from smadlrp.cli import app
from smadlrp.evaluation.scores import read_scores, scores_csv

runner = CliRunner()
HOSTILE_NAMES = ("x\rcr.png", "new\nline.png", "crlf\r\n.png", 'comma, "quoted".png', "plain.png", "end\r")


def _one_error_line(result: Result, code: int) -> str:
    """The single error line of a failed command, checked: exit `code`, short, not an internal error."""
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and len(errors[0]) < 300, result.stderr[:2000]
    assert "internal error" not in result.stderr
    return errors[0]


def _config_error(path: Path, content: bytes, args: list[str]) -> str:
    """Write `content` to `path`, run smadlrp with `args`, check one short error line and the file untouched."""
    path.write_bytes(content)
    line = _one_error_line(runner.invoke(app, args), 1)
    assert path.read_bytes() == content
    return line


# D11: output CSVs round-trip any file name.

def test_scores_csv_round_trips_names_with_cr_newline_comma_and_quote(tmp_path: Path) -> None:
    labels = np.array([0, 1, 0, 1, 1, 0])
    scores = np.array([0.1, 0.9, 1 / 3, 0.5, 0.75, 2e-7])
    file = tmp_path / "scores.csv"
    file.write_text(scores_csv([Path(n) for n in HOSTILE_NAMES], labels, scores, {"source": list(HOSTILE_NAMES)}),
                    newline="")
    with file.open(newline="") as fh:
        rows = list(csv.reader(fh))
    expected = [[name, ("bonafide", "morph")[y], repr(float(s)), name]
                for name, y, s in zip(HOSTILE_NAMES, labels, scores, strict=True)]
    assert rows == [["path", "label", "score", "source"], *expected]
    read = read_scores(file)
    assert read.labels.tolist() == labels.tolist() and read.scores.tolist() == scores.tolist()


def test_metrics_reads_back_evaluate_scores_of_an_image_named_with_a_carriage_return(
        tmp_path: Path, tiny_data: Path, tiny_checkpoint: Path) -> None:
    data = shutil.copytree(tiny_data, tmp_path / "data")
    folder = data / "test" / "bonafide"
    first = sorted(folder.iterdir())[0]
    first.rename(folder / "x\rcr.png")
    scores = tmp_path / "s.csv"
    done = runner.invoke(app, ["evaluate", "-c", str(tiny_checkpoint), "--data", str(data), "--device", "cpu",
                               "--threshold", "0.5", "--scores", str(scores)])
    assert done.exit_code == 0, done.output
    with scores.open(newline="") as fh:
        paths = [row["path"] for row in csv.DictReader(fh)]
    assert str(folder / "x\rcr.png") in paths and len(paths) == 16
    result = runner.invoke(app, ["metrics", str(scores)])
    assert result.exit_code == 0, result.output


def test_every_output_writer_quotes_a_carriage_return() -> None:
    from smadlrp.data.protocol import csv_writer, protocol_csv

    buffer = io.StringIO()
    csv_writer(buffer).writerow(["a\rb", "c"])
    assert buffer.getvalue() == '"a\rb",c\n'
    text = protocol_csv([{"path": "a\rb.png", "label": "morph", "split": "test"}], ["path", "label", "split"])
    assert list(csv.reader(io.StringIO(text, newline=""))) == [["path", "label", "split"], ["a\rb.png", "morph",
                                                                                            "test"]]


# D12: configuration files that are not UTF-8 TOML, or hold huge values.

def _deep(opening: str, closing: str, depth: int = 100_000) -> bytes:
    return f"threshold = {opening * depth}{closing * depth}\n".encode()


@pytest.mark.parametrize(("content", "why"), [
    (b'checkpoint = "x"\n# caf\xe9\n', "not UTF-8 text (byte 0xe9 on line 2)"),
    (b'\xef\xbb\xbfcheckpoint = "x"\n', "starts with a UTF-8 byte-order mark; save it without one"),
    (_deep("[", "]"), "arrays or tables nested too deeply to read"),
    (_deep("{a = ", "}"), "arrays or tables nested too deeply to read"),
], ids=["invalid-utf8", "bom", "deep-array", "deep-table"])
def test_a_config_file_that_is_not_utf8_toml_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         content: bytes, why: str) -> None:
    monkeypatch.chdir(tmp_path)
    line = _config_error(tmp_path / "smadlrp.toml", content, ["evaluate"])
    assert line == f"error: {tmp_path / 'smadlrp.toml'}: not a valid smadlrp configuration: {why}"


def test_a_pyproject_whose_tool_is_not_a_table_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    line = _config_error(tmp_path / "pyproject.toml", b"tool = 5\n", ["evaluate"])
    assert line == (f"error: {tmp_path / 'pyproject.toml'}: not a valid smadlrp configuration: "
                    "tool must be a table, got 5")


def test_a_pickle_given_as_config_is_one_line(tmp_path: Path) -> None:
    file = tmp_path / "settings.pkl"
    line = _config_error(file, pickle.dumps({"checkpoint": "x"}), ["--config", str(file), "evaluate"])
    assert line.startswith(f"error: {file}: not a valid smadlrp configuration: not UTF-8 text (byte 0x80")


@pytest.mark.parametrize(("text", "key"), [
    ('split = "{}"\n', "split"),
    ('fail-above = {{d-eer = "{}"}}\n', "fail-above.d-eer"),
    ('checkpoint = "{}"\n', "checkpoint"),
])
def test_a_huge_config_value_is_echoed_cut(tmp_path: Path, text: str, key: str) -> None:
    file = tmp_path / "smadlrp.toml"
    line = _config_error(file, text.format("9" * 1_000_000).encode(), ["--config", str(file), "evaluate"])
    assert line.startswith(f"error: {file}: {key}: ") and line.endswith("9...")


# D15: protocol rows whose path the operating system refuses.

@pytest.mark.parametrize(("path", "why"), [
    ("a\0.png", "'a\\x00.png': it holds a NUL byte"),
    ("n" * 300 + ".png", "File name too long"),
], ids=["nul", "too-long"])
def test_a_protocol_path_the_os_refuses_is_one_line_naming_the_row(tmp_path: Path, tiny_checkpoint: Path,
                                                                   path: str, why: str) -> None:
    protocol = tmp_path / "p.csv"
    content = f"path,label,split\nok.png,bonafide,test\n{path},morph,test\n".encode()
    protocol.write_bytes(content)
    (tmp_path / "ok.png").write_bytes(b"")
    result = runner.invoke(app, ["evaluate", "-c", str(tiny_checkpoint), "--protocol", str(protocol),
                                 "--device", "cpu"])
    line = _one_error_line(result, 1)
    assert line.startswith(f"error: {protocol}, line 3: unusable image path ") and line.endswith(why)
    assert protocol.read_bytes() == content
