"""Several processes under torchrun (two gloo ranks on the CPU) give what one process gives.

One torchrun launch runs every job of tests/ranks_worker.py; the tests compare its results with single-process
runs of the same commands.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from smadlrp.core import distributed

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "ranks_worker.py"
TIMEOUT_S = 20  # the collective timeout of the two ranks


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run every job on two ranks once; the folder of their results."""
    out = tmp_path_factory.mktemp("ranks")
    jobs = ["core"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           distributed.TIMEOUT_ENV: str(TIMEOUT_S), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "--monitor-interval=0.1", str(WORKER), str(out), *jobs],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def results(folder: Path, job: str) -> list[dict[str, Any]]:
    return [json.loads((folder / f"{job}.{rank}.json").read_text(encoding="utf-8")) for rank in (0, 1)]


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
