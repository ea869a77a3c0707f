"""The recipe's slice of the DeepSpeed JSON: the ``train`` block, parsed once into frozen dataclasses.

One JSON file defines an experiment. DeepSpeed reads its own keys (batch, optimizer, precision), the hook
reads ``local_sgd``, and the recipe reads ``train``::

    {
      "train_micro_batch_size_per_gpu": 32,                    # B, images per worker per step
      "optimizer": {"type": "SGD", "params": {"momentum": 0.9, "weight_decay": 1e-4}},
      "local_sgd": {"H": 8, "K": 16, "T": 30},
      "train": {"model": "resnet50", "epochs": 90,
                "data": {"num_workers": 8, "image_size": 224},        # the loaders' options (DataConfig)
                "lr_schedule": {"base_lr": 0.1, "reference_batch": 256, "warmup_epochs": 5,
                                "decay": "step", "milestones": [30, 60, 80]}}
    }

``RunConfig.from_dict(ds_json, world_size=K)`` validates all three parts together (errors name the key and
the value); the ``local_sgd`` block parsed here is what the recipe hands to ``localsgd_ds.attach(config=...)``,
which checks it against the engine (ZeRO, fp16, bf16) and resolves it for good. ``RunConfig.resolved()`` is
the JSON written into the run's output folder. The learning rate has one home: ``train.lr_schedule`` (the
recipe's schedule in epochs) or DeepSpeed's own ``scheduler`` section, never both; with
``train.lr_schedule`` the optimizer's ``params.lr`` must be left out.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from localsgd_ds.config import ConfigError, LocalSGDConfig
from localsgd_ds.data import DataConfig
from localsgd_ds.models import MODELS
from localsgd_ds.schedules import LRScheduleConfig


def _int_at_least(block: Mapping[str, Any], key: str, default: Any, minimum: int, where: str) -> int:
    value = block.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{where}.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _bool(block: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    value = block.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}.{key} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class TrainConfig:
    """The ``train`` block: what the recipe trains and how it logs and checkpoints. Defaults: Goyal et al."""

    model: str = "resnet50"
    """Network: "resnet50", "resnet101" (torchvision, random init) or "resnet8" (small, for CPU runs)."""
    zero_init_residual: bool = True
    """Start the last BatchNorm gamma of every residual block at zero (each block starts as the identity)."""
    epochs: int = 90
    """Length of the run in epochs (one epoch = the training set once over all K workers)."""
    data: DataConfig = DataConfig()
    """The loaders' options (``train.data``): loader processes, crops, flips, validation resize and crop,
    validation batch; see ``localsgd_ds.data.DataConfig``."""
    lr_schedule: LRScheduleConfig | None = LRScheduleConfig()
    """Learning rate in epochs (scaling rule, warmup, decay); null when DeepSpeed's ``scheduler`` is used."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy loss (0 in Goyal et al.)."""
    channels_last: bool = True
    """Use the channels_last memory format on CUDA (faster convolutions with tensor cores); ignored on CPU."""
    seed: int = 0
    """Seed of the weight initialization (the same on every worker) and of the data order."""
    keep_last: int = 3
    """Number of checkpoints kept in ``<output-dir>/checkpoints`` (older ones are deleted after a save)."""
    log_every: int = 50
    """Optimizer steps between two points of the per-step TensorBoard curves (train loss, lr)."""

    KEYS = (
        "model",
        "zero_init_residual",
        "epochs",
        "data",
        "lr_schedule",
        "label_smoothing",
        "channels_last",
        "seed",
        "keep_last",
        "log_every",
    )

    @classmethod
    def from_dict(cls, block: Any, *, lr_schedule_default: bool = True) -> TrainConfig:
        """Validate the ``train`` block; ``lr_schedule_default=False`` when DeepSpeed's scheduler is in use."""
        where = "train"
        if not isinstance(block, Mapping):
            raise ConfigError(f"train must be an object with keys {list(cls.KEYS)}, got {block!r}")
        moved = [key for key in DataConfig.keys() if key in block]
        if moved:
            example = json.dumps({"data": {key: block[key] for key in moved}})
            raise ConfigError(
                f"train.{moved[0]} has moved to train.data.{moved[0]}: the loaders' options "
                f"{list(DataConfig.keys())} are the train.data block now; move {moved} there: "
                f'"train": {example}'
            )
        unknown = sorted(set(block) - set(cls.KEYS))
        if unknown:
            raise ConfigError(f"train: unknown key(s) {unknown}; known keys are {list(cls.KEYS)}")

        model = block.get("model", cls.model)
        if model not in MODELS:
            raise ConfigError(f"train.model must be one of {sorted(MODELS)}, got {model!r}")
        smoothing = block.get("label_smoothing", 0.0)
        if (
            not isinstance(smoothing, (int, float))
            or isinstance(smoothing, bool)
            or not 0.0 <= smoothing < 1.0
        ):
            raise ConfigError(f"train.label_smoothing must be a number in [0, 1), got {smoothing!r}")
        if "lr_schedule" in block and block["lr_schedule"] is not None:
            lr_schedule = LRScheduleConfig.from_dict(block["lr_schedule"])
        elif "lr_schedule" not in block and lr_schedule_default:
            lr_schedule = LRScheduleConfig()
        else:
            lr_schedule = None

        config = cls(
            model=model,
            zero_init_residual=_bool(block, "zero_init_residual", cls.zero_init_residual, where),
            epochs=_int_at_least(block, "epochs", cls.epochs, 1, where),
            data=DataConfig.from_dict(block.get("data", {}), where="train.data"),
            lr_schedule=lr_schedule,
            label_smoothing=float(smoothing),
            channels_last=_bool(block, "channels_last", cls.channels_last, where),
            seed=_int_at_least(block, "seed", cls.seed, 0, where),
            keep_last=_int_at_least(block, "keep_last", cls.keep_last, 1, where),
            log_every=_int_at_least(block, "log_every", cls.log_every, 1, where),
        )
        if config.lr_schedule is not None and config.lr_schedule.decay == "step":
            late = [m for m in config.lr_schedule.milestones if m >= config.epochs]
            if late:
                raise ConfigError(
                    f"train.lr_schedule.milestones {list(config.lr_schedule.milestones)} has epochs {late} "
                    f"at or after the end of the run (train.epochs = {config.epochs})"
                )
        return config

    def to_dict(self) -> dict[str, Any]:
        resolved = asdict(self)
        resolved["data"] = self.data.to_dict()
        resolved["lr_schedule"] = None if self.lr_schedule is None else self.lr_schedule.to_dict()
        return resolved


