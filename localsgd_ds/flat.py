"""Where the hook's state lives: parameters (and float buffers) as views into one flat buffer per dtype.

A sync averages the flat buffers in place, one collective per dtype: no copy in, no copy out, no extra
memory. ``FlatLayout`` decides what goes where and remembers it:

- parameters first, then (under the "average" buffer policy) the floating-point buffers, so that the mSGD
  phase can average the buffer part alone (``buffer_tails``);
- integer buffers (BatchNorm's ``num_batches_tracked``: counters) travel apart and are averaged as
  integers; buffers that are neither floating point nor counters (``torch.bool`` masks) are never synced;
- parameters tied through their storage (``b.weight.data = a.weight.data``) stay tied: the flat buffer
  holds one copy and every alias is a view of it. Parameters whose storages overlap only in part cannot
  be laid out without untying them and are refused.

    layout = FlatLayout(params, buffers, buffer_policy="average", flatten=True)
    average_flat_(layout.flats, world_size=K)           # a full sync of parameters and float buffers
    average_flat_(layout.buffer_tails(), world_size=K)   # the mSGD phase: the buffer part only
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from localsgd_ds.averaging import average_, broadcast_, flatten_, start_average_
from localsgd_ds.config import ConfigError


def is_synced_buffer(t: torch.Tensor) -> bool:
    """Whether a buffer takes part in syncs: floating point (averaged) or an integer counter (averaged in
    integer arithmetic). A bool mask (or any other dtype) is never averaged: the mean of masks is no mask."""
    return t.is_floating_point() or (not t.is_complex() and t.dtype != torch.bool)


def _alias_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), t.stride())


def _check_no_partial_overlap(tensors: Sequence[torch.Tensor], names: dict[int, str]) -> None:
    """Refuse tensors that share part of a storage (a tie that a flat layout would silently cut)."""
    spans = []
    for t in tensors:
        if t.numel() == 0:
            continue
        start = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
        extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
        spans.append((start, start + extent * t.element_size(), t))
    spans.sort(key=lambda s: s[0])
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise ConfigError(
                f"local_sgd: parameters {names.get(id(a), '?')!r} and {names.get(id(b), '?')!r} share part of "
                "one storage; the hook lays parameters out in flat buffers and would untie them. Tie whole "
                "parameters (b.weight = a.weight) or give each its own storage."
            )


class FlatLayout:
    """Parameters and buffers of one model replica, laid out for syncs (see the module docstring).

    ``flatten=False`` leaves all storage alone (plain mSGD, which never averages parameters and may run
    under ZeRO, whose optimizer parameters are views into DeepSpeed's own partitions): every tensor then
    takes the bucketed copy path.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        buffers: Sequence[torch.Tensor],
        *,
        buffer_policy: str,
        flatten: bool,
        names: dict[int, str] | None = None,
    ) -> None:
        self.params = list(params)
        self.buffers = list(buffers)
        self.buffer_policy = buffer_policy
        self._flatten = flatten
        self._names = names or {}
        self.layout()

    def layout(self) -> None:
        """(Re)build the flat buffers from the tensors' current values."""
        synced = [b for b in self.buffers if is_synced_buffer(b)]
        if not self._flatten:
            self.flats: list[torch.Tensor] = []
            self.loose_params = list(self.params)
            self.other_buffers = synced
            self._param_numel: list[int] = []
            self._members: list[torch.Tensor] = []
            self._ptrs: list[int] = []
            return
        joined = [b for b in synced if b.is_floating_point()] if self.buffer_policy == "average" else []
        # One representative per group of aliases: the flat buffer holds it once, the aliases view it.
        first_of: dict[tuple, torch.Tensor] = {}
        aliases: list[tuple[torch.Tensor, torch.Tensor]] = []
        members = []
        for t in self.params + joined:
            key = _alias_key(t)
            if key in first_of:
                aliases.append((t, first_of[key]))
            else:
                first_of[key] = t
                members.append(t)
        _check_no_partial_overlap(members, self._names)
        self.flats, loose = flatten_(members)
        for alias, representative in aliases:
            alias.data = representative.data
        loose_ids = {id(t) for t in loose}
        alias_ids = {id(a) for a, _ in aliases}
        self.loose_params = [p for p in self.params if id(p) in loose_ids]
        in_flat = {id(b) for b in joined if id(b) not in loose_ids}
        self.other_buffers = [b for b in synced if id(b) not in in_flat]
        param_numel: dict[tuple[torch.dtype, torch.device], int] = {}
        for p in self.params:
            if id(p) not in loose_ids and id(p) not in alias_ids:
                key = (p.dtype, p.device)
                param_numel[key] = param_numel.get(key, 0) + p.numel()
        self._param_numel = [param_numel.get((f.dtype, f.device), 0) for f in self.flats]
        self._members = self.params + joined
        self._ptrs = [t.data_ptr() for t in self._members]

    def moved(self) -> bool:
        """Whether someone re-pointed parameter or buffer storage since the layout was made (for example
        ``model.to(memory_format=...)``); the caller lays out again before averaging."""
        return [t.data_ptr() for t in self._members] != self._ptrs

    def buffer_tails(self) -> list[torch.Tensor]:
        """The buffer part of each flat buffer (what the mSGD phase averages: parameters are identical)."""
        return [flat[n:] for flat, n in zip(self.flats, self._param_numel) if flat.numel() > n]

    def start_other_buffers(
        self,
        world_size: int,
        bucket_bytes: int,
        scratch: dict[tuple[torch.dtype, torch.device], torch.Tensor],
    ) -> Callable[[], int]:
        """Start syncing the buffers outside the flat buffers: integer counters (averaged as integers), or
        every synced buffer under "broadcast" (rank 0's); bool masks never. Returns the function that
        finishes the job and returns the bytes: buffers that fit one bucket are averaged asynchronously from
        now on, alongside the parameter all-reduce; the rest waits for that function, in bounded buckets."""
        if world_size == 1 or self.buffer_policy == "local":
            return lambda: 0
        if self.buffer_policy == "broadcast":
            return lambda: broadcast_(self.synced_buffers, src=0, bucket_bytes=bucket_bytes, scratch=scratch)
        others = self.other_buffers
        if sum(b.numel() * b.element_size() for b in others) <= bucket_bytes:
            return start_average_(others, world_size=world_size)
        return lambda: average_(others, world_size=world_size, bucket_bytes=bucket_bytes, scratch=scratch)

    @property
    def synced_buffers(self) -> list[torch.Tensor]:
        """Every buffer a sync touches (floating point and counters; never bool masks)."""
        return [b for b in self.buffers if is_synced_buffer(b)]


def optimizer_state_tensors(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Every floating-point tensor the optimizer keeps per parameter (SGD: ``momentum_buffer``; Adam: both
    moments), in parameter order, so that all ranks pack the same buckets."""
    out = []
    for p in params:
        for value in optimizer.state.get(p, {}).values():
            if torch.is_tensor(value) and value.is_floating_point() and value.shape == p.shape:
                out.append(value)
    return out
