"""The engine hook: turns a DeepSpeed data-parallel engine into mSGD, local SGD or post-local SGD.

Post-local SGD (Lin et al. 2020, "Don't use large mini-batches, use local SGD") runs mSGD for T epochs,
then lets each of the K workers step on its own and replaces their weights by the mean every H steps;
T = 0 is local SGD from the start, T = null never leaves mSGD. ``attach`` reads the ``local_sgd`` block of
the engine's DeepSpeed config and leaves the user's loop as DeepSpeed's own::

    local_sgd = localsgd_ds.attach(engine, steps_per_epoch=len(train_loader))
    for images, labels in train_loader:
        engine.backward(criterion(engine(images), labels))
        engine.step()                 # counts one optimizer step; averages when a sync is due
    with local_sgd.averaged():        # evaluate the global average without changing training
        evaluate(engine)

This is the one module that reaches into DeepSpeed (0.19) internals; each reach says why. The class keeps
the state machine (one step counter, the phase, when to sync); where the state lives is ``flat.py`` and
the math of a sync is ``averaging.py``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from localsgd_ds.averaging import average_, average_flat_
from localsgd_ds.config import ConfigError, LocalSGDConfig, check_engine, ds_config_dict
from localsgd_ds.flat import FlatLayout, optimizer_state_tensors
from localsgd_ds.period import LocalSGDPeriods
from localsgd_ds.rank_state import load_rank_file, save_rank_file
from localsgd_ds.workers import Workers, average_across_workers_, make_workers, node_size

log = logging.getLogger("localsgd_ds")

STATE_VERSION = 1


def _device_synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LocalSGD(LocalSGDPeriods):
    """Runs local SGD on one DeepSpeed engine. Build it with :func:`attach`.

    One counter, ``step`` (optimizer steps done), decides everything: the phase of the next step and when
    to sync (``period.py``). It goes into every checkpoint and comes back on resume.
    """

    def __init__(
        self,
        engine: Any,
        config: LocalSGDConfig,
        *,
        steps_per_epoch: int,
        allow_config_change: bool = False,
        workers: Workers | None = None,
    ) -> None:
        if not isinstance(steps_per_epoch, int) or isinstance(steps_per_epoch, bool) or steps_per_epoch < 1:
            raise ConfigError(f"steps_per_epoch must be an integer >= 1, got {steps_per_epoch!r}")
        if engine.mpu is not None or getattr(engine, "pipeline_parallelism", False):
            raise ConfigError(
                "local_sgd supports pure data parallelism only: this engine has model or pipeline parallelism"
            )
        optimizer = getattr(engine, "basic_optimizer", None)
        if optimizer is None:
            raise ConfigError(
                "local_sgd needs an engine with an optimizer (none was given to deepspeed.initialize)"
            )

        self.engine = engine
        self.allow_config_change = allow_config_change
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.workers = workers or make_workers(int(config.ranks_per_worker))
        self._bucket_bytes = int(config.bucket_mb * (1 << 20))
        self._scratch: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        # What the optimizer steps (at stage 0 in fp32 or autocast: the module's own fp32 parameters).
        self._optimizer = optimizer
        self._init_periods(
            config,
            steps_per_epoch,
            [p for group in optimizer.param_groups for p in group["params"]],
            [i for i, group in enumerate(optimizer.param_groups) for _ in group["params"]],
        )
        self._buffers = list(engine.module.buffers())
        self._device = self._params[0].device if self._params else torch.device("cpu")
        names = {id(t): n for n, t in engine.module.named_parameters(remove_duplicate=False)}
        self._layout = FlatLayout(
            self._params,
            self._buffers,
            buffer_policy=config.buffers,
            flatten=config.uses_local_phase,
            names=names,
        )

        # DeepSpeed internals, wrapped on this engine instance only (detach() puts them back):
        # - step: the one place that knows an optimizer step happened (global_steps moves on a boundary).
        # - allreduce_gradients: timed, for the mSGD communication share.
        # - clip_fp32_gradients: DeepSpeed's clip all-reduces the norm over the data-parallel group on every
        #   step; in the local phase each worker clips by its own norm instead (in mSGD the gradients are
        #   identical after the all-reduce, so the local norm equals DeepSpeed's global one).
        # - save_checkpoint / load_checkpoint: add the hook state and each rank's local state.
        self._originals: dict[str, Callable[..., Any]] = {}
        for name in (
            "step",
            "allreduce_gradients",
            "clip_fp32_gradients",
            "save_checkpoint",
            "load_checkpoint",
        ):
            self._originals[name] = getattr(engine, name)
            setattr(engine, name, getattr(self, f"_engine_{name}"))
        self._apply_phase()
        log.info(
            "local_sgd attached: H=%d K=%d T=%s (switch at step %s), buffers=%s, momentum=%s, slowmo=%s",
            config.H,
            config.K,
            config.T,
            config.switch_step(steps_per_epoch),
            config.buffers,
            config.momentum,
            config.slowmo,
        )

    @property
    def step(self) -> int:
        """Optimizer steps done: the one counter (``steps_done``)."""
        return self.steps_done

    def _optimizer_groups(self) -> list[dict[str, Any]]:
        return self._optimizer.param_groups

    def _apply_phase(self) -> None:
        # The engine's own switch for its gradient all-reduce in backward (what its 1-bit optimizers use).
        # Workers of several ranks keep it on: the wrapped all-reduce then averages inside the worker.
        self.engine.enable_backward_allreduce = not self.in_local_phase or self.workers.grouped

    # -- wrapped engine methods -------------------------------------------------------------------------------

    def _engine_step(self, *args: Any, **kwargs: Any) -> Any:
        if not self.engine.is_gradient_accumulation_boundary():  # a micro-batch inside accumulation
            return self._originals["step"](*args, **kwargs)
        before = self.engine.global_steps
        local, lrs = self._before_step()  # the lrs this step uses (the scheduler moves them on inside it)
        out = self._originals["step"](*args, **kwargs)
        if self.engine.global_steps != before:
            self._after_step(local, lrs)
            self._apply_phase()
        return out

    def _engine_allreduce_gradients(self, *args: Any, **kwargs: Any) -> Any:
        local = self.in_local_phase
        if not self.engine.is_gradient_accumulation_boundary():
            # DeepSpeed calls this on every micro-batch and reduces at the boundary only.
            return None if local else self._originals["allreduce_gradients"](*args, **kwargs)
        _device_synchronize(self._device)
        start = time.perf_counter()
        if local:  # only reached with workers of several ranks: the worker's mean gradient
            grads = [p.grad for p in self._params if p.grad is not None]
            sent = average_(
                grads,
                world_size=self.workers.ranks_per_worker,
                group=self.workers.worker_group,
                bucket_bytes=self._bucket_bytes,
                scratch=self._scratch,
            )
            out = None
        else:
            out = self._originals["allreduce_gradients"](*args, **kwargs)
            sent = sum(
                p.grad.numel() * p.grad.element_size()
                for p in self.engine.module.parameters()
                if p.grad is not None
            )
        _device_synchronize(self._device)
        seconds = time.perf_counter() - start
        if local:
            self.stats.worker_grad_allreduces += 1
            self.stats.bytes_inside_workers += sent
            self.stats.worker_grad_allreduce_seconds += seconds
        else:
            self.stats.grad_allreduces += 1
            self.stats.grad_allreduce_bytes += sent
            self.stats.grad_allreduce_seconds += seconds
            self.stats.bytes_across_workers += sent
        return out

    def _engine_clip_fp32_gradients(self) -> Any:
        if not self.in_local_phase:
            return self._originals["clip_fp32_gradients"]()
        return torch.nn.utils.clip_grad_norm_(
            self.engine.module.parameters(), self.engine.gradient_clipping()
        )

    def _engine_save_checkpoint(
        self, save_dir: str, tag: Any = None, client_state: Mapping | None = None, **kwargs: Any
    ) -> Any:
        tag = str(tag) if tag is not None else f"global_step{self.engine.global_steps}"
        self._save_rank_state(os.path.join(save_dir, tag))
        client_state = dict(client_state or {})
        client_state["local_sgd"] = self.state_dict()
        # The model file holds the global average (what one evaluates or exports); each rank's local
        # state sits beside it, so saving changes nothing in training.
        with self.averaged(reason="checkpoint"):
            return self._originals["save_checkpoint"](save_dir, tag=tag, client_state=client_state, **kwargs)

    def _engine_load_checkpoint(self, load_dir: str, tag: Any = None, **kwargs: Any) -> Any:
        load_path, client_state = self._originals["load_checkpoint"](load_dir, tag=tag, **kwargs)
        if load_path is None:
            return load_path, client_state
        state = (client_state or {}).get("local_sgd")
        if state is None:
            log.warning("checkpoint %s has no local_sgd state: the hook starts from step 0", load_path)
            self._slow_anchor = self._slow_momentum = None  # SlowMo starts afresh from these weights
        else:
            self.load_state_dict(state)
        self._load_rank_state(os.path.dirname(load_path))
        return load_path, client_state

    # -- syncs -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _sync(self, *, forced: bool, model_only: bool = False) -> None:
        """Average parameters (then the SlowMo step), buffers and optimizer state as the config says;
        ``model_only`` skips SlowMo and the optimizer state (what ``averaged()`` needs)."""
        _device_synchronize(self._device)
        start = time.perf_counter()
        sent = inside = 0
        stale = self.is_stale
        layout, workers = self._layout, self.workers
        if layout.moved():
            # Someone re-pointed parameter storage after attach (e.g. model.to(memory_format=...)).
            log.warning("local_sgd: parameters or buffers were moved after attach(); flattening them again")
            layout.layout()
        # The buffers outside the flat buffers (BatchNorm's integer counters) go first and travel alongside.
        finish_other_buffers = layout.start_other_buffers(self.world_size, self._bucket_bytes, self._scratch)
        if stale:
            if workers.grouped:
                # Float buffers differ between a worker's ranks: the worker's mean first, then the
                # parameters and buffers across workers, each rank its share (workers.py).
                inside += average_flat_(
                    layout.buffer_tails(), world_size=workers.ranks_per_worker, group=workers.worker_group
                )
                in_worker, across = average_across_workers_(layout.flats, workers)
                inside += in_worker
                sent += across
            else:
                # One in-place all-reduce per dtype: the parameters and, under "average", the float buffers.
                sent += average_flat_(layout.flats, world_size=self.world_size)
            sent += average_(
                layout.loose_params,
                world_size=self.world_size,
                bucket_bytes=self._bucket_bytes,
                scratch=self._scratch,
            )
            if not model_only:
                self._slowmo_()
            if not model_only:
                sent += self._sync_momentum()
            self._steps_since_sync = 0
        elif self.world_size > 1:
            # The parameters are identical already: only the buffer part of the flat buffers.
            sent += average_flat_(layout.buffer_tails(), world_size=self.world_size)
        sent += finish_other_buffers()
        _device_synchronize(self._device)
        self.stats.seconds += time.perf_counter() - start
        self.stats.bytes += sent + inside
        self.stats.bytes_inside_workers += inside
        self.stats.bytes_across_workers += sent
        self.stats.syncs += int(stale)
        self.stats.forced_syncs += int(stale and forced)

    def _sync_momentum(self) -> int:
        if self.config.momentum == "local":
            return 0
        tensors = optimizer_state_tensors(self._optimizer, self._params)
        if self.config.momentum == "reset":
            for t in tensors:
                t.zero_()
            return 0
        return average_(
            tensors, world_size=self.world_size, bucket_bytes=self._bucket_bytes, scratch=self._scratch
        )

    def _averaged_changes(self) -> list[torch.Tensor]:
        if self.world_size == 1:
            return []
        synced_buffers = self._layout.synced_buffers if self.config.buffers != "local" else []
        return (self._params if self.is_stale else []) + synced_buffers

    # -- state -----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything with a counter or a buffer (identical on all ranks; per-rank state goes to
        the checkpoint's rank files)."""
        cfg = self.config
        return {
            "version": STATE_VERSION,
            "H": cfg.H,
            "K": cfg.K,
            "T": cfg.T,
            "steps_per_epoch": self.steps_per_epoch,
            **self._periods_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore counters and SlowMo buffers. A checkpoint made with another H, K, T or epoch length is
        refused unless ``allow_config_change`` was given to :func:`attach`."""
        cfg = self.config
        theirs = {k: state.get(k) for k in ("H", "K", "T", "steps_per_epoch")}
        ours = {"H": cfg.H, "K": cfg.K, "T": cfg.T, "steps_per_epoch": self.steps_per_epoch}
        changed = {k: (theirs[k], ours[k]) for k in ours if theirs[k] != ours[k]}
        if changed:
            what = ", ".join(f"{k}: checkpoint {a!r} -> now {b!r}" for k, (a, b) in changed.items())
            if not self.allow_config_change:
                raise ConfigError(
                    f"checkpoint was made with a different local SGD setup ({what}); pass "
                    "allow_config_change=True to localsgd_ds.attach (recipe: --allow-config-change) to resume anyway"
                )
            log.warning("local_sgd: resuming with a changed setup (%s)", what)
        self._load_periods_state(state, self._device)
        if self.engine.global_steps != self.step:
            log.warning(
                "local_sgd: engine.global_steps = %d but the hook's step = %d; the hook's count rules",
                self.engine.global_steps,
                self.step,
            )
        self._apply_phase()

    def _save_rank_state(self, tag_dir: str) -> None:
        state: dict[str, Any] = {"step": self.step, "buffers": [b.detach().cpu() for b in self._buffers]}
        if self.is_stale:  # only then do the parameters differ from the averaged model file
            state["params"] = [p.detach().cpu() for p in self._params]
        if self.config.uses_local_phase:  # mid-period, every policy leaves the optimizer state local
            state["optimizer"] = self._optimizer.state_dict()
        save_rank_file(tag_dir, self.rank, self.world_size, state)

    @torch.no_grad()
    def _load_rank_state(self, tag_dir: str) -> None:
        state = load_rank_file(tag_dir, self.rank, self.world_size)
        if state is None:
            return
        for b, saved in zip(self._buffers, state["buffers"], strict=True):
            b.copy_(saved)
        for p, saved in zip(self._params, state.get("params", []), strict=False):
            p.copy_(saved)
        if "optimizer" in state:
            self._optimizer.load_state_dict(state["optimizer"])

    def detach(self) -> None:
        """Put the engine's own methods back and re-enable its gradient all-reduce."""
        for name, fn in self._originals.items():
            setattr(self.engine, name, fn)
        self._originals = {}
        self.engine.enable_backward_allreduce = True


def attach(
    engine: Any,
    *,
    steps_per_epoch: int,
    config: LocalSGDConfig | None = None,
    allow_config_change: bool = False,
) -> LocalSGD:
    """Hook ``engine`` for local SGD and return the hook; ``hook.config`` is the one validated config.

    ``config`` is the parsed ``local_sgd`` block (``LocalSGDConfig.from_dict``), for callers that parsed
    it already; by default it is read from the engine's DeepSpeed config. Either way ``K = "auto"`` is
    resolved against the world size here and the engine's settings are checked (:func:`check_engine`).
    ``steps_per_epoch`` is the number of optimizer steps (not micro-batches) in one epoch, the same on every
    rank; the switch to local SGD happens at step ``T x steps_per_epoch``.
    """
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if config is None:
        ds_config = ds_config_dict(engine)
        if "local_sgd" not in ds_config:
            raise ConfigError(
                'the DeepSpeed config has no "local_sgd" block; add one, e.g. "local_sgd": {"H": 8, "T": 0} '
                'for local SGD or "local_sgd": {"T": null} for plain mSGD'
            )
        config = LocalSGDConfig.from_dict(ds_config["local_sgd"])
    config = config.resolve(world_size, node_size() if config.ranks_per_worker == "node" else None)
    check_engine(engine, config)
    workers = make_workers(int(config.ranks_per_worker))
    return LocalSGD(
        engine,
        config,
        steps_per_epoch=steps_per_epoch,
        allow_config_change=allow_config_change,
        workers=workers,
    )
