"""A rank's process setup (localsgd_ds.runtime): its share of the CPU cores, decided by a pure function and
checked in ranks started by the real ``deepspeed`` launcher."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from localsgd_ds import runtime

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("cores", "ranks", "omp", "bound", "threads", "reason"),
    [
        (2, 2, None, False, 1, "2 cores / 2 local ranks"),  # the CPU quickstart: one thread each
        (16, 2, None, False, 8, "16 cores / 2 local ranks"),
        (3, 2, None, False, 1, "3 cores / 2 local ranks"),  # rounds down: never more threads than cores
        (2, 8, None, False, 1, "2 cores / 8 local ranks"),  # at least one
        (4, 1, None, False, 4, "4 cores / 1 local rank"),
        (4, 0, None, False, 4, "4 cores / 1 local rank"),
        (16, 2, "3", False, 3, "OMP_NUM_THREADS=3"),  # the user's setting wins
        (16, 2, "3", True, 3, "OMP_NUM_THREADS=3"),
        (16, 2, "", False, 8, "16 cores / 2 local ranks"),  # empty: unset
        (16, 2, "0", False, 8, "OMP_NUM_THREADS='0' is not a whole number >= 1, ignored; 16 cores / 2"),
        (16, 2, "four", False, 8, "OMP_NUM_THREADS='four' is not a whole number >= 1, ignored"),
        (4, 2, None, True, 4, "the launcher bound this rank to 4 cores"),  # its own cores already
        (1, 2, None, True, 1, "the launcher bound this rank to 1 core"),
    ],
)
def test_choose_cpu_threads(cores, ranks, omp, bound, threads, reason):
    choice = runtime.choose_cpu_threads(
        available_cores=cores, local_ranks=ranks, omp_num_threads=omp, bound=bound
    )
    assert choice.threads == threads
    assert choice.reason.startswith(reason), choice.reason


def test_local_ranks_from_the_launchers_variables():
    assert runtime.local_ranks({}) == 1
    assert runtime.local_ranks({"LOCAL_SIZE": "4"}) == 4  # deepspeed
    assert runtime.local_ranks({"LOCAL_WORLD_SIZE": "8"}) == 8  # torchrun
    assert runtime.local_ranks({"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}) == 2  # mpirun
    assert runtime.local_ranks({"LOCAL_SIZE": "", "LOCAL_WORLD_SIZE": "3"}) == 3


RANK_SCRIPT = """
import os, sys, torch
from localsgd_ds import runtime
choice = runtime.set_cpu_threads()
print(f"rank {os.environ.get('RANK', '-')} threads {torch.get_num_threads()} cores "
      f"{len(os.sched_getaffinity(0))} | {choice}", flush=True)
