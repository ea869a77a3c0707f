"""K virtual workers in one process: the ``local_sgd`` block's semantics on K stacked model replicas.

A researcher without K GPUs can still see the trade-offs of local SGD: ``VirtualWorkers`` steps K replicas
(``stacked.py``: one wide network, the arithmetic of one model at batch K x B) exactly as K real workers
with the hook would be stepped. Before the switch every replica steps with the mean gradient of the K
replicas' batches (mSGD); after it each replica steps on its own batch and every H-th local step the
replicas are averaged, buffers and momentum per their policies, SlowMo if set. Gradient clipping is per
worker, BatchNorm statistics per replica (as per-GPU BatchNorm). The schedule, the SlowMo step, which
buffers are synced and which optimizer tensors are "momentum" are the hook's own functions; the mean over
replicas replaces the all-reduce, and ``stats`` count what K real workers would send::

    stacked = stack_replicas(model, K=16)
    optimizer = torch.optim.SGD(stacked.parameters(), lr=0.1, momentum=0.9)
    workers = VirtualWorkers(stacked, LocalSGDConfig.from_dict({"H": 8, "T": 0}), optimizer, steps_per_epoch=100)
    for images, labels in batches:                  # [K, B, C, H, W], [K, B]: replica r's batch at r
        logits = workers.forward(images)
        workers.backward(criterion(logits.flatten(0, 1), labels.flatten()) * K)   # each replica's own mean
        workers.step()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from localsgd_ds.averaging import slowmo_step_
from localsgd_ds.config import ConfigError, LocalSGDConfig
from localsgd_ds.flat import is_synced_buffer, optimizer_state_tensors
from localsgd_ds.stacked import StackedReplicas, replica_view
from localsgd_ds.stats import CommStats


@torch.no_grad()
def average_replicas_(tensors: list[torch.Tensor], K: int) -> int:
    """Replace every replica's copy by the mean over the K replicas, in place; integer tensors take the floor
    of the mean (as the hook's integer all-reduce). Returns the bytes one real worker would have sent."""
    sent = 0
    for t in tensors:
        if t.dim() == 0:  # one value shared by all replicas (num_batches_tracked): nothing differs
            sent += t.element_size()
            continue
        v = replica_view(t, K)
        mean = v.float().mean(0) if t.is_floating_point() else torch.div(v.sum(0), K, rounding_mode="floor")
        v.copy_(mean.to(t.dtype).expand_as(v))
        sent += v[0].numel() * t.element_size()
    return sent


@torch.no_grad()
def broadcast_replica0_(tensors: list[torch.Tensor], K: int) -> int:
    """Every replica takes replica 0's copy (the "broadcast" buffer policy)."""
    sent = 0
    for t in tensors:
        if t.dim():
            v = replica_view(t, K)
            v.copy_(v[:1].expand_as(v))
            sent += v[0].numel() * t.element_size()
    return sent


class VirtualWorkers:
    """K workers as K replicas of one stacked network: the engine's ``forward`` / ``backward`` / ``step()`` /
    ``global_steps`` and the hook's ``in_local_phase``, ``stats``, ``sync()``, ``averaged()``, ``state_dict()``."""

    def __init__(
        self,
        stacked: StackedReplicas,
        config: LocalSGDConfig,
        optimizer: torch.optim.Optimizer,
        *,
        steps_per_epoch: int,
        lr_scheduler: Any = None,
        gradient_clipping: float = 0.0,
        gradient_accumulation_steps: int = 1,
    ) -> None:
        if config.ranks_per_worker not in (1, "node"):
            raise ConfigError(
                "virtual workers: local_sgd.ranks_per_worker must be 1 (a replica is one worker)"
            )
        self.K = stacked.K
        self.config = config.resolve(self.K, local_size=1)
        self.module = stacked
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.steps_per_epoch = steps_per_epoch
        self.gradient_clipping = gradient_clipping
        self.gas = gradient_accumulation_steps
        self.global_steps = 0
        """Optimizer steps done (the hook's ``step`` counter; named as DeepSpeed's engine names it)."""
        self.stats = CommStats()
        self._micro = 0
        self._steps_since_sync = 0
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
        self._group_of = [i for i, group in enumerate(optimizer.param_groups) for _ in group["params"]]
        self._buffers = [b for b in stacked.buffers() if is_synced_buffer(b)]
        self._last_lrs: list[float] | None = None
        self._slow_anchor: list[torch.Tensor] | None = None
        self._slow_momentum: list[torch.Tensor] | None = None

    # -- the schedule (the hook's) --------------------------------------------------------------------------

    @property
    def in_local_phase(self) -> bool:
        return self.config.is_local_step(self.global_steps, self.steps_per_epoch)

    @property
    def is_stale(self) -> bool:
        return self._steps_since_sync > 0

    # -- training -------------------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss`` is the sum over replicas of each replica's mean loss (so each replica's gradient is that
        of its own mean loss, as on a real worker); scaled by 1 / gradient_accumulation_steps like DeepSpeed."""
        (loss / self.gas).backward()
        self._micro += 1

    @torch.no_grad()
    def step(self) -> None:
        """One optimizer step at the accumulation boundary (a no-op on the micro-batches before it)."""
        if self._micro % self.gas:
            return
        local = self.in_local_phase
        if local and self.config.slowmo is not None and not self.is_stale:
            self._take_anchor()
        grads = [p.grad for p in self._params if p.grad is not None]
        if not local:  # mSGD: every replica steps with the mean gradient (DeepSpeed's all-reduce)
            sent = average_replicas_(grads, self.K)
            self.stats.grad_allreduces += 1
            self.stats.grad_allreduce_bytes += sent
            self.stats.bytes_across_workers += sent
        if self.gradient_clipping > 0:
            self._clip_per_replica(grads)
        self._last_lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.global_steps += 1
        if local:
            self._steps_since_sync += 1
            if self.config.sync_due(self.global_steps, self.steps_per_epoch):
                self._sync(forced=False)

    def _clip_per_replica(self, grads: list[torch.Tensor]) -> None:
        """Each replica's gradient clipped by its own norm (``clip_grad_norm_`` per worker)."""
        squares = sum(replica_view(g, self.K).float().pow(2).sum(1) for g in grads)
        coef = (self.gradient_clipping / (squares.sqrt() + 1e-6)).clamp(max=1.0)
        for g in grads:
            replica_view(g, self.K).mul_(coef.to(g.dtype).unsqueeze(1))

    def _take_anchor(self) -> None:
        if self._slow_anchor is None:
            self._slow_anchor = [p.detach().float().clone() for p in self._params]
            self._slow_momentum = [torch.zeros_like(a) for a in self._slow_anchor]
        else:
            for x0, p in zip(self._slow_anchor, self._params, strict=True):
                x0.copy_(p)

    # -- syncs ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _sync(self, *, forced: bool, model_only: bool = False) -> None:
        cfg, stale, sent = self.config, self.is_stale, 0
        if stale:
            sent += average_replicas_(self._params, self.K)
            if not model_only and cfg.slowmo is not None and self._slow_anchor is not None:
                assert self._slow_momentum is not None and self._last_lrs is not None
                slowmo_step_(
                    self._params,
                    self._slow_anchor,
                    self._slow_momentum,
                    lrs=[self._last_lrs[g] for g in self._group_of],
                    beta=cfg.slowmo.beta,
                    alpha=cfg.slowmo.alpha,
                )
            if not model_only and cfg.momentum != "local":
                tensors = optimizer_state_tensors(self.optimizer, self._params)
                if cfg.momentum == "reset":
                    for t in tensors:
                        t.zero_()
                else:
                    sent += average_replicas_(tensors, self.K)
            self._steps_since_sync = 0
        if cfg.buffers == "average":
            sent += average_replicas_(self._buffers, self.K)
        elif cfg.buffers == "broadcast":
            sent += broadcast_replica0_(self._buffers, self.K)
        self.stats.bytes += sent
        self.stats.bytes_across_workers += sent
        self.stats.syncs += int(stale)
        self.stats.forced_syncs += int(stale and forced)

    def sync(self) -> bool:
        """Average now, outside the H schedule (as ``LocalSGD.sync``)."""
        stale = self.is_stale
        self._sync(forced=True)
        return stale

    @contextlib.contextmanager
    def averaged(self, reason: str = "evaluation") -> Iterator[None]:
        """Hold the replicas' average inside the block (parameters, and buffers per policy), then give each
        replica its own state back."""
        changes = (self._params if self.is_stale else []) + (
            self._buffers if self.config.buffers != "local" else []
        )
        saved = [t.detach().clone() for t in changes]
        steps_since_sync = self._steps_since_sync
        self._sync(forced=True, model_only=True)
        try:
            yield
        finally:
            with torch.no_grad():
                for t, s in zip(changes, saved, strict=True):
                    t.copy_(s)
            self._steps_since_sync = steps_since_sync

    # -- state ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "K": self.K,
            "step": self.global_steps,
            "steps_since_sync": self._steps_since_sync,
            "last_lrs": self._last_lrs,
            "stats": self.stats.as_dict(),
            "slowmo_anchor": self._slow_anchor,
            "slowmo_momentum": self._slow_momentum,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["K"] != self.K:
            raise ConfigError(f"checkpoint was made with {state['K']} virtual workers, this run has {self.K}")
        self.global_steps = int(state["step"])
        self._steps_since_sync = int(state["steps_since_sync"])
        self._last_lrs = state["last_lrs"]
        self.stats = CommStats(**state["stats"])
        self._slow_anchor, self._slow_momentum = state["slowmo_anchor"], state["slowmo_momentum"]
