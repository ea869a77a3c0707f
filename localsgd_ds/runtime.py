"""Process setup for a training rank: its share of the CPU cores, collectives that fail in time, a clean end.

A launcher starts several ranks on one machine, and torch gives every process one intra-op thread per
core it may run on: 2 CPU ranks on 2 cores run 4 OpenMP threads that spin-wait for each other (the CPU
quickstart's config on a shared 2-core machine: a median 39 s of compute per epoch instead of 4.8 s).
``set_cpu_threads()`` gives each rank its share instead, the cores this process may use divided by the
launcher's local world size (``LOCAL_SIZE`` from ``deepspeed``, ``LOCAL_WORLD_SIZE`` from ``torchrun``),
at least one. An explicit ``OMP_NUM_THREADS``, or a launcher that already bound the rank to its own
cores (``deepspeed --bind_cores_to_rank``, ``srun --cpu-bind``, ``numactl``), wins::

    choice = runtime.set_cpu_threads()       # first thing in a rank's main()
    print(choice)                            # "1 CPU thread per rank: 2 cores / 2 local ranks"

Collectives wait at most ``--collective-timeout`` seconds (``LOCALSGD_COLLECTIVE_TIMEOUT``; default 300)
for the other ranks, on every process group, DeepSpeed's own included; ``waiting_for`` turns a timeout
into an error that names the rank and what it waited for, instead of a silent stall. ``shutdown`` ends a
rank cleanly: without ``destroy_process_group`` gloo's threads are torn down during interpreter exit,
which aborts the process now and then ("terminate called without an active exception")::

    runtime.init_distributed(timeout_s=runtime.collective_timeout_s(args.collective_timeout))
    with runtime.waiting_for("the evaluation after epoch 3"):
        top1, top5 = evaluate(...)               # a collective inside
    runtime.shutdown()                           # after the last collective, on every rank
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

LOCAL_SIZE_VARIABLES = ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")
"""Where launchers put the number of ranks on this machine: deepspeed, torchrun, Open MPI's mpirun."""


@dataclass(frozen=True)
class ThreadChoice:
    """How many intra-op threads a rank uses, and why."""

    threads: int
    """``torch.set_num_threads`` of this rank."""
    reason: str
    """What decided it, for the log."""

    def __str__(self) -> str:
        return f"{_count(self.threads, 'CPU thread')} per rank: {self.reason}"


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 's'}"


