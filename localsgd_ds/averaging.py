"""The math of a sync: average tensors over the workers in bounded buckets, and the SlowMo outer step.

Plain functions on tensors and a ``torch.distributed`` process group; nothing here knows DeepSpeed.
Averaging one tensor at a time means hundreds of small collectives; flattening everything at once
costs a full extra copy of the model. ``average_`` packs tensors of one dtype into buckets of at most
``bucket_bytes`` (one collective per bucket) and reduces any tensor larger than that in place, so the
extra memory of a sync is one bucket, whatever the model size::

    sent = average_(list(model.parameters()), world_size=dist.get_world_size(), bucket_bytes=25 << 20)

SlowMo (Wang et al. 2020, "SlowMo: Improving communication-efficient distributed SGD with slow momentum"),
with x0 the weights after the previous sync and x_avg the fresh average::

    u = beta * u + (x0 - x_avg) / lr;   x = x0 - alpha * lr * u
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist


def _buckets(tensors: Sequence[torch.Tensor], bucket_numel: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive runs of same-dtype tensors holding at most ``bucket_numel`` elements (big ones alone)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        bucket: list[torch.Tensor] = []
        filled = 0
        for t in group:
            if t.numel() >= bucket_numel:
                yield [t]
                continue
            if filled + t.numel() > bucket_numel:
                yield bucket
                bucket, filled = [], 0
            bucket.append(t)
            filled += t.numel()
        if bucket:
            yield bucket


def _mean_(t: torch.Tensor, world_size: int) -> None:
    """Turn a summed tensor into the mean; integer tensors stay integers (floor of the mean)."""
    if t.is_floating_point() or t.is_complex():
        t.div_(world_size)
    else:
        t.copy_(torch.div(t, world_size, rounding_mode="floor"))


@torch.no_grad()
def _bucketed_(
    tensors: Sequence[torch.Tensor],
    collective: Callable[[torch.Tensor], None],
    *,
    bucket_bytes: int,
    scratch: dict[tuple[torch.dtype, torch.device], torch.Tensor] | None,
) -> int:
    """Run ``collective`` (in place on one contiguous tensor) over ``tensors`` in bounded buckets."""
    if not tensors:
        return 0
    scratch = {} if scratch is None else scratch
    sent = 0
    for bucket in _buckets(tensors, max(1, bucket_bytes // max(t.element_size() for t in tensors))):
        first = bucket[0]
        if len(bucket) == 1 and first.is_contiguous():
            # A large (or lone) tensor: work on it where it lives; no copy at all.
            collective(first)
            sent += first.numel() * first.element_size()
            continue
        numel = sum(t.numel() for t in bucket)
        key = (first.dtype, first.device)
        buf = scratch.get(key)
        if buf is None or buf.numel() < numel:
            size = numel  # what this bucket needs: 20 int64 counters must not hold a 25 MB buffer
            buf = scratch[key] = torch.empty(size, dtype=first.dtype, device=first.device)
        flat = buf[:numel]
        offset = 0
        for t in bucket:  # view(t.shape) copies in logical order, so channels_last tensors work too
            flat[offset : offset + t.numel()].view(t.shape).copy_(t)
            offset += t.numel()
        collective(flat)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()
        sent += numel * first.element_size()
    return sent


@torch.no_grad()
def average_(
    tensors: Sequence[torch.Tensor],
    *,
    world_size: int,
    bucket_bytes: int,
    group: dist.ProcessGroup | None = None,
    scratch: dict[tuple[torch.dtype, torch.device], torch.Tensor] | None = None,
) -> int:
    """Replace every tensor by its mean over ``group``, in place. Returns the bytes this rank reduced.

    Integer tensors (``num_batches_tracked``) are summed as integers and floor-divided, never averaged as
    floats. ``scratch`` caches one bucket buffer per (dtype, device) across calls.
    """
    if world_size == 1:
        return 0

    def mean_(t: torch.Tensor) -> None:
        if t.is_floating_point():
            _all_reduce_mean_(t, world_size, group)
        else:
            dist.all_reduce(t, group=group)
            _mean_(t, world_size)

    return _bucketed_(tensors, mean_, bucket_bytes=bucket_bytes, scratch=scratch)


def _is_dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


@torch.no_grad()
def flatten_(params: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Move ``params`` into one contiguous buffer per (dtype, device), in place: each parameter's ``.data``
    becomes a view into its buffer (same shape, same strides, so channels_last stays channels_last).

    Afterwards averaging the parameters is a few in-place collectives over the buffers: no copy in, no copy
    out, no extra memory. Returns ``(buffers, leftovers)``: leftovers are tensors that are not dense
    (they keep their own storage and go through the bucketed copy path).
    """
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    leftovers = []
    for p in params:
        if _is_dense(p):
            groups.setdefault((p.dtype, p.device), []).append(p)
        else:
            leftovers.append(p)
    buffers = []
    for (dtype, device), group in groups.items():
        flat = torch.empty(sum(p.numel() for p in group), dtype=dtype, device=device)
        offset = 0
        for p in group:
            view = torch.as_strided(flat, p.shape, p.stride(), storage_offset=offset)
            view.copy_(p.data)
            p.data = view
            offset += p.numel()
        buffers.append(flat)
    return buffers, leftovers


