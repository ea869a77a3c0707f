"""Stop cleanly on SIGTERM/SIGINT: every rank stops after the same step, saves, and exits.

A scheduler's SIGTERM (preemption, time limit, ``kill``) reaches the ranks at slightly different steps,
but a checkpoint is collective, so the ranks must agree on where to stop. They do so with a 4-byte
all-reduce on a side gloo group (CPU, no device synchronization), and only where they meet anyway: after
every mSGD step (the gradient all-reduce already holds them together) and after every sync in the local
phase, so local steps stay free of collectives. Data-loader worker processes are started with the signals
blocked: a SIGTERM sent to the whole process group (as SLURM and ``kill -- -PGID`` do) must not kill a
loader worker, which would crash the rank before it could save::

    stop = StopSignal()                      # installs the handlers; collective (creates the group)
    batches = stop.shielded(loader)          # the loader's workers are forked with the signals blocked
    ...
    if ranks_met and stop.agreed():          # collective
        save_checkpoint(...)
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)
Item = TypeVar("Item")


class StopSignal:
    """Remembers the first SIGTERM or SIGINT; ``agreed()`` tells every rank whether any rank got one."""

    def __init__(self) -> None:
        self.received: int | None = None
        # A CPU side channel, so the check never synchronizes the accelerator (NCCL needs device tensors).
        self._group = dist.new_group(backend="gloo")
        for signum in SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signum

    @property
    def name(self) -> str:
        return "" if self.received is None else signal.Signals(self.received).name

    def agreed(self) -> bool:
        """Collective: True on every rank if any rank has received a signal."""
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if flag.item() and self.received is None:
            self.received = signal.SIGTERM  # another rank got it
        return bool(flag.item())

    @contextlib.contextmanager
    def shielding_children(self) -> Iterator[None]:
        """Block the stop signals while processes are forked (they inherit the mask), then unblock here;
        a signal that arrived meanwhile is delivered to this process on unblocking."""
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def shielded(self, loader: Iterable[Item]) -> Iterator[Item]:
        """Iterate ``loader``, whose worker processes start on the first ``next()``, under the shield."""
        batches = iter(loader)
        with self.shielding_children():
            first = next(batches, _END)
        if first is _END:
            return
        yield first
        yield from batches


_END = object()
