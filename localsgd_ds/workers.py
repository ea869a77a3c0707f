"""Workers that are several ranks: a node of GPUs as one local-SGD worker (the SGP / SlowMo setting).

With ``ranks_per_worker = r``, worker w is the consecutive ranks ``[w*r, (w+1)*r)`` (the ``deepspeed``
launcher and ``torchrun`` number a node's ranks consecutively) and K = world size / r. In the local phase
the gradients are averaged over the r ranks of a worker at every step, so a worker's ranks hold identical
parameters; every H-th step the parameters are averaged across workers hierarchically, so that no more
than one copy of the parameters per worker crosses the slow link::

    rank j of worker w:  chunk j of the flat buffer  --all-reduce (mean) with rank j of every worker-->
                         then every chunk is broadcast from its owner inside the worker

Each rank sends 1/r of the buffer across workers (a ring moves 2(K-1)/K of that per rank), so a worker
sends one copy in all, whatever r. ``ranks_per_worker = 1`` (the default) makes no groups at all: every
collective then runs on the whole world, as before this module existed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from localsgd_ds.averaging import _all_reduce_mean_
from localsgd_ds.config import ConfigError

LOCAL_SIZE_VARIABLES = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")
"""Where launchers put the number of ranks on this machine: torchrun, the deepspeed launcher."""


def launcher_local_size(environ: Mapping[str, str] = os.environ) -> int | None:
    """The launcher's local world size (ranks on this node), or None when no launcher says."""
    for name in LOCAL_SIZE_VARIABLES:
        value = environ.get(name, "").strip()
        if value.isdigit() and int(value) >= 1:
            return int(value)
    return None


@dataclass(frozen=True)
class Workers:
    """Who is in which worker, and the process groups (None when ``ranks_per_worker == 1``)."""

    ranks_per_worker: int
    world_size: int
    rank: int
    worker_group: Any = None
    """The r ranks of this rank's worker."""
    peer_group: Any = None
    """This rank and the ranks of the same position in every other worker (K ranks)."""

    @property
    def K(self) -> int:
        return self.world_size // self.ranks_per_worker

    @property
    def position(self) -> int:
        """This rank's index inside its worker."""
        return self.rank % self.ranks_per_worker

    @property
    def grouped(self) -> bool:
        return self.ranks_per_worker > 1


def node_size() -> int:
    """The launcher's local world size, for ``ranks_per_worker = "node"``. Collective: every rank reports
    its local rank and node size, and all ranks take the same decision, refusing nodes of unequal size or
    ranks not numbered consecutively inside their node (which would split a worker across nodes)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    local = launcher_local_size() or 0
    mine = torch.tensor([int(os.environ.get("LOCAL_RANK", "-1")), local])
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    if world > 1:
        dist.all_gather(everyone, mine)
    else:
        everyone = [mine]
    reports = [tuple(t.tolist()) for t in everyone]
    if any(size == 0 for _, size in reports):
        raise ConfigError(
            'local_sgd.ranks_per_worker = "node" but no launcher set LOCAL_WORLD_SIZE (torchrun) or '
            "LOCAL_SIZE (deepspeed) on every rank: launch with one of them or give the number of ranks per worker"
        )
    sizes = sorted({size for _, size in reports})
    if len(sizes) > 1:
        raise ConfigError(
            f'local_sgd.ranks_per_worker = "node" but the nodes run {sizes} ranks: every node must run the '
            "same number of ranks (or give ranks_per_worker as a number)"
        )
    size = sizes[0]
    for rank, (local_rank, _) in enumerate(reports):
        if local_rank != rank % size:
            raise ConfigError(
                f'local_sgd.ranks_per_worker = "node": rank {rank} is local rank {local_rank} of its node, not '
                f"{rank % size}: the launcher must number each node's ranks consecutively"
            )
    return size


def make_workers(ranks_per_worker: int) -> Workers:
    """Build the groups of a ``ranks_per_worker`` split of the world. Every rank must call this (each group
    is created on all ranks, in the same order)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    r = ranks_per_worker
    if r == 1:
        return Workers(1, world, rank)
    worker_group = peer_group = None
    for w in range(world // r):
        group = dist.new_group(list(range(w * r, (w + 1) * r)))
        if rank // r == w:
            worker_group = group
    for j in range(r):
        group = dist.new_group(list(range(j, world, r)))
        if rank % r == j:
            peer_group = group
    return Workers(r, world, rank, worker_group, peer_group)


def _chunks(flat: torch.Tensor, parts: int) -> list[torch.Tensor]:
    size = -(-flat.numel() // parts)
    return [flat[i * size : (i + 1) * size] for i in range(parts)]


@torch.no_grad()
def average_across_workers_(flats: Sequence[torch.Tensor], workers: Workers) -> tuple[int, int]:
    """Average contiguous buffers whose values are identical inside each worker over the K workers,
    hierarchically (see the module docstring). Returns the bytes this rank put into collectives inside its
    worker and across workers."""
    r, inside, across = workers.ranks_per_worker, 0, 0
    for flat in flats:
        chunks = _chunks(flat, r)
        mine = chunks[workers.position]
        if mine.numel():
            if flat.is_floating_point():
                _all_reduce_mean_(mine, workers.K, workers.peer_group)
            else:
                dist.all_reduce(mine, group=workers.peer_group)
                mine.copy_(torch.div(mine, workers.K, rounding_mode="floor"))
            across += mine.numel() * mine.element_size()
        base = workers.rank - workers.position
        for j, chunk in enumerate(chunks):
            if chunk.numel():
                dist.broadcast(chunk, src=base + j, group=workers.worker_group)
                inside += chunk.numel() * chunk.element_size() * (j == workers.position)
    return inside, across
