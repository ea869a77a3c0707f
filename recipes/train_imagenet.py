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

The file reads top-down as a run does: ``main`` (build, resume, loop over the epochs, finish), then
the pieces it calls, each given the ``Training`` it needs (what every epoch of the run shares).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from checkpoints import Progress, restore, tag_to_resume
from checkpoints import save as save_checkpoint
from deepspeed.accelerator import get_accelerator
from engines import build_engine, build_virtual
from preemption import StopSignal
from run_log import EpochMeter, EpochRecord, RunLog, describe, hparams_of
from train_config import RunConfig

import localsgd_ds
from localsgd_ds import data, runtime, virtual
from localsgd_ds.config import ConfigError
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
    parser.add_argument(
        "--virtual",
        type=int,
        default=None,
        metavar="K",
        help="run the experiment as K workers inside this one process, without a launcher, on the CPU or one "
        "GPU: K model replicas stepped exactly as K real workers (localsgd_ds/virtual.py)",
    )
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """One run: build, resume, loop over the epochs (train, evaluate, log, checkpoint), finish."""
    args = parse_args(argv)
    if args.virtual:  # K replicas' gradients are K x the model's: huge pages, before the first tensor
        virtual.prefer_huge_pages()
    # The process: this rank's share of the cores, and collectives that fail in time instead of stalling.
    threads = runtime.set_cpu_threads()
    if args.virtual:  # K workers in this process: the recipe's own collectives run on a group of one
        virtual.init_single_process_group()
    else:
        runtime.init_distributed(timeout_s=runtime.collective_timeout_s(args.collective_timeout))
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.basicConfig(
        level=logging.INFO if dist.get_rank() == 0 else logging.WARNING, format="%(name)s: %(message)s"
    )
    print_rank0(str(threads))

    # Build: the experiment (the JSON), the data's epoch length, the engine with the hook, the run's log.
    run = RunConfig.from_dict(
        json.loads(Path(args.deepspeed_config).read_text()), world_size=args.virtual or dist.get_world_size()
    )
    resume_tag = tag_to_resume(args.output_dir / "checkpoints", args.resume)
    with runtime.waiting_for("the start (engine, hook, resume)"):
        t = build(run, args)
        # Resume: weights, optimizer, the hook's state, LR schedule, RNG and any epoch under way, as saved.
        progress = restore(t.engine, t.lr_scheduler, t.ckpt_dir, resume_tag) if resume_tag else Progress()
    t.log = open_log(t, args.output_dir)

    # The epochs: train, evaluate the global average, log, checkpoint.
    for epoch in range(progress.epoch, run.train.epochs):
        # Train: the same number of steps on every worker; the hook averages when a sync is due.
        meter, progress.meter = progress.meter or EpochMeter.start(epoch, t.local_sgd.stats), None
        with runtime.waiting_for(
            lambda: f"step {t.local_sgd.step + 1}: gradient all-reduce, sync or stop check"
        ):
            stopping = train_one_epoch(t, meter=meter)
        if stopping:
            tag = checkpoint(t, progress, next_epoch=epoch, meter=meter)
            return stopped(t, f"at step {t.local_sgd.step}", tag)

        # Evaluate the global average of the workers' models on the whole validation set; log the epoch.
        with runtime.waiting_for(f"the evaluation after epoch {epoch + 1}"):
            t.log.epoch(evaluate_epoch(t, meter=meter, minutes=progress.minutes))

        # Checkpoint (the hook adds each worker's local state), then obey a signal that arrived meanwhile.
        tag = checkpoint(t, progress, next_epoch=epoch + 1)
        with runtime.waiting_for(f"the stop check after epoch {epoch + 1}"):
            stopping = t.stop.agreed()
        if stopping:
            return stopped(t, f"after epoch {epoch + 1}", tag)

    # Finish: the final model is the global average (forced if the last sync is not current).
    with runtime.waiting_for("the final average and the closing barrier"):
        with t.local_sgd.averaged(reason="the final model"):
            if t.rank == 0:
                model = t.engine.model_state_dict() if t.virtual else t.engine.module.state_dict()
                torch.save(model, args.output_dir / "final_model.pt")
        t.log.print(
            f"done: {run.train.epochs} epochs in {progress.minutes():.1f} min; tensorboard --logdir {args.output_dir}"
        )
        t.log.close(finished=True)
        dist.barrier()
    # Every rank is here together: end without waiting on anyone. A rank that raised never gets here (it
    # exits non-zero; destroying process groups the others may still wait in can hang).
    runtime.shutdown()
    return 0


