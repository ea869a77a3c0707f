"""Process setup for a training rank: its share of the CPU cores, and a free port for local launches.

A launcher starts several ranks on one machine, and torch gives every process one intra-op thread per
core it may run on: 2 CPU ranks on 2 cores run 4 OpenMP threads that spin-wait for each other (the CPU
quickstart's config on a shared 2-core machine: a median 39 s of compute per epoch instead of 4.8 s).
``set_cpu_threads()`` gives each rank its share instead, the cores this process may use divided by the
launcher's local world size (``LOCAL_SIZE`` from ``deepspeed``, ``LOCAL_WORLD_SIZE`` from ``torchrun``),
at least one. An explicit ``OMP_NUM_THREADS``, or a launcher that already bound the rank to its own
cores (``deepspeed --bind_cores_to_rank``, ``srun --cpu-bind``, ``numactl``), wins::

    choice = runtime.set_cpu_threads()       # first thing in a rank's main()
    print(choice)                            # "1 CPU thread per rank: 2 cores / 2 local ranks"
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

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
