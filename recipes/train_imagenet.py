"""Train an ImageNet ResNet with mSGD, local SGD or post-local SGD on the ``deepspeed`` launcher.

The recipe of "Trade-offs of Local SGD at Scale" (Gonzalez Ortiz et al. 2021) on the lineage of Goyal et
al. 2017. One DeepSpeed JSON defines the experiment (model, epochs, batch, optimizer, the ``local_sgd``
block, warmup and LR schedule; see ``ds_configs/README.md``); the command line only says where the data
and the outputs are. Each epoch trains the same number of steps on every worker, evaluates top-1/top-5 of
the global average on the whole validation set, prints one line, logs to TensorBoard and checkpoints.
SIGTERM (or Ctrl-C) checkpoints and stops; ``--resume`` continues to the same weights an uninterrupted
run reaches. Each rank computes with its share of the machine's cores (``OMP_NUM_THREADS`` overrides),
and a rank that waits more than ``--collective-timeout`` seconds (default 300) for the others in a
collective fails with a message that names it and what it waited for::

    # 8 GPUs on one machine (K = 8); on a machine without GPUs the same command starts 8 CPU workers
    deepspeed --num_gpus 8 recipes/train_imagenet.py --deepspeed_config ds_configs/<file>.json \\
        --data s3://bucket/imagenet --output-dir runs/<name>
    # K = 64: 8 machines x 8 GPUs, each line of `hosts` is "<hostname> slots=8"
    deepspeed --hostfile hosts recipes/train_imagenet.py \\
        --deepspeed_config ds_configs/resnet50_postlocal_H8_K64_T30.json \\
        --data s3://bucket/imagenet --output-dir runs/resnet50_postlocal_H8_K64_T30
    # after a preemption: the same command with --resume
    # 2 CPU workers on the small real dataset (python recipes/quickstart.py does all of it)
    deepspeed --num_gpus 2 recipes/train_imagenet.py --deepspeed_config ds_configs/cpu_postlocal.json \\
        --data quickstart_out/shards --output-dir quickstart_out/run

The optimizer is DeepSpeed's: ``"optimizer": {"type": "SGD", ...}`` builds ``torch.optim.SGD`` with the
section's params (momentum, nesterov, weight_decay); the learning rate comes from ``train.lr_schedule``
(an ``EpochLRScheduler`` that DeepSpeed steps once per optimizer step) or from DeepSpeed's own
``scheduler`` section, never both.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from checkpoints import latest_tag
from checkpoints import save as save_checkpoint
from deepspeed.accelerator import get_accelerator
from preemption import StopSignal
from run_log import EpochMeter, EpochRecord, RunLog
from train_config import RunConfig

import localsgd_ds
from localsgd_ds import data, runtime
from localsgd_ds.config import ConfigError
from localsgd_ds.models import build_model
from localsgd_ds.schedules import EpochLRScheduler

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: stopped on a signal, a checkpoint was saved; rerun with --resume


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--deepspeed_config", required=True, help="the experiment: a DeepSpeed JSON file")
    parser.add_argument(
        "--data", required=True, help="shard location: s3://bucket/prefix, a path, or http(s)://"
    )
    parser.add_argument(
        "--output-dir", required=True, type=Path, help="TensorBoard, checkpoints, config.json"
    )
    parser.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoints/latest")
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even if H, K, T or the epoch length changed",
    )
    parser.add_argument(
        "--collective-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long a rank waits for the others in a collective before it fails with a message naming "
        f"itself and what it waited for (default: ${runtime.COLLECTIVE_TIMEOUT_VARIABLE}, "
        f"else {runtime.DEFAULT_COLLECTIVE_TIMEOUT_S:g})",
    )
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = runtime.set_cpu_threads()  # this rank's share of the cores, before any heavy work
    runtime.init_distributed(timeout_s=runtime.collective_timeout_s(args.collective_timeout))
    code = train(args, threads)
    # Every rank got here together (a barrier, or the agreed stop): end without waiting on anyone. A rank
    # that raised skips this (destroying groups the others still wait in can hang) and exits non-zero.
    runtime.shutdown()
    return code


def train(args: argparse.Namespace, threads: runtime.ThreadChoice) -> int:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(name)s: %(message)s")
    print_rank0(str(threads))
    run = RunConfig.from_dict(json.loads(Path(args.deepspeed_config).read_text()), world_size=world_size)
    cfg, B = run.train, run.batch.micro_batch
    ckpt_dir = args.output_dir / "checkpoints"
    resume_tag = latest_tag(ckpt_dir)
    if resume_tag is not None and not args.resume:
        raise SystemExit(
            f"{ckpt_dir} holds checkpoints: pass --resume to continue, or choose a new --output-dir"
        )

    # Data: every worker runs the same number of steps per epoch, by construction of the loader.
    num_classes = data.read_manifest(args.data, "train").num_classes
    batches_per_epoch = data.steps_per_epoch(args.data, "train", batch_size=B, world_size=world_size)
    steps_per_epoch = batches_per_epoch // run.batch.grad_accum  # optimizer steps
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the training split gives {batches_per_epoch} batches of {B} per worker, fewer than "
            f"gradient_accumulation_steps = {run.batch.grad_accum}: not one optimizer step per epoch"
        )

    # Model, optimizer (DeepSpeed's, from the JSON), LR schedule, and the local SGD hook.
    with runtime.waiting_for("the start (engine, hook, resume)"):
        engine, lr_scheduler, channels_last = build_engine(run, num_classes, steps_per_epoch)
        local_sgd = localsgd_ds.attach(
            engine, steps_per_epoch=steps_per_epoch, allow_config_change=args.allow_config_change
        )
        stop = StopSignal()
        progress = Progress()
        if args.resume and resume_tag is not None:
            progress = resume(engine, lr_scheduler, ckpt_dir, resume_tag)
        elif args.resume:
            print_rank0(f"--resume: no checkpoint in {ckpt_dir}, starting from scratch")

    # The resolved config, TensorBoard and the per-epoch lines (rank 0).
    resolved = {**run.resolved(), "train": {**run.resolved()["train"], "num_classes": num_classes}}
    if rank == 0:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
    log = RunLog(
        args.output_dir,
        enabled=rank == 0,
        purge_step=local_sgd.step + 1 if local_sgd.step else None,
        config=resolved,
        hparams=hparams_of(run, num_classes),
        local_sgd=local_sgd.config.to_dict(),
        epochs=cfg.epochs,
    )
    log.print(describe(run, steps_per_epoch, num_classes, local_sgd.step))

    def checkpoint(next_epoch: int, meter: EpochMeter | None) -> str:
        with runtime.waiting_for(f"the checkpoint at step {local_sgd.step}"):
            client_state = {
                "epoch": next_epoch,  # with meters: that epoch is under way, resume it after meter.batches
                "lr_scheduler": None if lr_scheduler is None else lr_scheduler.state_dict(),
                "minutes": progress.minutes(),
                "ranks": gather_rank_states(meter),  # rank 0 writes client_state: every rank's meter, RNG
            }
            return save_checkpoint(
                engine, ckpt_dir, step=local_sgd.step, client_state=client_state, keep_last=cfg.keep_last
            )

    def stopped(where: str, tag: str) -> int:
        log.print(f"stopped by {stop.name} {where}: checkpoint {ckpt_dir / tag}; rerun with --resume")
        log.close(finished=False)
        return PREEMPTED_EXIT_CODE

    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    for epoch in range(progress.epoch, cfg.epochs):
        # Train: the same number of steps on every worker; the hook averages when a sync is due.
        meter = progress.meter or EpochMeter(epoch=epoch, comm_at_start=local_sgd.stats.as_dict())
        progress.meter = None
        loader = data.train_loader(
            args.data, batch_size=B, rank=rank, world_size=world_size, epoch=epoch, seed=cfg.seed,
            image_size=cfg.image_size, num_workers=cfg.num_workers, skip_batches=meter.batches,
            crop_scale=cfg.crop_scale, hflip=cfg.hflip,
        )  # fmt: skip
        batches = steps_per_epoch * run.batch.grad_accum
        with runtime.waiting_for(
            lambda epoch=epoch: (
                f"step {local_sgd.step + 1} (epoch {epoch + 1}): gradient all-reduce, sync or stop check"
            )
        ):
            stopping = train_one_epoch(
                engine, local_sgd, loader, criterion, meter, log, stop, batches, channels_last, cfg
            )
        if stopping:
            return stopped(f"at step {local_sgd.step}", checkpoint(epoch, meter))

        # Evaluate the global average of the workers' models on the whole validation set.
        eval_start = time.perf_counter()
        with runtime.waiting_for(f"the evaluation after epoch {epoch + 1}"):
            with local_sgd.averaged(reason="evaluation"):
                top1, top5 = evaluate(engine, run, args.data, channels_last)
            eval_s = time.perf_counter() - eval_start
            record = epoch_record(
                epoch, meter, local_sgd, run, engine, top1, top5, eval_s, progress.minutes()
            )
        log.epoch(record)

        # Checkpoint (the hook adds each worker's local state), then obey a signal that arrived meanwhile.
        tag = checkpoint(epoch + 1, None)
        with runtime.waiting_for(f"the stop check after epoch {epoch + 1}"):
            stopping = stop.agreed()
        if stopping:
            return stopped(f"after epoch {epoch + 1}", tag)

    # The final model is the global average (forced if the last sync is not current; the hook logs it).
    with runtime.waiting_for("the final average and the closing barrier"):
        with local_sgd.averaged(reason="the final model"):
            if rank == 0:
                torch.save(engine.module.state_dict(), args.output_dir / "final_model.pt")
        log.print(
            f"done: {cfg.epochs} epochs in {progress.minutes():.1f} min; tensorboard --logdir {args.output_dir}"
        )
        log.close(finished=True)
        dist.barrier()
    return 0


def train_one_epoch(
    engine, local_sgd, loader, criterion, meter, log, stop, batches, channels_last, cfg
) -> bool:
    """Train the rest of one epoch (up to ``batches`` micro-batches); True if the ranks agreed to stop."""
    engine.train()
    # The loss sum stays on the device (no sync per step), in float64: exact for float32 losses, so a
    # sum split by a resume equals the uninterrupted one.
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    accum = engine.gradient_accumulation_steps()
    batch_iter = stop.shielded(loader)  # the loader's worker processes start with SIGTERM blocked
    start = time.perf_counter()
    try:
        while meter.batches < batches:
            wait = time.perf_counter()
            images, labels = next(batch_iter)
            meter.data_seconds += time.perf_counter() - wait

            images, labels = to_device(images, labels, engine.device, channels_last)
            loss = criterion(engine(images).float(), labels)
            engine.backward(loss)
            was_local, syncs = local_sgd.in_local_phase, local_sgd.stats.syncs
            engine.step()  # an optimizer step at every gradient accumulation boundary
            loss_sum += loss.detach()
            meter.batches += 1
            if meter.batches % accum:
                continue

            if local_sgd.step % cfg.log_every == 0:
                log.step(local_sgd.step, loss.item(), current_lr(engine))
            # The ranks meet after every mSGD step and every sync: only there do they agree to stop.
            if (not was_local or local_sgd.stats.syncs != syncs) and stop.agreed():
                return True
        return False
    finally:
        get_accelerator().synchronize()
        meter.train_seconds += time.perf_counter() - start
        meter.loss_sum += float(loss_sum)
        batch_iter.close()


@torch.no_grad()
def evaluate(engine, run: RunConfig, location: str, channels_last: bool) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (%) over the whole validation set.

    Ranks may hold different numbers of validation batches: no collective inside the loop, one
    all-reduce of the counts afterwards (a mean of counts, not of per-rank means).
    """
    cfg = run.train
    engine.eval()
    loader = data.val_loader(
        location,
        batch_size=cfg.eval_batch_size or run.batch.micro_batch,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        resize=cfg.val_resize,
        crop=cfg.val_crop,
        num_workers=cfg.num_workers,
    )
    counts = torch.zeros(3, dtype=torch.float64, device=engine.device)  # top-1 hits, top-5 hits, images
    batches = iter(loader)
    try:
        for images, labels in batches:
            images, labels = to_device(images, labels, engine.device, channels_last)
            logits = engine(images)
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(labels[:, None])
            counts[0] += hits[:, 0].sum()
            counts[1] += hits.any(dim=1).sum()
            counts[2] += labels.numel()
    finally:
        batches.close()  # the loader's thread and worker processes end here, also after an error
    dist.all_reduce(counts)
    top1, top5, total = counts.tolist()
    return 100.0 * top1 / total, 100.0 * top5 / total