@dataclass
class Training:
    """What every epoch of one run shares, built once by ``build``."""

    run: RunConfig
    """The experiment, from the JSON."""
    location: str
    """Where the shards are (``--data``)."""
    rank: int
    world_size: int
    num_classes: int
    steps_per_epoch: int
    """Optimizer steps per epoch, the same on every rank."""
    engine: Any
    """The DeepSpeed engine: the model, DeepSpeed's optimizer, the LR schedule it steps."""
    lr_scheduler: EpochLRScheduler | None
    """The recipe's LR schedule (None when DeepSpeed's ``scheduler`` section is used)."""
    local_sgd: localsgd_ds.LocalSGD
    """The hook; ``local_sgd.config`` is the validated, resolved ``local_sgd`` block."""
    channels_last: bool
    criterion: torch.nn.Module
    stop: StopSignal
    """SIGTERM / SIGINT, agreed on by all ranks where they meet anyway."""
    ckpt_dir: Path
    log: RunLog | None = None
    """Rank 0's lines, metrics.jsonl and TensorBoard; opened after the resume (``open_log``)."""
    virtual: int | None = None
    """K virtual workers in this process (``--virtual K``): ``engine`` is ``localsgd_ds.virtual.VirtualWorkers``
    and each batch holds the K ranks' batches."""

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per epoch: optimizer steps x gradient accumulation."""
        return self.steps_per_epoch * self.run.batch.grad_accum


def build(run: RunConfig, args: argparse.Namespace) -> Training:
    """Collective. The epoch length (from the training split's manifest, read once), the engine (model,
    DeepSpeed's optimizer from the JSON, the LR schedule) and the local SGD hook on it."""
    K, B = args.virtual, run.batch.micro_batch
    rank, world_size = (0, K) if K else (dist.get_rank(), dist.get_world_size())
    manifest = data.read_manifest(args.data, "train")
    # Every rank runs the same number of batches per epoch, by construction of the loader.
    batches = manifest.num_samples // (world_size * B)  # what data.steps_per_epoch computes
    steps_per_epoch = batches // run.batch.grad_accum  # optimizer steps
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the training split gives {batches} batches of {B} per worker, fewer than "
            f"gradient_accumulation_steps = {run.batch.grad_accum}: not one optimizer step per epoch"
        )
    if K:
        engine, lr_scheduler = build_virtual(run, manifest.num_classes, steps_per_epoch, K)
        local_sgd, channels_last = engine.hook, False
    else:
        engine, lr_scheduler, channels_last = build_engine(run, manifest.num_classes, steps_per_epoch)
        local_sgd = localsgd_ds.attach(
            engine,
            steps_per_epoch=steps_per_epoch,
            config=run.local_sgd,  # parsed once; attach checks it against the engine and resolves it
            allow_config_change=args.allow_config_change,
        )
    return Training(
        run=run,
        location=args.data,
        rank=rank,
        world_size=world_size,
        num_classes=manifest.num_classes,
        steps_per_epoch=steps_per_epoch,
        engine=engine,
        lr_scheduler=lr_scheduler,
        local_sgd=local_sgd,
        channels_last=channels_last,
        criterion=torch.nn.CrossEntropyLoss(label_smoothing=run.train.label_smoothing),
        stop=StopSignal(),
        ckpt_dir=args.output_dir / "checkpoints",
        virtual=K,
    )