_NATIVE_AVG: dict[str, bool] = {}
"""Per backend name: whether ``all_reduce(op=AVG)`` works (NCCL, and gloo in recent PyTorch)."""


def _all_reduce_mean_(t: torch.Tensor, world_size: int, group: dist.ProcessGroup | None) -> None:
    """Replace a floating-point tensor by its mean over ``group``, in place.

    ``ReduceOp.AVG`` where the backend has it: on NCCL the division happens inside the reduction kernel,
    with no extra pass over the tensor. Elsewhere a sum, then a divide. A backend that does not know AVG
    refuses it before anything is sent, so the fallback cannot desynchronize the ranks.
    """
    backend = str(dist.get_backend(group))
    if _NATIVE_AVG.get(backend, True):
        try:
            dist.all_reduce(t, op=dist.ReduceOp.AVG, group=group)
            _NATIVE_AVG[backend] = True
            return
        except (RuntimeError, ValueError) as err:
            if backend in _NATIVE_AVG or "AVG" not in str(err).upper():
                raise
            _NATIVE_AVG[backend] = False
    dist.all_reduce(t, group=group)
    _mean_(t, world_size)


@torch.no_grad()
def average_flat_(
    buffers: Sequence[torch.Tensor], *, world_size: int, group: dist.ProcessGroup | None = None
) -> int:
    """Average contiguous buffers in place: one collective per buffer (no copy, so no size bound needed)."""
    if world_size == 1:
        return 0
    sent = 0
    for flat in buffers:
        if flat.is_floating_point():
            _all_reduce_mean_(flat, world_size, group)
        else:
            dist.all_reduce(flat, group=group)
            _mean_(flat, world_size)
        sent += flat.numel() * flat.element_size()
    return sent


@torch.no_grad()
def start_average_(
    tensors: Sequence[torch.Tensor], *, world_size: int, group: dist.ProcessGroup | None = None
) -> Callable[[], int]:
    """Start averaging a few small tensors and return the function that finishes it (returns the bytes).

    Packs the tensors into one new tensor per (dtype, device) and starts one asynchronous all-reduce each,
    so that BatchNorm's integer counters travel alongside the large parameter all-reduce instead of
    paying a round-trip of their own after it. The packed copies are extra memory: callers keep this for
    tensors that fit one bucket and use ``average_`` for the rest. Integers are averaged as integers.
    """
    if world_size == 1 or not tensors:
        return lambda: 0
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    pending = []
    for members in groups.values():
        # reshape(-1) reads each tensor in logical order, as view(t.shape) writes it back below.
        packed = torch.cat([t.reshape(-1) for t in members])
        pending.append((packed, members, dist.all_reduce(packed, group=group, async_op=True)))

    @torch.no_grad()
    def finish() -> int:
        sent = 0
        for packed, members, work in pending:
            work.wait()
            _mean_(packed, world_size)
            offset = 0
            for t in members:
                t.copy_(packed[offset : offset + t.numel()].view(t.shape))
                offset += t.numel()
            sent += packed.numel() * packed.element_size()
        return sent

    return finish


def broadcast_(
    tensors: Sequence[torch.Tensor],
    *,
    bucket_bytes: int,
    src: int = 0,
    group: dist.ProcessGroup | None = None,
    scratch: dict[tuple[torch.dtype, torch.device], torch.Tensor] | None = None,
) -> int:
    """Overwrite every tensor with rank ``src``'s copy, in bounded buckets. Returns the bytes moved."""
    return _bucketed_(
        tensors, lambda t: dist.broadcast(t, src=src, group=group), bucket_bytes=bucket_bytes, scratch=scratch
    )


@torch.no_grad()
def slowmo_step_(
    params: Iterable[torch.Tensor],
    anchors: Iterable[torch.Tensor],
    momenta: Iterable[torch.Tensor],
    *,
    lrs: Iterable[float],
    beta: float,
    alpha: float,
) -> None:
    """SlowMo outer step, in place. ``params`` hold the fresh average x_avg on entry and the new x on exit;
    ``anchors`` (x0, fp32) become the new x; ``momenta`` (u, fp32) are updated. ``lrs`` holds, for each
    parameter, the learning rate of its own parameter group at the last optimizer step taken.

    Where ``lr == 0`` (a group frozen by its learning rate, or the very first warmup step) no displacement
    can be expressed in units of ``lr``: that parameter is plainly averaged and its ``u`` left unchanged.
    """
    for p, x0, u, lr in zip(params, anchors, momenta, lrs, strict=True):
        if lr > 0:
            u.mul_(beta).add_(x0 - p.float(), alpha=1.0 / lr)
            x0.add_(u, alpha=-alpha * lr)
        else:
            x0.copy_(p)
        p.copy_(x0)