"""


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", *runtime.LOCAL_SIZE_VARIABLES)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _thread_lines(output: str) -> list[str]:
    return sorted(line for line in output.splitlines() if line.startswith("rank ") and " threads " in line)


@pytest.mark.slow
def test_ranks_started_by_the_deepspeed_launcher_get_their_share(tmp_path):
    """2 ranks of the real launcher, no OMP_NUM_THREADS: each runs torch with cores // 2 threads."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    launcher = (
        ["deepspeed"] if shutil.which("deepspeed") else [sys.executable, "-m", "deepspeed.launcher.runner"]
    )
    command = [*launcher, "--num_gpus", "2", "--master_port", str(runtime.free_port()), str(script)]
    done = subprocess.run(command, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    cores = len(os.sched_getaffinity(0))
    share = max(1, cores // 2)
    lines = _thread_lines(done.stdout + done.stderr)
    assert lines == [
        f"rank {r} threads {share} cores {cores} | {share} CPU thread{'s' if share > 1 else ''} per rank: "
        f"{cores} core{'s' if cores > 1 else ''} / 2 local ranks"
        for r in (0, 1)
    ], done.stdout[-4000:]


def test_a_rank_bound_to_its_own_cores_keeps_them():
    """A launcher that pinned the rank (here taskset, as numactl does for --bind_cores_to_rank) decides."""
    cores = os.sched_getaffinity(0)
    core = min(cores)
    env = dict(_clean_env(), LOCAL_SIZE="4")  # 4 ranks, but this one has a core of its own
    done = subprocess.run(
        ["taskset", "-c", str(core), sys.executable, "-c", RANK_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    # On a one-core machine taskset narrows nothing: there is no binding to see, only the share.
    reason = "the launcher bound this rank to 1 core" if len(cores) > 1 else "1 core / 4 local ranks"
    assert _thread_lines(done.stdout) == [f"rank - threads 1 cores 1 | 1 CPU thread per rank: {reason}"]


# -- collectives: the timeout holds on every group, and the error names the rank and what it waited for ----


@pytest.mark.parametrize(
    ("value", "environ", "seconds"),
    [
        (None, {}, runtime.DEFAULT_COLLECTIVE_TIMEOUT_S),
        (None, {"LOCALSGD_COLLECTIVE_TIMEOUT": "45"}, 45.0),
        (None, {"LOCALSGD_COLLECTIVE_TIMEOUT": " "}, runtime.DEFAULT_COLLECTIVE_TIMEOUT_S),
        (12.5, {"LOCALSGD_COLLECTIVE_TIMEOUT": "45"}, 12.5),  # the command line wins
    ],
)
def test_collective_timeout_from_the_flag_the_environment_or_the_default(value, environ, seconds):
    assert runtime.collective_timeout_s(value, environ) == seconds


@pytest.mark.parametrize(
    ("value", "environ", "message"),
    [
        (0, {}, "--collective-timeout must be a number of seconds > 0, got 0"),
        (-5.0, {}, "--collective-timeout"),
        (float("inf"), {}, "--collective-timeout"),
        (None, {"LOCALSGD_COLLECTIVE_TIMEOUT": "ten"}, "LOCALSGD_COLLECTIVE_TIMEOUT must be .* got 'ten'"),
        (None, {"LOCALSGD_COLLECTIVE_TIMEOUT": "nan"}, "LOCALSGD_COLLECTIVE_TIMEOUT"),
    ],
)
def test_bad_collective_timeouts_are_refused(value, environ, message):
    with pytest.raises(ValueError, match=message):
        runtime.collective_timeout_s(value, environ)


def test_waiting_for_leaves_other_errors_alone():
    with pytest.raises(RuntimeError, match="^shape mismatch$"):
        with runtime.waiting_for("a step"):
            raise RuntimeError("shape mismatch")


LATE_RANK = """
import os, sys, time
import torch, torch.distributed as dist
from deepspeed.utils import groups
from localsgd_ds import runtime

runtime.init_distributed(timeout_s=3)
rank, name = dist.get_rank(), sys.argv[1]
workspace = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{os.environ['MASTER_PORT']}_{rank}"
print(f"rank {rank}: workspace mapped: {os.path.exists(workspace)}", flush=True)
# DeepSpeed's clone of the world (its gradient all-reduce runs there) is created without a timeout.
group = {"world": None, "side": dist.new_group(backend="gloo"), "deepspeed": groups._clone_world_group()}[name]
x = torch.ones(1)
dist.all_reduce(x, group=group)  # both ranks are here: fine
if rank == 1:
    time.sleep(6)  # rank 1 is late by twice the timeout
start = time.monotonic()
try:
    with runtime.waiting_for(f"the {name} all-reduce"):
        dist.all_reduce(x, group=group)
    print(f"rank {rank}: no error", flush=True)
except runtime.CollectiveTimeout as exc:
    print(f"rank {rank}: after {time.monotonic() - start:.0f} s: {str(exc).splitlines()[0]}", flush=True)
runtime.shutdown()
print(f"rank {rank}: workspace after shutdown: {os.path.exists(workspace)}", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("group", ["world", "side", "deepspeed"])
def test_a_late_rank_makes_the_other_fail_in_time_naming_itself_and_the_wait(tmp_path, group):
    """Rank 1 comes to an all-reduce 6 s late; the timeout is 3 s on the world group, a group made with
    new_group() and DeepSpeed's own group alike."""
    from distributed import run_ranks

    script = tmp_path / "late.py"
    script.write_text(LATE_RANK)
    outputs = run_ranks([str(script), group], 2, timeout=120)
    lines = [
        [line for line in out.splitlines() if line.startswith(f"rank {r}:")] for r, out in enumerate(outputs)
    ]
    # Rank 0 waits 3 s (not gloo's 30 min default of new_group), then says who it is and what it waited for.
    assert lines[0] == [
        "rank 0: workspace mapped: True",
        f"rank 0: after 3 s: rank 0 of 2 waited 3 s for the other ranks in the {group} all-reduce and gave up "
        "(--collective-timeout, LOCALSGD_COLLECTIVE_TIMEOUT): a rank stopped before it. That rank's log says "
        "why; `kill -USR1 <pid>` prints where a rank that is still running waits",
        "rank 0: workspace after shutdown: False",  # DeepSpeed's /dev/shm workspace is gone too
    ], outputs[0][-3000:]
    # Rank 1 comes late and finds rank 0 gone from the collective: it says so at once.
    assert lines[1] == [
        "rank 1: workspace mapped: True",
        f"rank 1: after 0 s: rank 1 of 2: another rank went away during the {group} all-reduce (it crashed "
        "or was killed: see its log)",
        "rank 1: workspace after shutdown: False",
    ], outputs[1][-3000:]
