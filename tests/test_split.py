"""smadlrp split: subject-disjoint protocol files from FRLL-style folders, checked from the written file alone."""

from __future__ import annotations

import csv
import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from smadlrp.cli import app
from smadlrp.data.protocol import read_protocol

runner = CliRunner()


def _frll_folder(root: Path, subjects: int = 30, morphs_per_method: int = 40) -> dict[str, list[tuple[str, str]]]:
    """bonafide/NNN_03.png and NNN_08.png; amsl/ and opencv/ with NNN_MMM.png morphs of random pairs."""
    rng = random.Random(1)
    pixels = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    (root / "bonafide").mkdir(parents=True)
    for s in range(1, subjects + 1):
        for pose in ("03", "08"):
            Image.fromarray(pixels).save(root / "bonafide" / f"{s:03d}_{pose}.png")
    pairs: dict[str, list[tuple[str, str]]] = {}
    for method in ("amsl", "opencv"):
        (root / method).mkdir()
        chosen = set()
        while len(chosen) < morphs_per_method:
            a, b = rng.sample(range(1, subjects + 1), 2)
            chosen.add((f"{a:03d}", f"{b:03d}"))
        for a, b in chosen:
            Image.fromarray(pixels).save(root / method / f"{a}_{b}.png")
        pairs[method] = sorted(chosen)
    return pairs


def test_split_leaks_no_subject_and_counts_dropped_morphs(tmp_path: Path, tiny_checkpoint: Path) -> None:
    pairs = _frll_folder(tmp_path / "frll")
    out = tmp_path / "protocol.csv"
    result = runner.invoke(app, ["split", str(tmp_path / "frll"), "--out", str(out), "--seed", "5",
                                 "--json", str(tmp_path / "split.json")])
    assert result.exit_code == 0, result.output
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    # from the file alone: every subject in exactly one split
    where: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        for subject in row["subjects"].split(";"):
            where[subject].add(row["split"])
    assert all(len(splits) == 1 for splits in where.values())
    split_of = {s: next(iter(splits)) for s, splits in where.items()}
    assert len(split_of) == 30 and set(split_of.values()) == {"train", "val", "test"}
    # every bona fide image is kept; a morph is kept exactly when both contributors share a split
    assert Counter(r["label"] for r in rows)["bonafide"] == 60
    for method, made in pairs.items():
        crossing = sum(split_of[a] != split_of[b] for a, b in made)
        kept = [r for r in rows if r["morph_method"] == method]
        assert len(kept) == len(made) - crossing
        assert all(split_of[r["subjects"].split(";")[0]] == r["split"] for r in kept)
        report = json.loads((tmp_path / "split.json").read_text())
        assert report["dropped"][method] == crossing
    total = sum(report["dropped"].values())
    assert f"dropped {total} morph(s)" in result.output and total > 0
    # the written file is a protocol evaluate reads; the same seed writes the same file
    protocol = read_protocol(out)
    assert protocol.group_columns == ("morph_method", "subjects")
    again = runner.invoke(app, ["split", str(tmp_path / "frll"), "--out", str(tmp_path / "again.csv"), "--seed", "5"])
    assert again.exit_code == 0 and (tmp_path / "again.csv").read_text() == out.read_text()
    evaluated = runner.invoke(app, ["evaluate", "-c", str(tiny_checkpoint), "--protocol", str(out), "--by",
                                    "morph_method", "--threshold", "0.5", "--bootstrap", "0", "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "By morph_method" in evaluated.output and "subject(s) appear in more than one split" not in \
        evaluated.output


def test_split_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    _frll_folder(tmp_path / "frll", subjects=4, morphs_per_method=2)
    Image.new("RGB", (4, 4)).save(tmp_path / "frll" / "amsl" / "portrait.png")
    cases = [
        (["--out", str(tmp_path / "a.csv")], "portrait.png: the file name does not match the subject pattern"),
        (["--out", str(tmp_path / "b.csv"), "--ratios", "0.5,0.5"], "--ratios '0.5,0.5': three non-negative"),
        (["--out", str(tmp_path / "c.csv"), "--subject-regex", "[0-9]+"], "needs a capture group per subject id"),
        (["--out", str(tmp_path / "d.csv"), "--bonafide-dir", "raw"], "no bona fide folder 'raw'"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["split", str(tmp_path / "frll"), *args])
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code != 0 and len(errors) == 1 and message in errors[0], result.output


def test_split_reads_a_morph_set_through_its_manifest(tmp_path: Path) -> None:
    """A folder written by `smadlrp morph`: subjects from the manifest, the species as method, masks kept."""
    folder = tmp_path / "morphs"
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    lines = ["path,label,split,morph_type,identity_a,identity_b,contributor_a,contributor_b,alpha,method,mask_path,"
             "region_path"]
    for name in ("a", "b", "c", "d", "e", "f"):
        (folder / "bonafide").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / "bonafide" / f"{name}.png")
        lines.append(f"bonafide/{name}.png,bonafide,test,,{name},,,,,,,")
    (folder / "morph" / "complete").mkdir(parents=True)
    (folder / "masks" / "complete").mkdir(parents=True)
    for a, b in (("a", "b"), ("c", "d"), ("e", "f"), ("a", "f")):
        Image.fromarray(pixels).save(folder / "morph" / "complete" / f"{a}__{b}.png")
        Image.fromarray(pixels[..., 0]).save(folder / "masks" / "complete" / f"{a}__{b}.png")
        lines.append(f"morph/complete/{a}__{b}.png,morph,test,complete,{a},{b},bonafide/{a}.png,bonafide/{b}.png,"
                     f"0.5,landmark-delaunay/csv68/blend,masks/complete/{a}__{b}.png,")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    (folder / "morph.json").write_text("{}")
    out = tmp_path / "resplit.csv"
    result = runner.invoke(app, ["split", str(folder), "--out", str(out), "--ratios", "0.5,0,0.5", "--seed", "1"])
    assert result.exit_code == 0, result.output
    protocol = read_protocol(out)
    assert "mask_path" in protocol.group_columns and "region_path" in protocol.group_columns
    split_of: dict[str, str] = {}
    for row in protocol.rows:
        for subject in row.groups["subjects"].split(";"):
            assert split_of.setdefault(subject, row.split) == row.split  # subject-disjoint
        if row.label:
            assert row.groups["morph_method"] == "complete"
            assert (out.parent / row.groups["mask_path"]).is_file()
    assert sum(row.label == 0 for row in protocol.rows) == 6
    kept = {row.path.name for row in protocol.rows if row.label}
    assert all(len({split_of[s] for s in name[:-4].split("__")}) == 1 for name in kept)
