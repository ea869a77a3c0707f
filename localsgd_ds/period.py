"""The state machine of local SGD, shared by K real workers (``hook.py``) and K virtual ones (``virtual.py``).

One counter of optimizer steps decides everything: the phase of the next step (``config.is_local_step``),
when to sync (``config.sync_due``: every H-th local step, counted from the switch), and where a SlowMo
period starts (the anchor x0 is re-taken from the live weights at its first local step). Each of the
two subclasses says what averaging means for it (``_sync``: an all-reduce across processes, or a mean
across stacked replicas) and which tensors a temporary average changes (``_averaged_changes``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from localsgd_ds.averaging import slowmo_step_
from localsgd_ds.config import LocalSGDConfig
from localsgd_ds.stats import CommStats

log = logging.getLogger("localsgd_ds")


class LocalSGDPeriods:
    """Counters, the SlowMo buffers and the stats; ``_sync`` and ``_averaged_changes`` are the subclass's."""

    def _init_periods(
        self,
        config: LocalSGDConfig,
        steps_per_epoch: int,
        params: Sequence[torch.Tensor],
        group_of: list[int],
    ) -> None:
        self.config = config
        self.steps_per_epoch = steps_per_epoch
        self.steps_done = 0
        """Optimizer steps done (never micro-batches)."""
        self.stats = CommStats()
        self._params = list(params)
        self._group_of = group_of  # each parameter's optimizer group, for SlowMo's per-group lr
        self._steps_since_sync = 0
        self._last_lrs: list[float] | None = None  # each group's lr at the last optimizer step taken
        # SlowMo: the anchor x0 (re-taken at the first local step of every period, so weights loaded after
        # the start are what it refers to) and the slow momentum u.
        self._slow_anchor: list[torch.Tensor] | None = None
        self._slow_momentum: list[torch.Tensor] | None = None

    @property
    def in_local_phase(self) -> bool:
        """Whether the next optimizer step is a local step (no gradient all-reduce)."""
        return self.config.is_local_step(self.steps_done, self.steps_per_epoch)

    @property
    def is_stale(self) -> bool:
        """Whether the workers' parameters may differ (local steps since the last sync)."""
        return self._steps_since_sync > 0

    # -- one optimizer step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def _before_step(self) -> tuple[bool, list[float]]:
        """Call just before an optimizer step: returns (whether it is local, the lrs it uses)."""
        local = self.in_local_phase
        if local and self.config.slowmo is not None and not self.is_stale:
            if self._slow_anchor is None:
                self._slow_anchor = [p.detach().float().clone() for p in self._params]
                self._slow_momentum = [torch.zeros_like(a) for a in self._slow_anchor]
            else:
                for x0, p in zip(self._slow_anchor, self._params, strict=True):
                    x0.copy_(p)
        return local, [float(group["lr"]) for group in self._optimizer_groups()]

    def _after_step(self, local: bool, lrs: list[float]) -> None:
        """Call just after an optimizer step: counts it and syncs when one is due."""
        self._last_lrs = lrs
        self.steps_done += 1
        if local:
            self._steps_since_sync += 1
            if self.config.sync_due(self.steps_done, self.steps_per_epoch):
                self._sync(forced=False)

    def _slowmo_(self) -> None:
        """The SlowMo outer step on freshly averaged parameters (each group's lr of the last step)."""
        cfg = self.config
        if cfg.slowmo is None or self._slow_anchor is None:
            return
        assert self._slow_momentum is not None and self._last_lrs is not None
        slowmo_step_(
            self._params,
            self._slow_anchor,
            self._slow_momentum,
            lrs=[self._last_lrs[g] for g in self._group_of],
            beta=cfg.slowmo.beta,
            alpha=cfg.slowmo.alpha,
        )

    # -- what the subclasses say ----------------------------------------------------------------------------

    def _optimizer_groups(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _sync(self, *, forced: bool, model_only: bool = False) -> None:
        """Average parameters (then SlowMo), buffers and optimizer state as the config says; ``model_only``
        skips SlowMo and the optimizer state (what ``averaged()`` needs)."""
        raise NotImplementedError

    def _averaged_changes(self) -> list[torch.Tensor]:
        """The tensors a sync of the model changes now (empty: nothing to average)."""
        raise NotImplementedError

    # -- forced syncs ---------------------------------------------------------------------------------------

    def sync(self) -> bool:
        """Average now, outside the H schedule (the next scheduled sync stays where it was).

        In the local phase this is a full sync (parameters, SlowMo, optimizer state and buffers per policy);
        in the mSGD phase the parameters are identical already and only buffers are synced. Returns whether
        parameters were averaged.
        """
        stale = self.is_stale
        if stale:
            log.info(
                "local_sgd: forced sync at step %d, %d local steps after the last one",
                self.steps_done,
                self._steps_since_sync,
            )
        self._sync(forced=True)
        return stale

    @contextlib.contextmanager
    def averaged(self, reason: str = "evaluation") -> Iterator[None]:
        """Hold the global average (parameters, and buffers per policy) inside the block, then put each
        worker's own state back, so evaluating or saving the average does not change training.

        Uses plain averaging (no SlowMo step) and a CPU copy of what it changes for the duration.
        """
        changes = self._averaged_changes()
        if not changes:
            yield
            return
        if self.is_stale:
            log.info(
                "local_sgd: averaging for %s at step %d (%d local steps since the last sync)",
                reason,
                self.steps_done,
                self._steps_since_sync,
            )
        saved = [t.detach().to("cpu", copy=True) for t in changes]
        steps_since_sync = self._steps_since_sync
        self._sync(forced=True, model_only=True)  # the optimizer state is not part of "the model"
        try:
            yield
        finally:
            with torch.no_grad():
                for t, s in zip(changes, saved, strict=True):
                    t.copy_(s)
            self._steps_since_sync = steps_since_sync

    # -- state ----------------------------------------------------------------------------------------------

    def _periods_state(self) -> dict[str, Any]:
        return {
            "step": self.steps_done,
            "steps_since_sync": self._steps_since_sync,
            "last_lrs": self._last_lrs,
            "stats": self.stats.as_dict(),
            "slowmo_anchor": None if self._slow_anchor is None else [t.cpu() for t in self._slow_anchor],
            "slowmo_momentum": None
            if self._slow_momentum is None
            else [t.cpu() for t in self._slow_momentum],
        }

    def _load_periods_state(self, state: Mapping[str, Any], device: torch.device) -> None:
        self.steps_done = int(state["step"])
        self._steps_since_sync = int(state.get("steps_since_sync", 0))
        self._last_lrs = state.get("last_lrs")
        self.stats = CommStats(**state.get("stats", {}))
        anchor, momentum = state.get("slowmo_anchor"), state.get("slowmo_momentum")
        if anchor is not None and self.config.slowmo is not None:
            self._slow_anchor = [a.to(device, torch.float32) for a in anchor]
            self._slow_momentum = [m.to(device, torch.float32) for m in momentum]
        else:
            self._slow_anchor = self._slow_momentum = None
