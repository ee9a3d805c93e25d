"""Several processes under torchrun (two gloo ranks on the CPU) give what one process gives.

One torchrun launch runs every job of tests/ranks_worker.py; the tests compare its results with single-process
runs of the same commands.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from smadlrp.cli import app
from smadlrp.core import distributed
from smadlrp.core.container import read_tensors
from smadlrp.data.synthetic.generator import SynthConfig, generate_dataset
from smadlrp.detector.checkpoint import load_checkpoint
from smadlrp.lrp.patterns import load_patterns

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "ranks_worker.py"
TIMEOUT_S = 20  # the collective timeout of the two ranks
runner = CliRunner()


def command_lines(data: Path, checkpoint: Path, sets: Path, out: Path) -> dict[str, list[str]]:
    """The commands run on two ranks, and some of them again in one process writing into `out`; `sets` holds
    the synthetic set with artifact masks and the set with an unreadable image."""
    common = ["--checkpoint", str(checkpoint), "--data", str(data), "--device", "cpu"]
    train = ["finetune", "--weights", "none", "--epochs", "1", "--batch-size", "4", "--device", "cpu"]
    return {
        "finetune": [*train, "--data", str(data), "--out", f"{out}/run", "--json", f"{out}/finetune.json"],
        "resume": ["finetune", "--resume", f"{out}/run", "--epochs", "2", "--device", "cpu"],
        "broken": [*train, "--data", str(sets / "broken"), "--out", f"{out}/broken-run"],
        "predict": ["predict", str(data / "test"), "--checkpoint", str(checkpoint), "--threshold", "0.5",
                    "--batch-size", "3", "--device", "cpu", "--csv", f"{out}/predict.csv", "--json",
                    f"{out}/predict.json"],
        "refused": ["synth", f"{out}/synthetic"],
        "explain": ["explain", str(data / "test" / "morph"), "--checkpoint", str(checkpoint), "--rule", "epsilon",
                    "--rule", "gamma", "--batch-size", "3", "--save-raw", "--device", "cpu", "--out", f"{out}/explain",
                    "--json", f"{out}/explain.json"],
        "compare": ["compare-rules", "--checkpoint", str(checkpoint), "--data", str(sets / "synthetic"),
                    "--rule", "epsilon", "--max-images", "12", "--batch-size", "4", "--patch-size", "4",
                    "--steps", "5", "--device", "cpu", "--out", f"{out}/compare", "--json", f"{out}/compare.json"],
        "fit": ["fit-patterns", *common, "--kind", "both", "--batch-size", "4", "--out", f"{out}/patterns.safetensors",
                "--json", f"{out}/fit.json"],
        "evaluate": ["evaluate", *common, "--batch-size", "3", "--threshold", "val-eer", "--scores",
                     f"{out}/scores.csv", "--json", f"{out}/evaluate.json"],
        "lora": [*train, "--arch", "swin_t", "--lora", "2", "--image-size", "32", "--data", str(data),
                 "--out", f"{out}/lora-run"],
        "frozen": ["finetune", "--arch", "resnet18", "--frozen", "--head", "svm", "--weights", "none",
                   "--image-size", "32", "--batch-size", "4", "--data", str(data), "--device", "cpu",
                   "--out", f"{out}/frozen-run"],
    }


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, tiny_checkpoint: Path) -> Path:
    """Run every job on two ranks once; the folder of their results."""
    out, sets = tmp_path_factory.mktemp("ranks"), tmp_path_factory.mktemp("sets")
    generate_dataset(sets / "synthetic", SynthConfig(identities=8, image_size=32, seed=0), workers=1)
    broken = shutil.copytree(tiny_data, sets / "broken")  # one unreadable image, in rank 1's validation share
    corrupt = broken / "val" / "bonafide" / "val_bonafide_05z.jpg"  # its header reads, its pixels do not
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:-10])
    jobs = ["core", *(f"{name}:{json.dumps(args)}" for name, args in
                      command_lines(tiny_data, tiny_checkpoint, sets, out).items())]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           distributed.TIMEOUT_ENV: str(TIMEOUT_S), "OMP_NUM_THREADS": "1", "SMADLRP_CACHE": str(out / "cache")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "--monitor-interval=0.1", str(WORKER), str(out), *jobs],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def results(folder: Path, job: str) -> list[dict[str, Any]]:
    return [json.loads((folder / f"{job}.{rank}.json").read_text(encoding="utf-8")) for rank in (0, 1)]


@pytest.mark.slow
def test_collectives_on_two_ranks(two_ranks: Path) -> None:
    first, second = results(two_ranks, "core")
    assert first["shard"] == [0, 1, 2, 6, 7, 8] and second["shard"] == [3, 4, 5, 9]
    for seen in (first, second):
        assert seen["merged"] == [f"x{i}" for i in range(10)]
        assert seen["sums"] == [3.0, 2e-17]  # float64: the tiny term survives
        assert seen["broadcast"] == "from 0"
        assert seen["total"] == [2.0]
        assert seen["shared"] == [1, "rank 1: bad image only here", 3]  # both ranks raise rank 1's error


def test_single_process_ranks_are_no_ops() -> None:
    ranks = distributed.current()
    assert not ranks.distributed and ranks.shard(5, block=2) == [0, 1, 2, 3, 4]
    assert ranks.gather_by_position([1, 0], ["b", "a"]) == ["a", "b"]
    with pytest.raises(distributed.SmadlrpError, match="only here"), ranks.shared_failure():
        raise distributed.SmadlrpError("only here")


@pytest.mark.parametrize(("rank", "world", "message"), [("0", "x", "integers"), ("2", "2", "not a valid place")])
def test_bad_launch_variables_are_refused(monkeypatch: pytest.MonkeyPatch, rank: str, world: str,
                                          message: str) -> None:
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(distributed.UsageError, match=message):
        distributed.launched_ranks()


def test_shards_cover_every_position_once() -> None:
    for world in (1, 2, 3, 8):
        for n in (0, 1, 7, 64):
            shards = [distributed.Ranks(rank, world).shard(n, block=4) for rank in range(world)]
            assert sorted(i for s in shards for i in s) == list(range(n))


def single_process(name: str, data: Path, checkpoint: Path, out: Path, two_ranks: Path) -> None:
    """Run job `name` in this process with `out` as its output folder."""
    result = runner.invoke(app, command_lines(data, checkpoint, two_ranks.parent / "sets0", out)[name])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_fit_patterns_on_two_ranks_equals_one_process(two_ranks: Path, tiny_data: Path, tiny_checkpoint: Path,
                                                       tmp_path: Path) -> None:
    assert [r["exit_code"] for r in results(two_ranks, "fit")] == [0, 0]
    single_process("fit", tiny_data, tiny_checkpoint, tmp_path, two_ranks)
    shared, shared_meta = load_patterns(two_ranks / "patterns.safetensors")
    alone, alone_meta = load_patterns(tmp_path / "patterns.safetensors")
    assert shared_meta["world_size"] == 2 and alone_meta["world_size"] == 1
    assert shared_meta["images"] == alone_meta["images"] == 16
    for kind in ("all", "positive"):
        assert shared[kind].stats == alone[kind].stats  # samples, active shares and fallbacks of all 16 images
        for layer, pattern in alone[kind].patterns.items():
            error = (shared[kind].patterns[layer] - pattern).double().norm() / pattern.double().norm()
            assert error <= 1e-6, (kind, layer, float(error))
    assert json.loads((two_ranks / "fit.json").read_text())["world_size"] == 2
    lines = [r["output"] for r in results(two_ranks, "fit")]
    assert "rank 0/2: fitting on 8 of 16 images" in lines[0] and "rank 1/2: fitting on 8 of 16 images" in lines[1]
    assert "wrote" in lines[0] and "wrote" not in lines[1]  # rank 0 alone prints the tables


@pytest.mark.slow
def test_evaluate_on_two_ranks_equals_one_process(two_ranks: Path, tiny_data: Path, tiny_checkpoint: Path,
                                                   tmp_path: Path) -> None:
    outputs = [r["output"] for r in results(two_ranks, "evaluate")]
    assert [r["exit_code"] for r in results(two_ranks, "evaluate")] == [0, 0], outputs
    single_process("evaluate", tiny_data, tiny_checkpoint, tmp_path, two_ranks)
    assert (two_ranks / "scores.csv").read_bytes() == (tmp_path / "scores.csv").read_bytes()
    shared = json.loads((two_ranks / "evaluate.json").read_text())
    alone = json.loads((tmp_path / "evaluate.json").read_text())
    assert (shared.pop("world_size"), alone.pop("world_size")) == (2, 1)
    assert shared == alone
    # batches of 3 dealt in turn: rank 0 takes 9 and rank 1 takes 7 of the 16 images of each split
    assert "rank 0/2: scoring 9 of 16 test images" in outputs[0] and "APCER" in outputs[0]
    assert "rank 1/2: scoring 7 of 16 test images" in outputs[1] and "APCER" not in outputs[1]


@pytest.mark.slow
def test_predict_on_two_ranks_equals_one_process(two_ranks: Path, tiny_data: Path, tiny_checkpoint: Path,
                                                  tmp_path: Path) -> None:
    outputs = [r["output"] for r in results(two_ranks, "predict")]
    assert [r["exit_code"] for r in results(two_ranks, "predict")] == [0, 0], outputs
    single_process("predict", tiny_data, tiny_checkpoint, tmp_path, two_ranks)
    assert (two_ranks / "predict.csv").read_bytes() == (tmp_path / "predict.csv").read_bytes()
    shared = json.loads((two_ranks / "predict.json").read_text())
    alone = json.loads((tmp_path / "predict.json").read_text())
    assert (shared.pop("world_size"), alone.pop("world_size")) == (2, 1) and shared == alone
    assert "rank 1/2: scoring 7 of 16 images" in outputs[1] and "decision" not in outputs[1]


@pytest.mark.slow
def test_finetune_on_two_ranks_writes_one_run(two_ranks: Path, tmp_path: Path) -> None:
    outputs = [r["output"] for r in results(two_ranks, "finetune")]
    assert [r["exit_code"] for r in results(two_ranks, "finetune")] == [0, 0], outputs
    run = two_ranks / "run"
    assert sorted(p.name for p in run.iterdir()) == ["best.safetensors", "history.json", "last.safetensors",
                                                     "resume.safetensors", "training-curves.png"]
    _, meta = load_checkpoint(run / "best.safetensors")
    assert meta.training["world_size"] == 2 and meta.training["batch_size"] == 4
    assert meta.metrics["train"]["samples"] == 16  # 8 training images on each rank, counted together
    assert json.loads((two_ranks / "finetune.json").read_text())["world_size"] == 2
    assert "rank 0/2: training on 8 of 16 images (2 per batch of 4), validating on 8 of 16" in outputs[0]
    assert "rank 1/2: training on 8 of 16 images (2 per batch of 4), validating on 8 of 16" in outputs[1]
    assert "best epoch 1" in outputs[0] and "best epoch" not in outputs[1]
    # resumed on two ranks, then on one process: the history carries on
    assert [r["exit_code"] for r in results(two_ranks, "resume")] == [0, 0]
    history = json.loads((run / "history.json").read_text())["epochs"]
    assert [row["epoch"] for row in history] == [1, 2]
    copy = shutil.copytree(run, tmp_path / "run")
    again = runner.invoke(app, ["finetune", "--resume", str(copy), "--epochs", "3", "--device", "cpu"])
    assert again.exit_code == 0, again.output
    assert "trained on 2 process(es) and continues on 1" in again.output
    assert [row["epoch"] for row in json.loads((copy / "history.json").read_text())["epochs"]] == [1, 2, 3]


@pytest.mark.slow
def test_an_unreadable_image_on_one_rank_ends_both_with_one_line(two_ranks: Path) -> None:
    first, second = results(two_ranks, "broken")
    assert (first["exit_code"], second["exit_code"]) == (1, 1)
    errors = [line for line in first["output"].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 1: ") and "val_bonafide_05z.jpg" in errors[0]
    assert "not a readable image" in errors[0]
    assert "error" not in second["output"]  # rank 0 says it for both
    assert not (two_ranks / "broken-run" / "best.safetensors").exists()


@pytest.mark.slow
def test_explain_on_two_ranks_writes_the_files_of_one_process(two_ranks: Path, tiny_data: Path,
                                                               tiny_checkpoint: Path, tmp_path: Path) -> None:
    outputs = [r["output"] for r in results(two_ranks, "explain")]
    assert [r["exit_code"] for r in results(two_ranks, "explain")] == [0, 0], outputs
    single_process("explain", tiny_data, tiny_checkpoint, tmp_path, two_ranks)
    shared, alone = two_ranks / "explain", tmp_path / "explain"
    names = sorted(p.name for p in alone.iterdir())
    assert sorted(p.name for p in shared.iterdir()) == names and len(names) == 8 * 5 + 1
    for name in names:
        if name.endswith(".png"):
            assert (shared / name).read_bytes() == (alone / name).read_bytes(), name
    raw_shared, raw_alone = (read_tensors(folder / "relevance.safetensors") for folder in (shared, alone))
    assert sorted(raw_shared) == ["epsilon", "gamma"]
    assert all(torch.equal(raw_shared[k], raw_alone[k]) for k in raw_alone)
    report = {k: v for k, v in json.loads((two_ranks / "explain.json").read_text()).items() if k != "out"}
    expected = {k: v for k, v in json.loads((tmp_path / "explain.json").read_text()).items() if k != "out"}
    assert (report.pop("world_size"), expected.pop("world_size")) == (2, 1) and report == expected
    assert "rank 0/2: explaining 5 of 8 images" in outputs[0] and "rank 1/2: explaining 3 of 8 images" in outputs[1]


@pytest.mark.slow
def test_compare_rules_on_two_ranks_averages_like_one_process(two_ranks: Path, tiny_data: Path,
                                                              tiny_checkpoint: Path, tmp_path: Path) -> None:
    outputs = [r["output"] for r in results(two_ranks, "compare")]
    assert [r["exit_code"] for r in results(two_ranks, "compare")] == [0, 0], outputs
    single_process("compare", tiny_data, tiny_checkpoint, tmp_path, two_ranks)
    report = json.loads((two_ranks / "compare.json").read_text())
    expected = json.loads((tmp_path / "compare.json").read_text())
    assert report["world_size"] == 2 and report["images"] == expected["images"]
    assert report["localisation_note"] is None  # the morphs' artifact masks were used
    for shared, alone in zip(report["methods"], expected["methods"], strict=True):
        del shared["ms_per_image"], alone["ms_per_image"]  # timings differ, every other number is the same
        assert shared == alone
    assert "rank 1/2: comparing on 4 of 12 images" in outputs[1]


@pytest.mark.slow
def test_a_command_without_distribution_is_refused_once(two_ranks: Path) -> None:
    first, second = results(two_ranks, "refused")
    assert (first["exit_code"], second["exit_code"]) == (2, 2)
    assert first["output"].strip() == "error: rank 0: `smadlrp synth` runs in one process: start it without torchrun"
    assert second["output"] == "" and not (two_ranks / "synthetic").exists()


# ---- a rank lost during training (the DDP step) ------------------------------------------------------------------
GLOO_LOST = "[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:5814: " \
            "Connection reset by peer"
GLOO_TIMEOUT = "[/__w/pytorch/third_party/gloo/gloo/transport/unbound_buffer.cc:78] Timed out waiting 60000ms " \
               "for recv operation to complete"


@pytest.mark.parametrize(("message", "line"), [
    (GLOO_LOST, "rank 0/2: lost contact with the other ranks; another rank has probably failed (see its error)"),
    (GLOO_TIMEOUT, f"rank 0/2: no answer from the other ranks within {TIMEOUT_S} s (SMADLRP_DIST_TIMEOUT); another "
                   "rank has probably failed (see its error)"),
])
def test_gloo_failures_in_a_training_step_are_the_documented_lines(message: str, line: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(distributed.TIMEOUT_ENV, str(TIMEOUT_S))
    with pytest.raises(distributed.SmadlrpError) as caught, distributed.Ranks(0, 2).exchanging():
        raise RuntimeError(message)
    assert caught.value.message == line and caught.value.exit_code == 1


def test_other_errors_of_a_training_step_pass_unchanged() -> None:
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes"), distributed.Ranks(0, 2).exchanging():
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 9x2)")


def _train_one_rank(rank: int, port: int, data: Path, out: Path, fault: str) -> None:
    """Fine-tune as rank `rank` of two (a forked process); rank 1 dies (`fault` "kill") or stops answering
    ("stop") in its first training step. Writes OUT/rank<rank>.json with the exit code and the output."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1", **{distributed.TIMEOUT_ENV: "2"})
    if rank == 1:
        def fail(*args: Any, **kwargs: Any) -> Any:
            if fault == "kill":
                os._exit(9)
            time.sleep(120)

        torch.nn.functional.cross_entropy = fail  # type: ignore[assignment]  # the loss of the first step
    result = CliRunner().invoke(app, ["finetune", "--data", str(data), "--weights", "none", "--epochs", "1",
                                      "--batch-size", "4", "--device", "cpu", "--out", str(out / f"run{rank}")])
    (out / f"rank{rank}.json").write_text(json.dumps({"exit_code": result.exit_code, "output": result.output}))


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "why"), [
    ("kill", "lost contact with the other ranks"),
    ("stop", "no answer from the other ranks within 2 s (SMADLRP_DIST_TIMEOUT)"),
])
def test_a_rank_lost_in_a_training_step_gives_the_documented_line(fault: str, why: str, tiny_data: Path,
                                                                  tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fork = multiprocessing.get_context("fork")
    ranks = [fork.Process(target=_train_one_rank, args=(rank, port, tiny_data, tmp_path, fault)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    try:
        ranks[0].join(timeout=60)
    finally:
        for process in ranks:
            process.kill()
            process.join()
    survivor = json.loads((tmp_path / "rank0.json").read_text())
    errors = [line for line in survivor["output"].splitlines() if line.startswith("error")]
    assert survivor["exit_code"] == 1 and errors == [f"error: rank 0/2: {why}; another rank has probably failed "
                                                     "(see its error)"], survivor["output"]


@pytest.mark.slow
def test_lora_finetune_on_two_ranks_writes_one_run(two_ranks: Path) -> None:
    outputs = [r["output"] for r in results(two_ranks, "lora")]
    assert [r["exit_code"] for r in results(two_ranks, "lora")] == [0, 0], outputs
    run = two_ranks / "lora-run"
    assert sorted(p.name for p in run.iterdir()) == ["best.safetensors", "history.json", "last.safetensors",
                                                     "resume.safetensors", "training-curves.png"]
    _, meta = load_checkpoint(run / "best.safetensors")
    assert meta.training["world_size"] == 2 and meta.training["lora"]["rank"] == 2


@pytest.mark.slow
def test_frozen_features_on_two_ranks_equal_one_process(two_ranks: Path, tiny_data: Path, tiny_checkpoint: Path,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Extraction shards over the ranks and gathers in dataset order: the same cache files and the same head."""
    assert [r["exit_code"] for r in results(two_ranks, "frozen")] == [0, 0]
    monkeypatch.setenv("SMADLRP_CACHE", str(tmp_path / "cache"))
    single_process("frozen", tiny_data, tiny_checkpoint, tmp_path, two_ranks)
    shared = sorted((two_ranks / "cache" / "features").glob("*.safetensors"))
    alone = sorted((tmp_path / "cache" / "features").glob("*.safetensors"))
    assert [p.name for p in shared] == [p.name for p in alone] and len(alone) == 2  # train and val
    for a, b in zip(shared, alone, strict=True):
        assert all(torch.equal(t, read_tensors(b)[k]) for k, t in read_tensors(a).items())
    heads = [read_tensors(folder / "frozen-run" / "best.safetensors") for folder in (two_ranks, tmp_path)]
    assert torch.equal(heads[0]["fc.weight"], heads[1]["fc.weight"])
