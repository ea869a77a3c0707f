"""Local SGD by hand, in one process: K model replicas, each stepping on its rank's data, mean-gradient
steps before the switch and parameter averaging every H local steps after it. The slow, obvious version
that the real multi-process DeepSpeed runs must match; it shares no code with the hook."""

from __future__ import annotations

import contextlib

import torch
from tiny import batch, loss_fn, lr_factor, make_model, make_optimizer


def _mean_into(tensors_per_rank: list[list[torch.Tensor]]) -> None:
    for group in zip(*tensors_per_rank):
        if group[0].dtype == torch.bool:
            continue  # a mask is never averaged
        if group[0].is_floating_point():
            mean = torch.stack(group).mean(0)
        else:
            mean = torch.div(torch.stack(group).sum(0), len(group), rounding_mode="floor")
        for t in group:
            t.copy_(mean)


@torch.no_grad()
def _clip(params: list[torch.Tensor], max_norm: float) -> None:
    torch.nn.utils.clip_grad_norm_(params, max_norm)


def reference(
    K: int,
    steps: int,
    *,
    H: int,
    switch: int | None,
    gas: int = 1,
    buffers: str = "average",
    momentum: str = "local",
    slowmo: tuple[float, float] | None = None,
    clip: float = 0.0,
    seed: int = 0,
    variant: str = "plain",
    group_lrs: tuple[float, float] | None = None,
    schedule: bool = False,
    forced: tuple[int, ...] = (),
    autocast: bool = False,
    ranks_per_worker: int = 1,
) -> list[dict[str, torch.Tensor]]:
    """Final state_dict of each replica after ``steps`` optimizer steps.

    ``schedule``: the lr follows ``tiny.lr_factor`` (stepped after every optimizer step, as DeepSpeed steps
    a client scheduler); ``forced``: a sync outside the schedule after that many steps; ``autocast``: the
    forward runs under bf16 autocast (what DeepSpeed's ``torch_autocast`` does); ``ranks_per_worker``: in the
    local phase the gradients are averaged over each run of that many consecutive replicas (a worker).
    ``K`` counts replicas (ranks), one per rank.
    """
    # Each replica built the same way (deepcopy would untie tied parameters).
    models = [make_model(seed, variant, rank=k) for k in range(K)]
    opts = [make_optimizer(m, group_lrs) for m in models]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_factor) if schedule else None for o in opts]
    anchor = momenta = None
    for s in range(steps):
        local = switch is not None and s >= switch
        synced_before = s == switch or (local and ((s - switch) % H == 0 or s in forced))
        if local and slowmo is not None and synced_before:
            # x0 = the weights at the start of this period (identical on all replicas)
            anchor = [p.detach().float().clone() for p in models[0].parameters()]
            momenta = momenta or [torch.zeros_like(a) for a in anchor]
        for k, (m, o) in enumerate(zip(models, opts)):
            o.zero_grad(set_to_none=False)
            for micro in range(gas):
                x, y = batch(k, s, micro)
                ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
                with ctx:
                    out = m(x)
                (loss_fn(out, y) / gas).backward()
        if not local:
            _mean_into([[p.grad for p in m.parameters()] for m in models])
        else:
            for w in range(0, K, ranks_per_worker):
                _mean_into([[p.grad for p in m.parameters()] for m in models[w : w + ranks_per_worker]])
        lrs = [g["lr"] for g in opts[0].param_groups]  # the lrs of this step, before the scheduler moves
        for m, o, sched in zip(models, opts, scheds):
            if clip > 0:
                _clip(list(m.parameters()), clip)
            o.step()
            if sched is not None:
                sched.step()
        if not local:
            continue
        if (s + 1 - switch) % H == 0 or (s + 1) in forced:
            with torch.no_grad():
                _mean_into([list(m.parameters()) for m in models])
                if slowmo is not None:
                    beta, alpha = slowmo
                    lr_of = {id(p): lrs[i] for i, g in enumerate(opts[0].param_groups) for p in g["params"]}
                    for i, p0 in enumerate(models[0].parameters()):
                        lr = lr_of[id(p0)]
                        if lr > 0:
                            momenta[i].mul_(beta).add_(anchor[i] - p0.float(), alpha=1.0 / lr)
                            anchor[i].add_(momenta[i], alpha=-alpha * lr)
                        else:
                            anchor[i].copy_(p0)
                    for m in models:
                        for i, p in enumerate(m.parameters()):
                            p.copy_(anchor[i])
                bufs = [list(m.buffers()) for m in models]
                if buffers == "average":
                    _mean_into(bufs)
                elif buffers == "broadcast":
                    for b in bufs[1:]:
                        for t, t0 in zip(b, bufs[0]):
                            t.copy_(t0)
                moms = [[o.state[p]["momentum_buffer"] for p in m.parameters()] for m, o in zip(models, opts)]
                if momentum == "average":
                    _mean_into(moms)
                elif momentum == "reset":
                    for ms in moms:
                        for t in ms:
                            t.zero_()
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
