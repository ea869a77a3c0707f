"""Start N real worker processes (one per rank, gloo on 127.0.0.1) the way a launcher does, and wait.

Each worker gets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in its environment, like the
``deepspeed`` launcher sets them; a failure in any rank fails the run with that rank's output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from localsgd_ds.runtime import free_port


def run_ranks(
    argv: list[str],
    nprocs: int,
    *,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
) -> list[str]:
    """Run ``python *argv`` as ranks 0..nprocs-1 of one gloo world; return each rank's output."""
    port = free_port()
    procs = []
    for rank in range(nprocs):
        rank_env = dict(os.environ, **(env or {}))
        rank_env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nprocs),
            LOCAL_SIZE=str(nprocs),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join(
                [str(Path(__file__).resolve().parents[1]), rank_env.get("PYTHONPATH", "")]
            ),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, *argv],
                env=rank_env,
                cwd=cwd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, p in enumerate(procs):
        if p.returncode != 0:
            raise AssertionError(f"rank {rank} exited with {p.returncode}:\n{outputs[rank][-6000:]}")
    return outputs