@dataclass(frozen=True)
class BatchConfig:
    """The batch arithmetic, read from DeepSpeed's own keys."""

    micro_batch: int
    """B: images per worker per micro-step (``train_micro_batch_size_per_gpu``)."""
    grad_accum: int
    """Micro-steps per optimizer step (``gradient_accumulation_steps``)."""
    world_size: int
    """K: number of workers."""

    @property
    def global_batch(self) -> int:
        """Images per optimizer step over all workers: B x K x gradient_accumulation_steps."""
        return self.micro_batch * self.world_size * self.grad_accum


@dataclass(frozen=True)
class RunConfig:
    """Everything one JSON file defines, validated together."""

    train: TrainConfig
    """The recipe's ``train`` block."""
    local_sgd: LocalSGDConfig
    """The hook's ``local_sgd`` block as parsed (K checked against the world size where it can be): what
    the recipe passes to ``attach``; after that the hook's ``config`` is the one in force."""
    batch: BatchConfig
    """B, K and gradient accumulation."""
    deepspeed: dict[str, Any]
    """The JSON as given to ``deepspeed.initialize`` (DeepSpeed's keys, ``local_sgd`` resolved, ``train``)."""

    @classmethod
    def from_dict(cls, ds_json: Mapping[str, Any], *, world_size: int) -> RunConfig:
        if not isinstance(ds_json, Mapping):
            raise ConfigError(f"the DeepSpeed config must be a JSON object, got {type(ds_json).__name__}")
        has_ds_scheduler = ds_json.get("scheduler") is not None
        train_block = ds_json.get("train", {})
        if (
            has_ds_scheduler
            and isinstance(train_block, Mapping)
            and train_block.get("lr_schedule") is not None
        ):
            raise ConfigError(
                "both train.lr_schedule and DeepSpeed's scheduler section are given: the learning rate must have "
                "one home; remove one of them"
            )
        train = TrainConfig.from_dict(train_block, lr_schedule_default=not has_ds_scheduler)

        optimizer = ds_json.get("optimizer")
        if not isinstance(optimizer, Mapping) or "type" not in optimizer:
            raise ConfigError(
                f'optimizer must be given, e.g. {{"type": "SGD", "params": {{"momentum": 0.9}}}}, got {optimizer!r}'
            )
        params = optimizer.get("params") or {}
        if train.lr_schedule is not None and "lr" in params:
            raise ConfigError(
                f"optimizer.params.lr = {params['lr']!r} is set, but the learning rate comes from "
                f"train.lr_schedule (base_lr = {train.lr_schedule.base_lr}); remove optimizer.params.lr"
            )

        micro = ds_json.get("train_micro_batch_size_per_gpu")
        if not isinstance(micro, int) or isinstance(micro, bool) or micro < 1:
            raise ConfigError(f"train_micro_batch_size_per_gpu must be an integer >= 1, got {micro!r}")
        accum = ds_json.get("gradient_accumulation_steps", 1)
        if not isinstance(accum, int) or isinstance(accum, bool) or accum < 1:
            raise ConfigError(f"gradient_accumulation_steps must be an integer >= 1, got {accum!r}")
        batch = BatchConfig(micro_batch=micro, grad_accum=accum, world_size=world_size)
        total = ds_json.get("train_batch_size")
        if total is not None and total != batch.global_batch:
            raise ConfigError(
                f"train_batch_size = {total!r} but train_micro_batch_size_per_gpu x world size x "
                f"gradient_accumulation_steps = {micro} x {world_size} x {accum} = {batch.global_batch}"
            )

        # Refused here, before any engine is built: a bad key or value, a K that is not the world size.
        # What the engine runs (ZeRO, fp16, bf16) is checked by attach(), which asks the engine.
        local_sgd = LocalSGDConfig.from_dict(ds_json.get("local_sgd", {"T": None}), world_size=world_size)

        deepspeed_json = copy.deepcopy(dict(ds_json))
        deepspeed_json["local_sgd"] = local_sgd.to_dict()
        deepspeed_json["train"] = train.to_dict()
        return cls(train=train, local_sgd=local_sgd, batch=batch, deepspeed=deepspeed_json)

    def resolved(self, local_sgd: LocalSGDConfig | None = None, **train_extra: Any) -> dict[str, Any]:
        """The JSON written into the output folder: the input with every default filled in, the ``local_sgd``
        block as the hook resolved it (``local_sgd``, when given) and facts found at the start in ``train``
        (``train_extra``, e.g. the number of classes)."""
        resolved = copy.deepcopy(self.deepspeed)
        if local_sgd is not None:
            resolved["local_sgd"] = local_sgd.to_dict()
        resolved["train"].update(train_extra)
        return resolved


def method_name(local_sgd: LocalSGDConfig) -> str:
    """ "msgd", "local" (local SGD from the start), "postlocal"; with "+slowmo" when SlowMo is on."""
    T = local_sgd.T
    name = "msgd" if T is None else "local" if T == 0 else "postlocal"
    return name + ("+slowmo" if local_sgd.slowmo is not None and T is not None else "")