def epoch_record(epoch, meter, local_sgd, run, engine, top1, top5, eval_s, minutes) -> EpochRecord:
    """The epoch's numbers: time split into compute, data wait and communication, and what was sent."""
    now, then = local_sgd.stats.as_dict(), meter.comm_at_start
    delta = {key: now[key] - then[key] for key in now}
    comm_s = delta["seconds"] + delta["grad_allreduce_seconds"]  # averaging + gradient all-reduce
    loss = torch.tensor([meter.loss_sum, meter.batches], dtype=torch.float64, device=engine.device)
    dist.all_reduce(loss)  # the mean train loss over every worker's micro-batches
    steps = meter.batches // run.batch.grad_accum
    return EpochRecord(
        epoch=epoch + 1,
        step=local_sgd.step,
        phase="local"
        if run.local_sgd.is_local_step(local_sgd.step - 1, local_sgd.steps_per_epoch)
        else "msgd",
        lr=current_lr(engine),
        train_loss=float(loss[0] / loss[1]),
        top1=top1,
        top5=top5,
        images_per_s=steps * run.batch.global_batch / max(meter.train_seconds, 1e-9),
        train_s=meter.train_seconds,
        compute_s=max(meter.train_seconds - meter.data_seconds - comm_s, 0.0),
        data_wait_s=meter.data_seconds,
        comm_s=comm_s,
        eval_s=eval_s,
        syncs=int(delta["syncs"]),
        bytes_sent=int(delta["bytes"] + delta["grad_allreduce_bytes"]),
        grad_allreduces=int(delta["grad_allreduces"]),
        minutes=minutes,
    )


