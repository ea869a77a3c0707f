"""The ``local_sgd`` block of a DeepSpeed JSON, parsed once into frozen dataclasses.

The block sits beside DeepSpeed's own keys (DeepSpeed accepts and ignores an unknown top-level block)::

    "local_sgd": {"H": 8, "K": "auto", "T": 30, "buffers": "average", "momentum": "local",
                  "slowmo": {"beta": 0.5, "alpha": 1.0}}

``LocalSGDConfig.from_dict(block)`` validates every key and names the bad key and value in its error;
``check_engine(engine, config)`` asks an engine what it runs and refuses, by key, the DeepSpeed settings
under which no independent local model exists (ZeRO, DeepSpeed's fp16 and bf16 optimizers). Nothing here
imports DeepSpeed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

BUFFER_POLICIES = ("average", "broadcast", "local")
MOMENTUM_POLICIES = ("local", "average", "reset")


class ConfigError(ValueError):
    """A bad ``local_sgd`` block or a DeepSpeed setting the hook cannot run correctly."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): what every numeric config key takes."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_keys(block: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(block) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys are {list(known)}")


def resolve_ranks_per_worker(value: int | str, world_size: int, local_size: int | None) -> int:
    """The integer ``ranks_per_worker``: ``"node"`` is the launcher's local world size. Refuses, naming the
    key and the value, a size that does not divide the world or a "node" no launcher describes."""
    if value == "node":
        if local_size is None:
            raise ConfigError(
                'local_sgd.ranks_per_worker = "node" but no launcher set LOCAL_WORLD_SIZE (torchrun) or '
                "LOCAL_SIZE (deepspeed): launch with one of them or give the number of ranks per worker"
            )
        if world_size % local_size:
            raise ConfigError(
                f'local_sgd.ranks_per_worker = "node" = {local_size} ranks on this node, which does not divide '
                f"the world size {world_size}: every node must run the same number of ranks"
            )
        return local_size
    assert isinstance(value, int)
    if world_size % value:
        raise ConfigError(
            f"local_sgd.ranks_per_worker = {value} does not divide the world size {world_size}: "
            "every worker must have the same number of ranks"
        )
    return value


@dataclass(frozen=True)
class SlowMoConfig:
    """Slow momentum outer step at each sync (Wang et al. 2020, "SlowMo").

    ``u = beta * u + (x0 - x_avg) / lr;  x = x0 - alpha * lr * u``. ``beta = 0, alpha = 1`` is plain averaging.
    """

    beta: float = 0.0
    """Slow momentum coefficient, 0 <= beta < 1 (the study tried 0, 0.2, 0.5, 0.7)."""
    alpha: float = 1.0
    """Slow learning rate, > 0 (1.0 in the study)."""

    KEYS = ("beta", "alpha")

    @classmethod
    def from_dict(cls, block: Any) -> SlowMoConfig:
        if not isinstance(block, Mapping):
            raise ConfigError(
                f"local_sgd.slowmo must be null or an object with keys {list(cls.KEYS)}, got {block!r}"
            )
        _check_keys(block, cls.KEYS, "local_sgd.slowmo")
        beta = block.get("beta", 0.0)
        alpha = block.get("alpha", 1.0)
        if not is_number(beta) or not 0.0 <= beta < 1.0:
            raise ConfigError(f"local_sgd.slowmo.beta must be a number in [0, 1), got {beta!r}")
        if not is_number(alpha) or alpha <= 0.0:
            raise ConfigError(f"local_sgd.slowmo.alpha must be a number > 0, got {alpha!r}")
        return cls(beta=float(beta), alpha=float(alpha))


@dataclass(frozen=True)
class LocalSGDConfig:
    """What the hook does, read from the ``local_sgd`` block. Defaults are the reference code's."""

    H: int = 1
    """Local steps between two averagings (``sync_every``). Counts optimizer steps, never micro-batches."""
    K: int | str = "auto"
    """Number of workers; must equal the world size / ``ranks_per_worker``. ``"auto"`` takes that."""
    T: int | None = None
    """Epoch of the switch from mSGD to local SGD. 0: local SGD from the start; null: never (plain mSGD)."""
    buffers: str = "average"
    """BatchNorm statistics at a sync: "average" (integer buffers averaged in integer arithmetic),
    "broadcast" (rank 0's), or "local" (left alone)."""
    momentum: str = "local"
    """Optimizer state at a sync: "local" (as in the post-local SGD and SlowMo reference code),
    "average", or "reset" (zeroed)."""
    slowmo: SlowMoConfig | None = None
    """Slow momentum outer step at each sync; null for plain averaging."""
    bucket_mb: float = 25.0
    """Size bound, in MiB, of the buckets that tensors living in their own storage are copied into for
    averaging (optimizer state, integer buffers): one collective per bucket. The parameters and float
    buffers live in one flat buffer per dtype and are reduced in place, one collective per dtype."""

    ranks_per_worker: int | str = 1
    """Ranks that form one worker (consecutive ranks), or "node" (the launcher's local world size). Inside a
    worker gradients are averaged every step; across workers parameters every H local steps."""

    KEYS = ("H", "K", "T", "buffers", "momentum", "slowmo", "bucket_mb", "ranks_per_worker")

    @classmethod
    def from_dict(cls, block: Any, *, world_size: int | None = None) -> LocalSGDConfig:
        """Validate ``block`` (the ``local_sgd`` object); with ``world_size``, resolve and check ``K``."""
        if not isinstance(block, Mapping):
            raise ConfigError(f"local_sgd must be a JSON object, got {type(block).__name__}: {block!r}")
        _check_keys(block, cls.KEYS, "local_sgd")

        H = block.get("H", 1)
        if not _is_int(H) or H < 1:
            raise ConfigError(f"local_sgd.H must be an integer >= 1, got {H!r}")

        K = block.get("K", "auto")
        if K != "auto" and (not _is_int(K) or K < 1):
            raise ConfigError(f'local_sgd.K must be an integer >= 1 or "auto", got {K!r}')

        if "T" not in block and H > 1:
            raise ConfigError(
                f"local_sgd.H = {H} but local_sgd.T is missing: set T = 0 for local SGD from the start, "
                "T = <epoch> for post-local SGD, or T = null for plain mSGD"
            )
        T = block.get("T")
        if T is not None and (not _is_int(T) or T < 0):
            raise ConfigError(f"local_sgd.T must be an integer number of epochs >= 0 or null, got {T!r}")

        buffers = block.get("buffers", "average")
        if buffers not in BUFFER_POLICIES:
            raise ConfigError(f"local_sgd.buffers must be one of {list(BUFFER_POLICIES)}, got {buffers!r}")
        momentum = block.get("momentum", "local")
        if momentum not in MOMENTUM_POLICIES:
            raise ConfigError(
                f"local_sgd.momentum must be one of {list(MOMENTUM_POLICIES)}, got {momentum!r}"
            )

        slowmo_block = block.get("slowmo")
        slowmo = None if slowmo_block is None else SlowMoConfig.from_dict(slowmo_block)

        bucket_mb = block.get("bucket_mb", 25.0)
        if not is_number(bucket_mb) or bucket_mb <= 0:
            raise ConfigError(f"local_sgd.bucket_mb must be a number > 0, got {bucket_mb!r}")

        ranks_per_worker = block.get("ranks_per_worker", 1)
        if ranks_per_worker != "node" and (not _is_int(ranks_per_worker) or ranks_per_worker < 1):
            raise ConfigError(
                f'local_sgd.ranks_per_worker must be an integer >= 1 or "node", got {ranks_per_worker!r}'
            )

        config = cls(
            H=H,
            K=K,
            T=T,
            buffers=buffers,
            momentum=momentum,
            slowmo=slowmo,
            bucket_mb=float(bucket_mb),
            ranks_per_worker=ranks_per_worker,
        )
        return config if world_size is None else config.resolve(world_size)

    def resolve(self, world_size: int, local_size: int | None = None) -> LocalSGDConfig:
        """This config with ``ranks_per_worker`` made an integer (``local_size``: the launcher's ranks on this
        node, for "node") and ``K`` checked against (or, for "auto", set to) the number of workers. A "node"
        with no ``local_size`` is left as it is, for ``attach`` to resolve (it asks every rank)."""
        if self.ranks_per_worker == "node" and local_size is None:
            return self
        r = resolve_ranks_per_worker(self.ranks_per_worker, world_size, local_size)
        workers = world_size // r
        if self.K == "auto":
            return replace(self, K=workers, ranks_per_worker=r)
        if self.K != workers:
            if r == 1:
                raise ConfigError(
                    f"local_sgd.K = {self.K} but the data-parallel world size is {world_size}: "
                    f'launch {self.K} workers or set K to {world_size} (or "auto")'
                )
            raise ConfigError(
                f"local_sgd.K = {self.K} but world size {world_size} / ranks_per_worker {r} = {workers} "
                f'workers: set K to {workers} (or "auto") or change ranks_per_worker'
            )
        return replace(self, ranks_per_worker=r)

    @property
    def uses_local_phase(self) -> bool:
        """True when the run ever leaves mSGD."""
        return self.T is not None

    def switch_step(self, steps_per_epoch: int) -> int | None:
        """Global optimizer step of the first local step (``T x steps_per_epoch``), None for never."""
        return None if self.T is None else self.T * steps_per_epoch

    def is_local_step(self, step: int, steps_per_epoch: int) -> bool:
        """Whether optimizer step ``step`` (0-based) runs without gradient all-reduce."""
        switch = self.switch_step(steps_per_epoch)
        return switch is not None and step >= switch

    def sync_due(self, steps_done: int, steps_per_epoch: int) -> bool:
        """Whether to average after ``steps_done`` optimizer steps: every H-th local step, counted from the
        switch (so the first sync comes H steps after it)."""
        switch = self.switch_step(steps_per_epoch)
        return switch is not None and steps_done > switch and (steps_done - switch) % self.H == 0

    def to_dict(self) -> dict[str, Any]:
        """The resolved block (defaults filled in), as written into a run's output folder."""
        return asdict(self)


# DeepSpeed settings -----------------------------------------------------------------------------------------


def ds_config_dict(engine: Any) -> Mapping[str, Any]:
    # engine.config is whatever was passed to deepspeed.initialize (a dict or a path); the parsed dict is
    # on the DeepSpeedConfig object.
    if isinstance(engine.config, Mapping):
        return engine.config
    return engine._config._param_dict


def check_engine(engine: Any, config: LocalSGDConfig) -> None:
    """Refuse, by config key, what the engine actually runs when no independent local model exists.

    Asks the engine (ZeRO stage, fp16, bf16) rather than parsing the JSON, so legacy spellings such as
    ``"zero_optimization": true`` (ZeRO stage 1) are caught too. Plain mSGD (``T = null``) runs anything
    DeepSpeed runs.
    """
    if not config.uses_local_phase:
        return
    ds_config = ds_config_dict(engine)
    stage = int(engine.zero_optimization_stage() or 0)
    if stage >= 1:
        raw = ds_config.get("zero_optimization")
        key = (
            f"zero_optimization.stage = {stage}"
            if isinstance(raw, Mapping)
            else (f"zero_optimization = {json.dumps(raw)} (ZeRO stage {stage})")
        )
        raise ConfigError(
            f"{key} cannot run local SGD: ZeRO partitions the optimizer state (stage 2 also the gradients) so "
            "each rank updates only its shard and all-gathers the rest every step; no independent local model "
            "exists. Use stage 0, or set local_sgd.T = null for mSGD."
        )
    if engine.fp16_enabled():
        raise ConfigError(
            "fp16.enabled = true cannot run local SGD: DeepSpeed's fp16 optimizer all-reduces its overflow flag "
            "over all ranks on every step, which couples the workers in the local phase. "
            'Use "torch_autocast": {"enabled": true, "dtype": "float16"} (fp32 weights, a loss scaler per worker).'
        )
    if engine.bfloat16_enabled():
        key = "bf16" if "bf16" in ds_config else "bfloat16"
        raise ConfigError(
            f"{key}.enabled = true cannot run local SGD: DeepSpeed keeps bf16 weights with fp32 masters in a "
            "wrapper optimizer that either all-reduces an overflow check over all ranks every step (stage 0) or "
            "partitions the masters across ranks like ZeRO-1 (BF16_Optimizer); neither leaves a local model. "
            'Use "torch_autocast": {"enabled": true, "dtype": "bfloat16"} (fp32 weights, bf16 compute).'
        )
