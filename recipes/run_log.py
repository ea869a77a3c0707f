"""What a run records: one printed line and one ``metrics.jsonl`` record per epoch, and TensorBoard.

Rank 0 writes everything into the output folder; on other ranks every call does nothing. TensorBoard's x
axis is the optimizer step (after a resume, points past the checkpoint are purged, so curves never
double). Scalars (``TAGS``): rank 0's train loss and the lr every ``log_every`` steps; per epoch the train loss,
top-1/top-5, images/s, the epoch's seconds split into compute, data wait and communication (gradient
all-reduce in the mSGD phase, averaging in the local phase), syncs and bytes sent (split into the bytes
among a worker's own ranks and the bytes across workers: what crosses the slow link when a worker is a
node), and the phase, H, K and T. Also the resolved config as text, and the run's hyperparameters with
its latest accuracy and time in the HParams view, so the runs of a grid compare side by side::

    tensorboard --logdir runs        # one run per output folder

``describe`` is the run's first printed line, ``hparams_of`` its coordinates in the grid.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from train_config import RunConfig, method_name

from localsgd_ds import CommStats, LocalSGDConfig

STEP_TAGS = ("train/loss", "train/lr")
EPOCH_TAGS = (
    "train/epoch_loss",
    "val/top1",
    "val/top5",
    "perf/images_per_s",
    "time/epoch_s",
    "time/compute_s",
    "time/data_wait_s",
    "time/comm_s",
    "time/eval_s",
    "comm/syncs",
    "comm/bytes_sent",
    "comm/grad_allreduces",
    "comm/bytes_inside_workers",
    "comm/bytes_across_workers",
    "local_sgd/phase",
    "local_sgd/H",
    "local_sgd/K",
    "local_sgd/T",
)
HPARAM_METRICS = ("hparams/top1", "hparams/top5", "hparams/minutes")
TAGS = STEP_TAGS + EPOCH_TAGS + HPARAM_METRICS


@dataclass
class EpochMeter:
    """This rank's running sums over one epoch; saved in a mid-epoch checkpoint and restored with it."""

    epoch: int
    """The epoch being measured."""
    comm_at_start: CommStats = field(default_factory=CommStats)
    """A copy of the hook's cumulative communication counters when the epoch started."""
    batches: int = 0
    """Micro-batches trained so far (the loader's ``skip_batches`` on resume)."""
    loss_sum: float = 0.0
    """Sum of the micro-batch losses folded in so far (the live sum is a device tensor in the loop)."""
    data_seconds: float = 0.0
    """Seconds waiting for the next batch."""
    train_seconds: float = 0.0
    """Wall seconds of the training loop (data wait + compute + communication)."""

    @classmethod
    def start(cls, epoch: int, stats: CommStats) -> EpochMeter:
        return cls(epoch=epoch, comm_at_start=CommStats(**stats.as_dict()))

    def comm_since_start(self, stats: CommStats) -> CommStats:
        """What the hook counted since the epoch started: ``stats`` minus the counters at the start."""
        return CommStats(
            **{f.name: getattr(stats, f.name) - getattr(self.comm_at_start, f.name) for f in fields(stats)}
        )

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EpochMeter:
        return cls(**{**state, "comm_at_start": CommStats(**state["comm_at_start"])})


@dataclass(frozen=True)
class EpochRecord:
    """One epoch's numbers, as printed, written to ``metrics.jsonl`` and logged to TensorBoard."""

    epoch: int
    """Epoch number, from 1."""
    step: int
    """Optimizer steps done at the end of the epoch."""
    phase: str
    """"msgd" or "local": the phase of the epoch's last step."""
    lr: float
    """Learning rate at the end of the epoch (the one the next step uses)."""
    train_loss: float
    """Mean training loss over all workers and micro-batches of the epoch."""
    top1: float
    """Top-1 accuracy (%) of the averaged model on the whole validation set."""
    top5: float
    """Top-5 accuracy (%)."""
    images_per_s: float
    """Training images per second over all workers."""
    train_s: float
    """Wall seconds of the epoch's training loop (rank 0)."""
    compute_s: float
    """Of those, forward, backward and optimizer step: ``train_s - data_wait_s - comm_s``."""
    data_wait_s: float
    """Of those, waiting for the input pipeline."""
    comm_s: float
    """Of those, gradient all-reduce (mSGD phase) plus averaging (local phase)."""
    eval_s: float
    """Seconds of the evaluation."""
    syncs: int
    """Averagings during the epoch's training and evaluation (the scheduled ones, and the one that makes
    the evaluated model the global average: BatchNorm statistics even in the mSGD phase)."""
    bytes_sent: int
    """Bytes this rank put into collectives this epoch (gradient all-reduces + averaging):
    ``bytes_inside_workers + bytes_across_workers``."""
    grad_allreduces: int
    """Gradient all-reduces this epoch (one per mSGD step)."""
    minutes: float
    """Wall minutes of the run so far (training and evaluation, summed over resumes)."""
    bytes_inside_workers: int = 0
    """Of ``bytes_sent``, those among this rank's own worker's ranks (gradients on local steps, the
    in-worker half of a sync); 0 with one rank per worker."""
    bytes_across_workers: int = 0
    """Of ``bytes_sent``, those in collectives that span workers (mSGD gradients, syncs): what crosses
    the network between nodes when a worker is a node."""

    def line(self, epochs: int) -> str:
        return (
            f"epoch {self.epoch:>3}/{epochs} {self.phase:<5} | loss {self.train_loss:.4f} | "
            f"top1 {self.top1:6.2f} top5 {self.top5:6.2f} | {self.images_per_s:7.0f} img/s | "
            f"{self.train_s:6.1f}s (compute {self.compute_s:.1f}, data {self.data_wait_s:.1f}, "
            f"comm {self.comm_s:.1f}) eval {self.eval_s:.1f}s | {self.syncs} syncs, "
            f"{self.bytes_sent / 2**20:.1f} MiB{self._across()} | lr {self.lr:.4g}"
        )

    def _across(self) -> str:
        """With workers of several ranks, how much of the bytes crossed workers."""
        if not self.bytes_inside_workers:
            return ""
        return f" ({self.bytes_across_workers / 2**20:.1f} across workers)"