def open_log(t: Training, output_dir: Path) -> RunLog:
    """The resolved config (``config.json``), TensorBoard and the run's first line, on rank 0."""
    config = t.local_sgd.config
    resolved = t.run.resolved(local_sgd=config, num_classes=t.num_classes)
    if t.rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
    log = RunLog(
        output_dir,
        enabled=t.rank == 0,
        purge_step=t.local_sgd.step + 1 if t.local_sgd.step else None,
        config=resolved,
        hparams=hparams_of(t.run, config, t.num_classes),
        local_sgd=config.to_dict(),
        epochs=t.run.train.epochs,
    )
    log.print(describe(t.run, config, t.steps_per_epoch, t.num_classes, t.local_sgd.step))
    return log


def train_one_epoch(t: Training, *, meter: EpochMeter) -> bool:
    """Train the rest of ``meter.epoch`` (from micro-batch ``meter.batches`` on); True if the ranks agreed
    to stop."""
    cfg, engine, local_sgd = t.run.train, t.engine, t.local_sgd
    loader = per_rank(
        t,
        lambda rank, options: data.train_loader(
            t.location,
            batch_size=t.run.batch.micro_batch,
            rank=rank,
            world_size=t.world_size,
            epoch=meter.epoch,
            seed=cfg.seed,
            skip_batches=meter.batches,
            config=options,
        ),
    )
    engine.train()
    # The loss sum stays on the device (no sync per step), in float64: exact for float32 losses, so a
    # sum split by a resume equals the uninterrupted one.
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    accum = engine.gradient_accumulation_steps()
    batch_iter = t.stop.shielded(loader)  # the loader's worker processes start with SIGTERM blocked
    start = time.perf_counter()
    try:
        while meter.batches < t.batches_per_epoch:
            wait = time.perf_counter()
            images, labels = next(batch_iter)
            meter.data_seconds += time.perf_counter() - wait

            images, labels = to_device(images, labels, engine.device, t.channels_last)
            loss = t.criterion(engine(images).float(), labels)
            engine.backward(loss)
            was_local, syncs = local_sgd.in_local_phase, local_sgd.stats.syncs
            engine.step()  # an optimizer step at every gradient accumulation boundary
            loss_sum += loss.detach()
            meter.batches += 1
            if meter.batches % accum:
                continue

            if local_sgd.step % cfg.log_every == 0:
                t.log.step(local_sgd.step, loss.item(), current_lr(engine))
            # The ranks meet after every mSGD step and every sync: only there do they agree to stop.
            if (not was_local or local_sgd.stats.syncs != syncs) and t.stop.agreed():
                return True
        return False
    finally:
        get_accelerator().synchronize()
        meter.train_seconds += time.perf_counter() - start
        meter.loss_sum += float(loss_sum)
        batch_iter.close()


def evaluate_epoch(t: Training, *, meter: EpochMeter, minutes: Callable[[], float]) -> EpochRecord:
    """Collective. Evaluate the global average, then the epoch's record; ``minutes()`` is the run's time."""
    start = time.perf_counter()
    with t.local_sgd.averaged(reason="evaluation"):
        top1, top5 = evaluate(t)
    return epoch_record(
        t, meter=meter, top1=top1, top5=top5, eval_s=time.perf_counter() - start, minutes=minutes()
    )