@dataclass
class Progress:
    """Where training stands: the epoch to run, the meter of an epoch under way, wall minutes so far."""

    epoch: int = 0
    meter: EpochMeter | None = None
    minutes_before: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def minutes(self) -> float:
        return self.minutes_before + (time.perf_counter() - self.started) / 60


def resume(engine, lr_scheduler, ckpt_dir: Path, tag: str) -> Progress:
    """Weights, optimizer and the hook's state from DeepSpeed's checkpoint; the rest from client_state."""
    _, state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_lr_scheduler_states=False)
    if lr_scheduler is not None and state["lr_scheduler"] is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    ranks, rank, world_size = state["ranks"], dist.get_rank(), dist.get_world_size()
    if len(ranks) != world_size and any(r["meter"] is not None for r in ranks):
        raise ConfigError(
            f"checkpoint {tag} stopped mid-epoch with {len(ranks)} workers; it resumes with {len(ranks)}, not {world_size}"
        )
    mine = ranks[rank % len(ranks)]
    set_rng_state(mine["rng"])
    meter = None if mine["meter"] is None else EpochMeter.from_state(mine["meter"])
    return Progress(epoch=state["epoch"], meter=meter, minutes_before=state["minutes"])


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


def to_device(images, labels, device, channels_last: bool):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def current_lr(engine) -> float:
    return float(engine.optimizer.param_groups[0]["lr"])


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


