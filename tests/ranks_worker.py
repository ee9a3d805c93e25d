"""Run under torchrun by tests/test_distributed.py: each job runs on every rank and writes what it saw.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ranks_worker.py OUT JOB[:ARG] ...

One process group serves every job (the commands find it running and reuse it); each job writes
OUT/<job>.<rank>.json with its result, so the test can compare it with a single-process run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from typer.testing import CliRunner

from smadlrp.cli import app
from smadlrp.core import distributed

torch.set_num_threads(1)


def core(ranks: distributed.Ranks) -> dict[str, Any]:
    """The collectives on small known inputs."""
    shard = ranks.shard(10, block=3)
    sums = torch.tensor([1.0 + ranks.rank, 1e-17], dtype=torch.float64)
    ranks.all_reduce_sum_([sums])
    try:
        with ranks.shared_failure():
            if ranks.rank == 1:
                raise distributed.SmadlrpError("bad image only here", exit_code=3)
        shared = None
    except distributed.RankError as exc:
        shared = [exc.origin, exc.message, exc.exit_code]
    return {"shard": shard, "merged": ranks.gather_by_position(shard, [f"x{i}" for i in shard]),
            "sums": sums.tolist(), "broadcast": ranks.broadcast(f"from {ranks.rank}"),
            "total": ranks.sum([ranks.rank + 0.5]), "shared": shared}


def cli(args: list[str]) -> dict[str, Any]:
    """One smadlrp command line, in process: its exit code and output."""
    result = CliRunner().invoke(app, args)
    return {"exit_code": result.exit_code, "output": result.output}


def main() -> None:
    out = Path(sys.argv[1])
    with distributed.session("cpu") as ranks:
        for spec in sys.argv[2:]:
            name, _, arg = spec.partition(":")
            result = core(ranks) if name == "core" else cli(json.loads(arg))
            (out / f"{name}.{ranks.rank}.json").write_text(json.dumps(result), encoding="utf-8")
            ranks.barrier()


if __name__ == "__main__":
    main()
