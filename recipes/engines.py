"""How a run's workers are built from its JSON: a DeepSpeed engine per process (the real thing), or K
virtual workers inside one process (``--virtual K``, localsgd_ds/virtual.py). Either gets the same
initial weights (the seed), the JSON's optimizer and the recipe's LR schedule in epochs."""

from __future__ import annotations

from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from train_config import RunConfig

from localsgd_ds import virtual
from localsgd_ds.config import ConfigError
from localsgd_ds.models import build_model
from localsgd_ds.schedules import EpochLRScheduler
from localsgd_ds.stacked import stack_replicas


def build_virtual(run: RunConfig, num_classes: int, steps_per_epoch: int, K: int):
    """K workers as K stacked replicas in this process, on the GPU if there is one: the same initial
    weights as a real run, the JSON's optimizer, the recipe's LR schedule, gradient clipping per worker."""
    cfg, ds = run.train, run.deepspeed
    for key in ("fp16", "bf16", "torch_autocast"):
        if (ds.get(key) or {}).get("enabled"):
            raise ConfigError(f"{key}.enabled = true: --virtual runs fp32 only; set it to false")
    if cfg.lr_schedule is None:
        raise ConfigError(
            "--virtual takes its learning rate from train.lr_schedule, not DeepSpeed's scheduler"
        )
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes=num_classes, zero_init_residual=cfg.zero_init_residual)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # stacked where it runs, for the images it trains on: the weights' layout follows (stacked.py)
    stacked = stack_replicas(model.to(device), K, image_size=cfg.data.image_size).to(device)
    optimizer = virtual.build_optimizer(ds["optimizer"], stacked.parameters())
    lr_scheduler = lr_schedule_factory(run, steps_per_epoch)(optimizer)
    workers = virtual.VirtualWorkers(
        stacked,
        run.local_sgd,
        optimizer,
        steps_per_epoch=steps_per_epoch,
        lr_scheduler=lr_scheduler,
        gradient_clipping=float(ds.get("gradient_clipping", 0.0)),
        gradient_accumulation_steps=run.batch.grad_accum,
    )
    return workers, lr_scheduler


def build_engine(run: RunConfig, num_classes: int, steps_per_epoch: int):
    """The DeepSpeed engine: the model on every worker with the same initial weights, DeepSpeed's
    optimizer built from the JSON's ``optimizer`` section, and the LR schedule DeepSpeed steps."""
    cfg = run.train
    check_precision(run.deepspeed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes=num_classes, zero_init_residual=cfg.zero_init_residual)
    channels_last = cfg.channels_last and get_accelerator().device_name() == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    engine, _, _, lr_scheduler = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=run.deepspeed,
        lr_scheduler=lr_schedule_factory(run, steps_per_epoch),
    )
    return engine, lr_scheduler, channels_last


def lr_schedule_factory(run: RunConfig, steps_per_epoch: int):
    """What deepspeed.initialize(lr_scheduler=...) gets: None when DeepSpeed's scheduler section is used."""
    schedule = run.train.lr_schedule
    if schedule is None:
        return None
    return lambda optimizer: EpochLRScheduler(
        optimizer,
        schedule,
        global_batch=run.batch.global_batch,
        steps_per_epoch=steps_per_epoch,
        epochs=run.train.epochs,
    )


def check_precision(ds_json: dict[str, Any]) -> None:
    """bf16 autocast only where the device has bf16 (the study's configs ask for it)."""
    autocast = ds_json.get("torch_autocast") or {}
    if autocast.get("enabled") and autocast.get("dtype", "bfloat16") in (
        "bfloat16",
        "bf16",
        "torch.bfloat16",
    ):
        if not get_accelerator().is_bf16_supported():
            raise ConfigError(
                f"torch_autocast.dtype = {autocast.get('dtype')!r} but this {get_accelerator().device_name()} "
                'device has no bf16: set "torch_autocast": {"enabled": false} for fp32'
            )