def gather_rank_states(meter: EpochMeter | None) -> list[dict[str, Any]]:
    """Collective: every rank's epoch meter and RNG states, indexed by rank."""
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    state = {"rng": rng, "meter": None if meter is None else meter.state_dict()}
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def hparams_of(run: RunConfig, num_classes: int) -> dict[str, Any]:
    """The run's coordinates in the grid, for TensorBoard's HParams view (T = -1: never switches)."""
    local, schedule, slowmo = run.local_sgd, run.train.lr_schedule, run.local_sgd.slowmo
    return {
        "model": run.train.model,
        "method": run.method(),
        "H": local.H,
        "K": local.K,
        "T": -1 if local.T is None else local.T,
        "global_batch": run.batch.global_batch,
        "schedule": "deepspeed" if schedule is None else schedule.decay,
        "peak_lr": float("nan") if schedule is None else schedule.peak_lr(run.batch.global_batch),
        "warmup_epochs": float("nan") if schedule is None else schedule.warmup_epochs,
        "slowmo_beta": 0.0 if slowmo is None else slowmo.beta,
        "slowmo_alpha": 1.0 if slowmo is None else slowmo.alpha,
        "buffers": local.buffers,
        "momentum": local.momentum,
        "epochs": run.train.epochs,
        "num_classes": num_classes,
    }


def describe(run: RunConfig, steps_per_epoch: int, num_classes: int, step: int) -> str:
    b, local, schedule = run.batch, run.local_sgd, run.train.lr_schedule
    lr = (
        "lr from DeepSpeed's scheduler"
        if schedule is None
        else f"peak lr {schedule.base_lr:g} x {b.global_batch} / {schedule.reference_batch} = "
        f"{schedule.peak_lr(b.global_batch):g}"
    )
    where = f"resuming at step {step}" if step else "from scratch"
    return (
        f"{run.train.model} {run.method()} H={local.H} K={local.K} T={local.T} | "
        f"batch {b.micro_batch} x {b.world_size} workers x {b.grad_accum} accumulation = {b.global_batch} | "
        f"{steps_per_epoch} steps/epoch x {run.train.epochs} epochs | {lr} | {num_classes} classes | {where}"
    )


def print_rank0(text: str) -> None:
    if dist.get_rank() == 0:
        print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
