"""Learning-rate schedules in epochs: the linear scaling rule, linear warmup, then step decay or cosine.

The ImageNet recipe of Goyal et al. 2017 ("Accurate, Large Minibatch SGD"), which "Trade-offs of Local
SGD at Scale" builds on: the peak learning rate is ``base_lr x global batch / reference_batch``, reached
by a linear warmup over ``warmup_epochs`` that starts from ``base_lr``, then multiplied by ``gamma`` at
each milestone epoch (or annealed along a cosine). ``lr_at`` is a pure function of the (fractional) epoch;
``EpochLRScheduler`` is the small object DeepSpeed steps once per optimizer step, which turns steps into
epochs and writes the value into every parameter group::

    schedule = LRScheduleConfig.from_dict({"base_lr": 0.1, "warmup_epochs": 5, "milestones": [30, 60, 80]})
    lr_at(schedule, epoch=2.5, global_batch=1024)    # 0.1 + (0.4 - 0.1) * 2.5 / 5 = 0.25
    scheduler = EpochLRScheduler(optimizer, schedule, global_batch=1024, steps_per_epoch=1251, epochs=90)
    engine, *_ = deepspeed.initialize(..., optimizer=optimizer, lr_scheduler=scheduler)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from localsgd_ds.config import ConfigError, is_number

DECAYS = ("step", "cosine")


@dataclass(frozen=True)
class LRScheduleConfig:
    """The ``train.lr_schedule`` block. Defaults are the Goyal et al. ImageNet recipe, in epochs."""

    base_lr: float = 0.1
    """Learning rate at the reference batch (0.1 per 256 images in Goyal et al.)."""
    reference_batch: int = 256
    """Global batch at which ``base_lr`` applies; the peak is ``base_lr x global_batch / reference_batch``."""
    warmup_epochs: float = 5.0
    """Length of the linear warmup in epochs (0 for none); it ends at the peak learning rate."""
    warmup_start_lr: float | None = None
    """Learning rate at epoch 0 of the warmup; null means ``base_lr`` (Goyal et al.'s gradual warmup)."""
    decay: str = "step"
    """"step" (multiply by ``gamma`` at each milestone) or "cosine" (from the peak down to ``final_lr``)."""
    milestones: tuple[float, ...] = (30.0, 60.0, 80.0)
    """Epochs at which the step decay multiplies the learning rate by ``gamma`` (ignored by cosine)."""
    gamma: float = 0.1
    """Factor of each step decay."""
    final_lr: float = 0.0
    """Learning rate the cosine reaches at the last epoch (ignored by step decay)."""

    KEYS = (
        "base_lr",
        "reference_batch",
        "warmup_epochs",
        "warmup_start_lr",
        "decay",
        "milestones",
        "gamma",
        "final_lr",
    )

    @classmethod
    def from_dict(cls, block: Any, where: str = "train.lr_schedule") -> LRScheduleConfig:
        """Validate ``block``; every error names the key (prefixed by ``where``) and the bad value."""
        if not isinstance(block, Mapping):
            raise ConfigError(f"{where} must be an object with keys {list(cls.KEYS)}, got {block!r}")
        unknown = sorted(set(block) - set(cls.KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys are {list(cls.KEYS)}")
        values = {**asdict(cls()), **block}

        for key in ("base_lr", "gamma"):
            if not is_number(values[key]) or values[key] <= 0:
                raise ConfigError(f"{where}.{key} must be a number > 0, got {values[key]!r}")
        for key in ("warmup_epochs", "final_lr"):
            if not is_number(values[key]) or values[key] < 0:
                raise ConfigError(f"{where}.{key} must be a number >= 0, got {values[key]!r}")
        ref = values["reference_batch"]
        if not isinstance(ref, int) or isinstance(ref, bool) or ref < 1:
            raise ConfigError(f"{where}.reference_batch must be an integer >= 1, got {ref!r}")
        start = values["warmup_start_lr"]
        if start is not None and (not is_number(start) or start < 0):
            raise ConfigError(f"{where}.warmup_start_lr must be null or a number >= 0, got {start!r}")
        if values["decay"] not in DECAYS:
            raise ConfigError(f"{where}.decay must be one of {list(DECAYS)}, got {values['decay']!r}")
        milestones = values["milestones"]
        if not isinstance(milestones, (list, tuple)) or not all(is_number(m) and m > 0 for m in milestones):
            raise ConfigError(f"{where}.milestones must be a list of epochs > 0, got {milestones!r}")
        if list(milestones) != sorted(milestones):
            raise ConfigError(f"{where}.milestones must be increasing, got {milestones!r}")

        return cls(
            base_lr=float(values["base_lr"]),
            reference_batch=ref,
            warmup_epochs=float(values["warmup_epochs"]),
            warmup_start_lr=None if start is None else float(start),
            decay=values["decay"],
            milestones=tuple(float(m) for m in milestones),
            gamma=float(values["gamma"]),
            final_lr=float(values["final_lr"]),
        )

    def peak_lr(self, global_batch: int) -> float:
        """The linear scaling rule: ``base_lr x global_batch / reference_batch``."""
        return self.base_lr * global_batch / self.reference_batch

    def to_dict(self) -> dict[str, Any]:
        """The resolved block (defaults filled in), JSON-ready."""
        resolved = asdict(self)
        resolved["milestones"] = list(self.milestones)
        return resolved


def lr_at(
    schedule: LRScheduleConfig, epoch: float, *, global_batch: int, epochs: float | None = None
) -> float:
    """Learning rate at a (fractional) ``epoch``; ``epochs`` (the run's length) is needed by cosine only."""
    peak = schedule.peak_lr(global_batch)
    if epoch < schedule.warmup_epochs:
        start = schedule.base_lr if schedule.warmup_start_lr is None else schedule.warmup_start_lr
        return start + (peak - start) * epoch / schedule.warmup_epochs
    if schedule.decay == "step":
        return peak * schedule.gamma ** sum(epoch >= m for m in schedule.milestones)
    if epochs is None:
        raise ValueError("lr_at: the cosine schedule needs the run's length in epochs (epochs=...)")
    span = max(epochs - schedule.warmup_epochs, 1e-12)
    progress = min((epoch - schedule.warmup_epochs) / span, 1.0)
    return schedule.final_lr + (peak - schedule.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class EpochLRScheduler:
    """Sets ``lr_at(epoch)`` on every parameter group; DeepSpeed calls ``step()`` once per optimizer step.

    The optimizer step ``i`` (counted from 0) runs at epoch ``i / steps_per_epoch``. The counter is saved
    by DeepSpeed's checkpoint (``state_dict``) and checked against the hook's step counter on resume.
    """

    def __init__(
        self,
        optimizer: Any,
        schedule: LRScheduleConfig,
        *,
        global_batch: int,
        steps_per_epoch: int,
        epochs: float,
    ) -> None:
        if steps_per_epoch < 1:
            raise ValueError(f"EpochLRScheduler: steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.optimizer = optimizer
        self.schedule = schedule
        self.global_batch = global_batch
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.last_step = 0
        self._apply()

    def lr(self, step: int) -> float:
        """Learning rate of optimizer step ``step``."""
        return lr_at(
            self.schedule, step / self.steps_per_epoch, global_batch=self.global_batch, epochs=self.epochs
        )

    def _apply(self) -> None:
        value = self.lr(self.last_step)
        for group in self.optimizer.param_groups:
            group["lr"] = value

    def step(self) -> None:
        """Advance to the next optimizer step (DeepSpeed skips the call when fp16 overflows)."""
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_lr(self) -> list[float]:
        return self.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last_step = int(state["last_step"])
        self._apply()
