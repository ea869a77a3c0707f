"""Local SGD by hand, in one process: K model replicas, each stepping on its rank's data, mean-gradient
steps before the switch and parameter averaging every H local steps after it. The slow, obvious version
that the real multi-process DeepSpeed runs must match."""

from __future__ import annotations

import copy

import torch
from tiny import batch, loss_fn, make_model, make_optimizer


def _mean_into(tensors_per_rank: list[list[torch.Tensor]]) -> None:
    for group in zip(*tensors_per_rank):
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
) -> list[dict[str, torch.Tensor]]:
    """Final state_dict of each replica after ``steps`` optimizer steps."""
    base = make_model(seed)
    models = [copy.deepcopy(base) for _ in range(K)]
    opts = [make_optimizer(m) for m in models]
    anchor = momenta = None
    for s in range(steps):
        local = switch is not None and s >= switch
        if local and slowmo is not None and anchor is None:
            # x0 = the weights at the switch (identical on all replicas), before the first local step
            anchor = [p.detach().float().clone() for p in models[0].parameters()]
            momenta = [torch.zeros_like(a) for a in anchor]
        for k, (m, o) in enumerate(zip(models, opts)):
            o.zero_grad(set_to_none=False)
            for micro in range(gas):
                x, y = batch(k, s, micro)
                (loss_fn(m(x), y) / gas).backward()
        if not local:
            _mean_into([[p.grad for p in m.parameters()] for m in models])
        for m, o in zip(models, opts):
            if clip > 0:
                _clip(list(m.parameters()), clip)
            o.step()
        if not local:
            continue
        if (s + 1 - switch) % H == 0:
            with torch.no_grad():
                _mean_into([list(m.parameters()) for m in models])
                if slowmo is not None:
                    beta, alpha = slowmo
                    lr = opts[0].param_groups[0]["lr"]
                    for i, p0 in enumerate(models[0].parameters()):
                        momenta[i].mul_(beta).add_(anchor[i] - p0.float(), alpha=1.0 / lr)
                        anchor[i].add_(momenta[i], alpha=-alpha * lr)
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
