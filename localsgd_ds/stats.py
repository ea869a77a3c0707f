"""What the hook counts about communication, per rank: the numbers behind TensorBoard's comm curves."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class CommStats:
    """Cumulative communication of this rank. ``bytes`` count the payload handed to collectives; a ring
    all-reduce moves 2(K-1)/K times that over the wire per worker."""

    syncs: int = 0
    """Averagings of the workers' parameters (scheduled, forced by ``sync()``, and for ``averaged()``).
    Buffer-only averagings (mSGD phase, parameters already identical) count in bytes and seconds only."""
    forced_syncs: int = 0
    """Of those, the ones asked for outside the H schedule (evaluation, checkpoint, end of training)."""
    bytes: int = 0
    """Bytes this rank put into averaging collectives."""
    seconds: float = 0.0
    """Seconds spent averaging (device synchronized before and after)."""
    grad_allreduces: int = 0
    """DeepSpeed's gradient all-reduces (mSGD phase): one per optimizer step, whatever the gradient
    accumulation (DeepSpeed reduces at the accumulation boundary only)."""
    grad_allreduce_bytes: int = 0
    grad_allreduce_seconds: float = 0.0
    worker_grad_allreduces: int = 0
    """Local-phase gradient all-reduces inside a worker of several ranks (``ranks_per_worker > 1``)."""
    worker_grad_allreduce_seconds: float = 0.0
    bytes_inside_workers: int = 0
    """Bytes this rank put into collectives among its own worker's ranks (gradients in the local phase,
    the in-worker half of a sync). Zero with one rank per worker."""
    bytes_across_workers: int = 0
    """Bytes this rank put into collectives that span workers (syncs, the mSGD gradient all-reduce): what
    crosses the slow link when a worker is a node."""

    def as_dict(self) -> dict[str, float]:
        return asdict(self)