class RunLog:
    """Rank 0's printed lines, ``metrics.jsonl`` and TensorBoard events in the output folder."""

    def __init__(
        self,
        out_dir: Path,
        *,
        enabled: bool,
        purge_step: int | None,
        config: dict[str, Any],
        hparams: dict[str, Any],
        local_sgd: dict[str, Any],
        epochs: int,
    ) -> None:
        self.enabled = enabled
        self.epochs = epochs
        self.local_sgd = local_sgd
        self.writer = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = out_dir / "metrics.jsonl"
        self.writer = SummaryWriter(str(out_dir), purge_step=purge_step)
        text = json.dumps(config, indent=2)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), global_step=purge_step or 0)
        experiment, session_start, self._session_end = hparams_summary(
            hparams, {metric: math.nan for metric in HPARAM_METRICS}
        )
        for summary in (experiment, session_start):
            self.writer.file_writer.add_summary(summary)

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def step(self, step: int, loss: float, lr: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)

    def epoch(self, record: EpochRecord) -> None:
        if not self.enabled:
            return
        self.print(record.line(self.epochs))
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(asdict(record)) + "\n")
        T = self.local_sgd["T"]
        scalars = {
            "train/epoch_loss": record.train_loss,
            "val/top1": record.top1,
            "val/top5": record.top5,
            "perf/images_per_s": record.images_per_s,
            "time/epoch_s": record.train_s,
            "time/compute_s": record.compute_s,
            "time/data_wait_s": record.data_wait_s,
            "time/comm_s": record.comm_s,
            "time/eval_s": record.eval_s,
            "comm/syncs": record.syncs,
            "comm/bytes_sent": record.bytes_sent,
            "comm/grad_allreduces": record.grad_allreduces,
            "comm/bytes_inside_workers": record.bytes_inside_workers,
            "comm/bytes_across_workers": record.bytes_across_workers,
            "local_sgd/phase": 1.0 if record.phase == "local" else 0.0,
            "local_sgd/H": self.local_sgd["H"],
            "local_sgd/K": self.local_sgd["K"],
            "local_sgd/T": -1 if T is None else T,
            "hparams/top1": record.top1,
            "hparams/top5": record.top5,
            "hparams/minutes": record.minutes,
        }
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, record.step)
        self.writer.flush()

    def close(self, *, finished: bool) -> None:
        if self.writer is None:
            return
        if finished:
            self.writer.file_writer.add_summary(self._session_end)
        self.writer.close()


def describe(
    run: RunConfig, local_sgd: LocalSGDConfig, steps_per_epoch: int, num_classes: int, step: int
) -> str:
    """The run's first line: model, method, H, K, T, the batch arithmetic, the epoch length and the lr."""
    b, schedule = run.batch, run.train.lr_schedule
    lr = (
        "lr from DeepSpeed's scheduler"
        if schedule is None
        else f"peak lr {schedule.base_lr:g} x {b.global_batch} / {schedule.reference_batch} = "
        f"{schedule.peak_lr(b.global_batch):g}"
    )
    where = f"resuming at step {step}" if step else "from scratch"
    r = local_sgd.ranks_per_worker
    # Workers and ranks apart: the batch counts ranks (K workers x r ranks each).
    ranks = (
        f"{b.world_size} workers" if r == 1 else f"{b.world_size} ranks ({local_sgd.K} workers x {r} ranks)"
    )
    return (
        f"{run.train.model} {method_name(local_sgd)} H={local_sgd.H} K={local_sgd.K} T={local_sgd.T} | "
        f"batch {b.micro_batch} x {ranks} x {b.grad_accum} accumulation = {b.global_batch} | "
        f"{steps_per_epoch} steps/epoch x {run.train.epochs} epochs | {lr} | {num_classes} classes | {where}"
    )


def hparams_of(run: RunConfig, local_sgd: LocalSGDConfig, num_classes: int) -> dict[str, Any]:
    """The run's coordinates in the grid, for TensorBoard's HParams view (T = -1: never switches)."""
    schedule, slowmo = run.train.lr_schedule, local_sgd.slowmo
    return {
        "model": run.train.model,
        "method": method_name(local_sgd),
        "H": local_sgd.H,
        "K": local_sgd.K,
        "ranks_per_worker": local_sgd.ranks_per_worker,
        "T": -1 if local_sgd.T is None else local_sgd.T,
        "global_batch": run.batch.global_batch,
        "schedule": "deepspeed" if schedule is None else schedule.decay,
        "peak_lr": float("nan") if schedule is None else schedule.peak_lr(run.batch.global_batch),
        "warmup_epochs": float("nan") if schedule is None else schedule.warmup_epochs,
        "slowmo_beta": 0.0 if slowmo is None else slowmo.beta,
        "slowmo_alpha": 1.0 if slowmo is None else slowmo.alpha,
        "buffers": local_sgd.buffers,
        "momentum": local_sgd.momentum,
        "epochs": run.train.epochs,
        "num_classes": num_classes,
    }