def choose_cpu_threads(
    *, available_cores: int, local_ranks: int, omp_num_threads: str | None, bound: bool
) -> ThreadChoice:
    """The intra-op threads of one rank (a pure function of what the process sees).

    ``available_cores``: cores this process may run on (its affinity); ``local_ranks``: ranks the launcher
    started on this machine; ``omp_num_threads``: the environment's ``OMP_NUM_THREADS`` (None if unset);
    ``bound``: the launcher gave this rank its own cores (its affinity is narrower than the launcher's).
    """
    if omp_num_threads is not None and omp_num_threads.strip():
        value = omp_num_threads.strip()
        if value.isdigit() and int(value) >= 1:
            return ThreadChoice(int(value), f"OMP_NUM_THREADS={value}")
        ignored = f"OMP_NUM_THREADS={omp_num_threads!r} is not a whole number >= 1, ignored; "
    else:
        ignored = ""
    cores = max(1, available_cores)
    if bound:
        return ThreadChoice(cores, f"{ignored}the launcher bound this rank to {_count(cores, 'core')}")
    ranks = max(1, local_ranks)
    return ThreadChoice(
        max(1, cores // ranks), f"{ignored}{_count(cores, 'core')} / {_count(ranks, 'local rank')}"
    )


def local_ranks(environ: Mapping[str, str] = os.environ) -> int:
    """Ranks the launcher started on this machine (1 when no launcher says)."""
    for name in LOCAL_SIZE_VARIABLES:
        value = environ.get(name, "").strip()
        if value.isdigit() and int(value) >= 1:
            return int(value)
    return 1


def _bound_by_launcher(mine: set[int]) -> bool:
    """True if this process may use fewer cores than its parent (the launcher) may: a per-rank binding."""
    try:
        return mine < os.sched_getaffinity(os.getppid())
    except OSError:  # the parent is gone or not ours to inspect
        return False


def set_cpu_threads(environ: Mapping[str, str] = os.environ) -> ThreadChoice:
    """Give this rank its share of the machine's cores (see the module docstring); returns the choice."""
    cores = os.sched_getaffinity(0)
    choice = choose_cpu_threads(
        available_cores=len(cores),
        local_ranks=local_ranks(environ),
        omp_num_threads=environ.get("OMP_NUM_THREADS"),
        bound=_bound_by_launcher(cores),
    )
    import torch

    torch.set_num_threads(choice.threads)
    return choice


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now, for a rendezvous on this machine (``--master_port``)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# -- collectives: a timeout the user sets, errors that say who waited for what, a clean end ------------------

COLLECTIVE_TIMEOUT_VARIABLE = "LOCALSGD_COLLECTIVE_TIMEOUT"
DEFAULT_COLLECTIVE_TIMEOUT_S = 300.0
"""Long enough for the slowest legitimate wait between two collectives of a healthy run (a checkpoint
written to a slow shared file system, the first batch from object storage); raise it if those take longer."""

_timeout_s = DEFAULT_COLLECTIVE_TIMEOUT_S


class CollectiveTimeout(RuntimeError):
    """A collective failed because another rank did not come (timeout) or went away (crash, kill)."""


def collective_timeout_s(value: float | None = None, environ: Mapping[str, str] = os.environ) -> float:
    """Seconds a collective waits for the other ranks: ``value`` (the command line), else the environment's
    ``LOCALSGD_COLLECTIVE_TIMEOUT``, else 300."""
    where = "--collective-timeout"
    if value is None and environ.get(COLLECTIVE_TIMEOUT_VARIABLE, "").strip():
        where, value = COLLECTIVE_TIMEOUT_VARIABLE, environ[COLLECTIVE_TIMEOUT_VARIABLE]
    if value is None:
        return DEFAULT_COLLECTIVE_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{where} must be a number of seconds > 0, got {value!r}")
    return seconds


def init_distributed(timeout_s: float) -> None:
    """``deepspeed.init_distributed`` with a collective timeout that holds for every process group."""
    import deepspeed
    from torch.distributed import distributed_c10d

    global _timeout_s
    _timeout_s = timeout_s
    timeout = timedelta(seconds=timeout_s)
    # A deliberate reach into torch: DeepSpeed builds its own groups (the clone of the world group its
    # gradient all-reduce runs on) with new_group()'s default timeout, 30 min for gloo, not the one
    # init_distributed gets. Making that default ours puts every group on the same timeout.
    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(timeout=timeout)  # NCCL on GPUs, gloo on CPU; rank, world from the launcher
    # `kill -USR1 <pid>` prints where every thread of a rank is: how to find what a stalled rank waits for.
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def _peer_failure(exc: BaseException) -> str | None:
    """ "timeout" or "gone" if ``exc`` is a collective that another rank did not complete, else None."""
    text = str(exc)
    if "Timed out" in text or "timed out" in text or "Timeout" in text:
        return "timeout"
    if "Connection closed by peer" in text or "Connection reset by peer" in text or "Broken pipe" in text:
        return "gone"
    return None


def _rank() -> str:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return f"rank {dist.get_rank()} of {dist.get_world_size()}"
    return f"rank {os.environ.get('RANK', '?')}"


@contextlib.contextmanager
def waiting_for(what: str | Callable[[], str]) -> Iterator[None]:
    """Turn a collective that another rank never completes into a ``CollectiveTimeout`` naming this rank
    and ``what`` it waited for (a string, or a function giving it at the time of the failure)."""
    try:
        yield
    except RuntimeError as exc:
        failure = _peer_failure(exc)
        if failure is None or isinstance(exc, CollectiveTimeout):
            raise
        doing = what() if callable(what) else what
        if failure == "timeout":
            message = (
                f"{_rank()} waited {_timeout_s:g} s for the other ranks in {doing} and gave up "
                f"(--collective-timeout, {COLLECTIVE_TIMEOUT_VARIABLE}): a rank stopped before it. That "
                f"rank's log says why; `kill -USR1 <pid>` prints where a rank that is still running waits"
            )
        else:
            message = (
                f"{_rank()}: another rank went away during {doing} (it crashed or was killed: see its log)"
            )
        raise CollectiveTimeout(f"{message}\n  ({type(exc).__name__}: {exc})") from exc


def shutdown() -> None:
    """End this rank cleanly, after its last collective: destroy the process groups (gloo's threads must
    not be torn down during interpreter exit, which aborts the process now and then) and remove the
    shared-memory workspace DeepSpeed's CPU accelerator maps for ranks of one machine (69 MB, never freed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        dist.destroy_process_group()
        # Named by DeepSpeed's shm.cpp: deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>.
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if addr and port:
            workspace = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
            workspace.unlink(missing_ok=True)
