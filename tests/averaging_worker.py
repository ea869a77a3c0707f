"""One rank of tests/test_averaging.py: the averaging primitives on a real gloo world (any size).

Every rank holds known values (rank-dependent), averages them with each primitive, and checks the
result against the mean computed here by hand; prints "ok <rank>" at the end.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from localsgd_ds import averaging
from localsgd_ds.averaging import average_, average_flat_, start_average_


def values(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)
    return {
        "flat": torch.randn(10_001, generator=g),
        "counters": torch.tensor([rank * 7 + 1, 5 * rank, 3], dtype=torch.int64),
        "counter0d": torch.tensor(rank * 3 + 2, dtype=torch.int64),
        "conv": torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last),
        "bias": torch.randn(7, generator=g),
    }


def expected(world: int) -> dict[str, torch.Tensor]:
    per_rank = [values(r) for r in range(world)]
    out = {}
    for key, t in per_rank[0].items():
        stacked = torch.stack([v[key] for v in per_rank])
        if t.is_floating_point():
            out[key] = stacked.sum(0) / world  # what a sum then a divide gives (AVG must agree)
        else:
            out[key] = torch.div(stacked.sum(0), world, rounding_mode="floor")
    return out


def check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
    if got.is_floating_point():
        assert torch.allclose(got, want, rtol=0, atol=1e-6), (name, (got - want).abs().max())
    else:
        assert torch.equal(got, want), (name, got, want)


def run(native_avg: bool) -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    want = expected(world)
    mine = values(rank)
    if not native_avg:
        averaging._NATIVE_AVG[str(dist.get_backend())] = False  # as on a backend without ReduceOp.AVG

    # The counters start first, travel alongside the flat all-reduce and are finished after it.
    flat = mine["flat"].clone()
    small = [mine["counters"].clone(), mine["counter0d"].clone(), mine["conv"].clone()]
    finish = start_average_(small, world_size=world)
    sent = average_flat_([flat], world_size=world)
    assert sent == flat.numel() * 4
    assert finish() == 3 * 8 + 8 + 120 * 4
    check("flat", flat, want["flat"])
    check("counters", small[0], want["counters"])
    check("counter0d", small[1], want["counter0d"])
    check("conv", small[2], want["conv"])
    assert small[2].is_contiguous(memory_format=torch.channels_last)

    # Bucketed path, buckets smaller than the tensors: every dtype, every layout.
    tensors = [mine[k].clone() for k in ("bias", "counters", "conv", "flat", "counter0d")]
    average_(tensors, world_size=world, bucket_bytes=64)
    for key, t in zip(("bias", "counters", "conv", "flat", "counter0d"), tensors):
        check(f"bucketed {key}", t, want[key])
    ranks_agree = torch.tensor([float(tensors[3].sum())] * world)
    gathered = [torch.zeros(world) for _ in range(world)]
    dist.all_gather(gathered, ranks_agree)
    assert all(torch.equal(g, gathered[0]) for g in gathered), "ranks disagree after averaging"


def main() -> None:
    import sys

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    run(native_avg=sys.argv[1] == "native")
    if sys.argv[1] == "native":
        assert averaging._NATIVE_AVG.get("gloo") in (True, False)
    print(f"ok {dist.get_rank()} native_avg={averaging._NATIVE_AVG.get('gloo')}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