@torch.no_grad()
def evaluate(t: Training) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (%) over the whole validation set.

    Ranks may hold different numbers of validation batches: no collective inside the loop, the counts
    summed over ranks afterwards (``data.evaluate_counts``: a mean of counts, not of per-rank means).
    """
    engine = t.engine
    engine.eval()
    loader = per_rank(
        t,
        lambda rank, options: data.val_loader(
            t.location,
            batch_size=options.eval_batch_size or t.run.batch.micro_batch,
            rank=rank,
            world_size=t.world_size,
            config=options,
        ),
        pad_label=-1,  # virtual workers: ranks' shares differ by a few images; padding is not counted
    )
    counts = torch.zeros(3, dtype=torch.int64, device=engine.device)  # top-1 hits, top-5 hits, images
    batches = iter(loader)
    try:
        for images, labels in batches:
            images, labels = to_device(images, labels, engine.device, t.channels_last)
            logits = engine(images)
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(labels[:, None])
            counts[0] += hits[:, 0].sum()
            counts[1] += hits.any(dim=1).sum()
            counts[2] += (labels >= 0).sum()
    finally:
        batches.close()  # the loader's thread and worker processes end here, also after an error
    top1, top5, images = counts.tolist()
    top1, total = data.evaluate_counts(top1, images)
    top5, _ = data.evaluate_counts(top5, images)
    return 100.0 * top1 / total, 100.0 * top5 / total


def epoch_record(
    t: Training, *, meter: EpochMeter, top1: float, top5: float, eval_s: float, minutes: float
) -> EpochRecord:
    """Collective. The epoch's numbers: time split into compute, data wait and communication, and what
    was sent."""
    comm = meter.comm_since_start(t.local_sgd.stats)
    # averaging + gradient all-reduce (all ranks in mSGD, a worker's ranks in the local phase)
    comm_s = comm.seconds + comm.grad_allreduce_seconds + comm.worker_grad_allreduce_seconds
    loss = torch.tensor([meter.loss_sum, meter.batches], dtype=torch.float64, device=t.engine.device)
    dist.all_reduce(loss)  # the mean train loss over every worker's micro-batches
    steps = meter.batches // t.run.batch.grad_accum
    config, step = t.local_sgd.config, t.local_sgd.step
    return EpochRecord(
        epoch=meter.epoch + 1,
        step=step,
        phase="local" if config.is_local_step(step - 1, t.steps_per_epoch) else "msgd",
        lr=current_lr(t.engine),
        train_loss=float(loss[0] / loss[1]),
        top1=top1,
        top5=top5,
        images_per_s=steps * t.run.batch.global_batch / max(meter.train_seconds, 1e-9),
        train_s=meter.train_seconds,
        compute_s=max(meter.train_seconds - meter.data_seconds - comm_s, 0.0),
        data_wait_s=meter.data_seconds,
        comm_s=comm_s,
        eval_s=eval_s,
        syncs=int(comm.syncs),
        bytes_sent=int(comm.bytes_inside_workers + comm.bytes_across_workers),  # all collectives, split below
        grad_allreduces=int(comm.grad_allreduces),
        minutes=minutes,
        bytes_inside_workers=int(comm.bytes_inside_workers),
        bytes_across_workers=int(comm.bytes_across_workers),
    )


def checkpoint(t: Training, progress: Progress, *, next_epoch: int, meter: EpochMeter | None = None) -> str:
    """Collective. Save a checkpoint: DeepSpeed's files, the hook's state, ``progress`` and every rank's
    meter and RNG; with ``meter``, epoch ``next_epoch`` is under way and resumes after ``meter.batches``."""
    with runtime.waiting_for(f"the checkpoint at step {t.local_sgd.step}"):
        return save_checkpoint(
            t.engine,
            t.ckpt_dir,
            step=t.local_sgd.step,
            client_state=progress.client_state(next_epoch, meter, t.lr_scheduler),
            keep_last=t.run.train.keep_last,
        )


def stopped(t: Training, where: str, tag: str) -> int:
    """The end of a run stopped by a signal (every rank agreed, the checkpoint is saved)."""
    t.log.print(f"stopped by {t.stop.name} {where}: checkpoint {t.ckpt_dir / tag}; rerun with --resume")
    t.log.close(finished=False)
    runtime.shutdown()
    return PREEMPTED_EXIT_CODE


def per_rank(t: Training, loader: Callable[[int, Any], Any], *, pad_label: int | None = None):
    """This rank's loader; with K virtual workers, the K ranks' loaders stacked batch by batch (each with
    its share of the data-loading processes)."""
    if not t.virtual:
        return loader(t.rank, t.run.train.data)
    options = dataclasses.replace(t.run.train.data, num_workers=t.run.train.data.num_workers // t.virtual)
    return virtual.stacked_batches([loader(r, options) for r in range(t.virtual)], pad_label=pad_label)


def to_device(images, labels, device, channels_last: bool):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def current_lr(engine) -> float:
    return float(engine.optimizer.param_groups[0]["lr"])


def print_rank0(text: str) -> None:
    if dist.get_rank() == 0:
        print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
