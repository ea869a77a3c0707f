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
        logits = workers(images)                                     # [K, B, classes]
        workers.backward(criterion(logits.flatten(0, 1), labels.flatten()))   # the mean over all K x B
        workers.step()

``VirtualWorkers`` is also what the recipe uses in place of the DeepSpeed engine (``--virtual K``): it
answers the engine's calls (``backward``, ``step``, ``save_checkpoint``, ...) and ``workers.hook`` answers
the hook's (``step``, ``stats``, ``averaged()``, ...).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from localsgd_ds.config import ConfigError, LocalSGDConfig
from localsgd_ds.flat import is_synced_buffer, optimizer_state_tensors
from localsgd_ds.period import LocalSGDPeriods
from localsgd_ds.stacked import StackedReplicas, replica_view


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


class VirtualWorkers(LocalSGDPeriods):
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
        self.K, self.module, self.optimizer, self.lr_scheduler = stacked.K, stacked, optimizer, lr_scheduler
        self.gradient_clipping, self.gas = gradient_clipping, gradient_accumulation_steps
        self._micro = 0  # micro-batches seen: an optimizer step at every gradient_accumulation_steps-th
        self._init_periods(
            config.resolve(self.K, local_size=1),
            steps_per_epoch,
            [p for group in optimizer.param_groups for p in group["params"]],
            [i for i, group in enumerate(optimizer.param_groups) for _ in group["params"]],
        )
        self._buffers = [b for b in stacked.buffers() if is_synced_buffer(b)]

    @property
    def global_steps(self) -> int:
        """Optimizer steps done (the hook's ``step`` counter, named as DeepSpeed's engine names it)."""
        return self.steps_done

    def _optimizer_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    # -- training -------------------------------------------------------------------------------------------

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` ``[K, B, ...]`` (replica r's batch at r) -> outputs ``[K * B, ...]``, replica-major, so
        that a loss or an accuracy over all K x B samples reads as it does for one real worker's batch."""
        return self.module(images).flatten(0, 1)

    # -- what the recipe asks of a DeepSpeed engine ------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._params[0].device

    @property
    def hook(self) -> _HookView:
        """The hook's face of these workers: ``step`` (the counter), ``stats``, ``config``, ``averaged()``..."""
        return _HookView(self)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Replica 0's weights as the original network's state dict (inside ``averaged()``: the average)."""
        return self.module.replica_state_dict(0)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def gradient_accumulation_steps(self) -> int:
        return self.gas

    def save_checkpoint(
        self, save_dir: str, tag: str, client_state: Mapping[str, Any] | None = None, **_: Any
    ) -> None:
        """All K replicas' weights, buffers and optimizer state, the schedule's state and ``client_state``,
        in one file under ``save_dir/tag`` (written under a temporary name, then renamed)."""
        path = Path(save_dir) / str(tag) / "virtual_workers.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "local_sgd": self.state_dict(),
            "client_state": dict(client_state or {}),
        }
        torch.save(state, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)

    def load_checkpoint(self, load_dir: str, tag: str, **_: Any) -> tuple[str | None, dict[str, Any]]:
        path = Path(load_dir) / str(tag) / "virtual_workers.pt"
        if not path.exists():
            return None, {}
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_state_dict(state["local_sgd"])
        self._check_state_shapes(path)
        return str(path), state["client_state"]

    def _check_state_shapes(self, path: Path) -> None:
        """Optimizer and SlowMo state are loaded as saved (``torch.optim`` checks no shapes): one that does not
        have its parameter's shape (a checkpoint from before convolution weights were held OHWI on CPU)
        would be applied in the wrong element order. Refused instead."""
        slow = {"SlowMo anchor": self._slow_anchor or [], "SlowMo momentum": self._slow_momentum or []}
        names = {id(p): name for name, p in self.module.named_parameters()}
        for i, p in enumerate(self._params):
            found = {f"optimizer state {k!r}": t for k, t in self.optimizer.state.get(p, {}).items()}
            found.update({name: tensors[i] for name, tensors in slow.items() if tensors})
            for name, t in found.items():
                if isinstance(t, torch.Tensor) and t.dim() and t.shape != p.shape:
                    where = names.get(id(p), f"parameter {i}")
                    raise ConfigError(
                        f"{path}: {name} of {where} has shape {tuple(t.shape)}, the parameter {tuple(p.shape)}; "
                        "the checkpoint holds its tensors in another layout (written by an older localsgd-ds?): "
                        "start this run afresh or resume it with the version that wrote it"
                    )

    def backward(self, loss: torch.Tensor) -> None:
        """``loss`` is the mean over the K replicas of each replica's mean loss (the mean over all K x B
        samples): each replica gets the gradient of its own mean loss, as a real worker does. Scaled by
        1 / gradient_accumulation_steps, as DeepSpeed scales it."""
        (loss * (self.K / self.gas)).backward()
        self._micro += 1

    @torch.no_grad()
    def step(self) -> None:
        """One optimizer step at the accumulation boundary (a no-op on the micro-batches before it)."""
        if self._micro % self.gas:
            return
        local, lrs = self._before_step()
        grads = [p.grad for p in self._params if p.grad is not None]
        if not local:  # mSGD: every replica steps with the mean gradient (DeepSpeed's all-reduce)
            sent = average_replicas_(grads, self.K)
            self.stats.grad_allreduces += 1
            self.stats.grad_allreduce_bytes += sent
            self.stats.bytes_across_workers += sent
        if self.gradient_clipping > 0:
            self._clip_per_replica(grads)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # as DeepSpeed does: the next backward writes, not adds
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self._after_step(local, lrs)

    def _clip_per_replica(self, grads: list[torch.Tensor]) -> None:
        """Each replica's gradient clipped by its own norm (``clip_grad_norm_`` per worker)."""
        squares = sum(replica_view(g, self.K).float().pow(2).sum(1) for g in grads)
        coef = (self.gradient_clipping / (squares.sqrt() + 1e-6)).clamp(max=1.0)
        for g in grads:
            replica_view(g, self.K).mul_(coef.to(g.dtype).unsqueeze(1))

    # -- syncs ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _sync(self, *, forced: bool, model_only: bool = False) -> None:
        cfg, stale, sent = self.config, self.is_stale, 0
        if stale:
            sent += average_replicas_(self._params, self.K)
            if not model_only:
                self._slowmo_()
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

    def _averaged_changes(self) -> list[torch.Tensor]:
        return (self._params if self.is_stale else []) + (
            self._buffers if self.config.buffers != "local" else []
        )

    # -- state ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"K": self.K, **self._periods_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore counters and SlowMo buffers (``state_dict``'s), refusing another K."""
        if state["K"] != self.K:
            raise ConfigError(f"checkpoint was made with {state['K']} virtual workers, this run has {self.K}")
        self._load_periods_state(state, self.device)


class _HookView:
    """``VirtualWorkers`` seen as the hook (``LocalSGD``): the recipe reads the same attributes of both."""

    def __init__(self, workers: VirtualWorkers) -> None:
        self._workers = workers

    @property
    def step(self) -> int:
        return self._workers.steps_done

    def __getattr__(self, name: str) -> Any:  # config, stats, in_local_phase, steps_per_epoch, averaged, sync
        return getattr(self._workers, name)


OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def build_optimizer(block: Mapping[str, Any], params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The torch optimizer a DeepSpeed JSON's ``optimizer`` section describes (``{"type": "SGD", "params":
    {...}}``), over the stacked parameters: element-wise, so it steps every replica as its own optimizer."""
    kind = str(block.get("type", "")).lower()
    if kind not in OPTIMIZERS:
        raise ConfigError(
            f"virtual workers: optimizer.type must be one of {sorted(OPTIMIZERS)}, got {block.get('type')!r}"
        )
    kwargs = dict(block.get("params") or {})
    params = list(params)
    if "fused" not in kwargs and "foreach" not in kwargs:
        # One pass over K replicas' weights, gradients and state, with no temporaries: the unfused step
        # allocates a gradient-sized tensor per parameter for the weight decay, and at K x the model's size
        # those are fresh pages every step (ResNet-18, K = 16 on CPU: 0.4-1 s per step, fused 0.05-0.14). Same math.
        try:
            return OPTIMIZERS[kind](params, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
            pass
    return OPTIMIZERS[kind](params, **kwargs)


def stacked_batches(
    loaders: list[Iterable], *, pad_label: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Replica r's batch from ``loaders[r]`` (rank r of K's loader), stacked: ``images [K, B, ...]`` and
    ``labels [K * B]``. Training loaders give every rank the same number of equal batches. With
    ``pad_label`` (validation, where ranks hold shares that differ by a batch or a few images), a rank with
    fewer or smaller batches is padded with zero images labelled ``pad_label``, to be left out of counts."""
    iters = [iter(loader) for loader in loaders]
    while True:
        batches = [next(it, None) for it in iters]
        if all(b is None for b in batches):
            return
        if pad_label is None and any(b is None for b in batches):
            raise ValueError(
                "virtual workers: training loaders of the K ranks gave different numbers of batches"
            )
        real = [b for b in batches if b is not None]
        size = max(b[0].shape[0] for b in real)
        images, labels = [], []
        for b in batches:
            x, y = b if b is not None else (real[0][0][:0], real[0][1][:0])
            missing = size - x.shape[0]
            if missing:
                if pad_label is None:
                    raise ValueError("virtual workers: training batches of the K ranks differ in size")
                x = torch.cat([x, x.new_zeros((missing, *x.shape[1:]))])
                y = torch.cat([y, y.new_full((missing,), pad_label)])
            images.append(x)
            labels.append(y)
        yield torch.stack(images), torch.cat(labels)


def prefer_huge_pages() -> bool:
    """Ask torch to back CPU tensors of 2 MiB and more with transparent huge pages (its
    ``THP_MEM_ALLOC_ENABLE``). K replicas make every gradient and optimizer temporary K times the model's;
    glibc maps each such block afresh and the kernel faults it in 4 KiB at a time on every step (a 151 MB
    tensor: 36,904 faults; with huge pages 624). Virtual ResNet-18, K = 16 on CPU: 1.7-1.9x one model's
    step instead of 2.3-2.5x (README.md, K virtual workers). Torch reads the variable at its first CPU allocation,
    so call this before any tensor is made; a value already set is kept. Returns whether it set it."""
    if "THP_MEM_ALLOC_ENABLE" in os.environ:
        return False
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    return True


def init_single_process_group() -> None:
    """A process group of one (gloo, in memory): the recipe's collectives (the stop check, the evaluation
    counts, the checkpoint's rank states) then run unchanged in a virtual run, each a no-op."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
