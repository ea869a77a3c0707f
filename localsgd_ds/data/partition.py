"""What an epoch is: an exact partition of the split's samples over ranks and their loader workers.

Every epoch puts the shards in a seeded, epoch-dependent order and rotates the concatenated sample
stream by a seeded offset (:func:`epoch_order`); rank ``r`` takes the ``r``-th run of ``steps_per_epoch
* batch_size`` consecutive stream positions, and inside the rank worker ``w`` takes the batches ``i``
with ``i % num_workers == w`` (:func:`worker_batches`), as one consecutive run of positions.
:func:`stream_pieces` turns a run of positions into reads: (shard, first sample, count). Pure functions
of their arguments, with no I/O: the loaders and the tests call the same code.

Example::

    order, offset = epoch_order([64, 64, 40], seed=0, epoch=3)
    pieces = stream_pieces([64, 64, 40], order, offset, start=96, stop=128)   # 32 samples, 1 or 2 pieces
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Piece:
    """``count`` consecutive samples of shard ``shard`` starting at sample ``first``."""

    shard: int
    first: int
    count: int


def epoch_order(counts: list[int], seed: int, epoch: int) -> tuple[list[int], int]:
    """The shard order and stream rotation of an epoch (a pure function of seed and epoch)."""
    rng = np.random.default_rng([seed, epoch, 0x0D0E])
    order = [int(i) for i in rng.permutation(len(counts))]
    return order, int(rng.integers(sum(counts))) if sum(counts) else 0


def stream_pieces(counts: list[int], order: list[int], offset: int, start: int, stop: int) -> list[Piece]:
    """Pieces covering positions [start, stop) of the stream "shards in ``order``, rotated by ``offset``"."""
    total = sum(counts)
    if not 0 <= start <= stop <= total:
        raise ValueError(f"range [{start}, {stop}) outside a stream of {total} samples")
    a, b = (start + offset) % total if total else 0, (start + offset) % total + (stop - start) if total else 0
    spans = [(a, min(b, total))] + ([(0, b - total)] if b > total else [])
    pieces = []
    for lo, hi in spans:
        pos = 0
        for shard in order:
            n = counts[shard]
            first, last = max(lo, pos), min(hi, pos + n)
            if first < last:
                pieces.append(Piece(shard, first - pos, last - first))
            pos += n
            if pos >= hi:
                break
    return pieces


def worker_batches(steps: int, num_workers: int) -> list[int]:
    """Batches of each worker when batch ``i`` of the rank comes from worker ``i % num_workers``."""
    return [steps // num_workers + (w < steps % num_workers) for w in range(num_workers)]
