"""The run log splits the bytes into inside-worker and across-worker: the epoch record (from the hook's
CommStats over the epoch), metrics.jsonl, TensorBoard and the printed lines. One process, a gloo group of
one for the record's loss all-reduce; no engine."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

from run_log import EPOCH_TAGS, EpochMeter, RunLog, describe, hparams_of  # noqa: E402
from train_config import BatchConfig, RunConfig  # noqa: E402

from localsgd_ds import CommStats, LocalSGDConfig  # noqa: E402

# The keys metrics.jsonl had before the split: unchanged, in this order.
OLD_KEYS = [
    "epoch", "step", "phase", "lr", "train_loss", "top1", "top5", "images_per_s", "train_s", "compute_s",
    "data_wait_s", "comm_s", "eval_s", "syncs", "bytes_sent", "grad_allreduces", "minutes",
]  # fmt: skip
NEW_KEYS = ["bytes_inside_workers", "bytes_across_workers"]
STEPS_PER_EPOCH = 10


@pytest.fixture
def group_of_one(tmp_path):
    """A gloo process group of one rank (what epoch_record's all-reduce needs)."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def grad_allreduce(stats: CommStats, sent: int, *, inside_worker: bool) -> None:
    """What the hook counts for one gradient all-reduce (localsgd_ds/hook.py): in the local phase among
    the worker's ranks, in the mSGD phase over every rank."""
    if inside_worker:
        stats.worker_grad_allreduces += 1
        stats.bytes_inside_workers += sent
    else:
        stats.grad_allreduces += 1
        stats.grad_allreduce_bytes += sent
        stats.bytes_across_workers += sent


def sync(stats: CommStats, across: int, inside: int) -> None:
    """What the hook counts for one sync: the in-worker half and the part that crosses workers."""
    stats.syncs += 1
    stats.bytes += across + inside
    stats.bytes_inside_workers += inside
    stats.bytes_across_workers += across


def training(stats: CommStats, local_sgd: LocalSGDConfig, step: int, world_size: int) -> SimpleNamespace:
    """The parts of train_imagenet.Training that epoch_record reads."""
    return SimpleNamespace(
        local_sgd=SimpleNamespace(stats=stats, config=local_sgd, step=step),
        engine=SimpleNamespace(device="cpu", optimizer=SimpleNamespace(param_groups=[{"lr": 0.4}])),
        run=SimpleNamespace(batch=BatchConfig(micro_batch=32, grad_accum=1, world_size=world_size)),
        steps_per_epoch=STEPS_PER_EPOCH,
    )


def epoch_of(ranks_per_worker: int, T: int | None = 0):
    """Epoch 2 of a run of 2 workers x ``ranks_per_worker`` ranks, counted as the hook counts, and the
    epoch's CommStats difference: what came before the epoch must not show in its record. T = 0: local
    steps (gradients inside the worker, a sync every 5 steps); T = None: mSGD (gradients over every rank)."""
    from train_imagenet import epoch_record

    config = LocalSGDConfig(H=5 if T is not None else 1, K=2, T=T, ranks_per_worker=ranks_per_worker)
    grouped = ranks_per_worker > 1

    def one_step(step: int) -> None:
        if T is None:
            grad_allreduce(stats, 1000, inside_worker=False)
            return
        if grouped:
            grad_allreduce(stats, 1000, inside_worker=True)
        if step % 5 == 4:
            sync(stats, across=500, inside=250 if grouped else 0)

    stats = CommStats()
    for step in range(STEPS_PER_EPOCH):  # epoch 1
        one_step(step)
    meter = EpochMeter.start(1, stats)
    for step in range(STEPS_PER_EPOCH):  # epoch 2
        one_step(step)
    meter.batches, meter.loss_sum, meter.train_seconds = STEPS_PER_EPOCH, 12.5, 2.0
    t = training(stats, config, 2 * STEPS_PER_EPOCH, world_size=2 * ranks_per_worker)
    record = epoch_record(t, meter=meter, top1=50.0, top5=80.0, eval_s=1.0, minutes=0.5)
    return record, meter.comm_since_start(stats)


def test_the_record_splits_the_epochs_bytes(group_of_one):
    record, comm = epoch_of(ranks_per_worker=2)
    # Inside: 10 gradient all-reduces of 1000 bytes among the worker's ranks + 2 syncs' in-worker halves.
    assert record.bytes_inside_workers == 10 * 1000 + 2 * 250
    # Across: the 2 syncs' parts that cross workers (no mSGD step this epoch).
    assert record.bytes_across_workers == 2 * 500
    # bytes_sent is every collective of the epoch: the two parts add up to it, the in-worker gradient
    # all-reduces included (averaging + mSGD gradients alone would miss them).
    assert record.bytes_sent == record.bytes_inside_workers + record.bytes_across_workers == 11500
    assert comm.bytes + comm.grad_allreduce_bytes == 1500
    assert (record.syncs, record.grad_allreduces, record.phase) == (2, 0, "local")
    assert record.train_loss == pytest.approx(1.25)


def test_msgd_gradients_cross_workers(group_of_one):
    record, _ = epoch_of(ranks_per_worker=2, T=None)
    assert (record.phase, record.grad_allreduces, record.syncs) == ("msgd", 10, 0)
    assert (record.bytes_inside_workers, record.bytes_across_workers, record.bytes_sent) == (0, 10000, 10000)


def test_one_rank_per_worker_is_all_across_and_bytes_sent_is_unchanged(group_of_one):
    for T in (0, None):
        record, comm = epoch_of(ranks_per_worker=1, T=T)
        assert record.bytes_inside_workers == 0 and record.bytes_across_workers == record.bytes_sent > 0
        # What bytes_sent was before the split: averaging + mSGD gradient all-reduce bytes.
        assert record.bytes_sent == comm.bytes + comm.grad_allreduce_bytes


def test_metrics_and_tensorboard_carry_the_split(group_of_one, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    record, _ = epoch_of(ranks_per_worker=2)
    out = tmp_path / "run"
    log = RunLog(
        out,
        enabled=True,
        purge_step=None,
        config={"local_sgd": {"ranks_per_worker": 2}},
        hparams={"method": "local", "K": 2, "ranks_per_worker": 2},
        local_sgd={"H": 5, "K": 2, "T": 0},
        epochs=2,
    )
    log.epoch(record)
    log.epoch(dataclasses.replace(record, epoch=3, step=30, bytes_inside_workers=0, bytes_across_workers=7))
    log.close(finished=True)

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert list(lines[0]) == OLD_KEYS + NEW_KEYS  # the old keys unchanged, the new ones after them
    assert lines[0]["bytes_inside_workers"] + lines[0]["bytes_across_workers"] == lines[0]["bytes_sent"]

    assert {"comm/bytes_inside_workers", "comm/bytes_across_workers"} <= set(EPOCH_TAGS)
    events = EventAccumulator(str(out), size_guidance={"scalars": 0})
    events.Reload()
    assert {"comm/bytes_sent", "comm/bytes_inside_workers", "comm/bytes_across_workers"} <= set(
        events.Tags()["scalars"]
    )
    inside = [(e.step, e.value) for e in events.Scalars("comm/bytes_inside_workers")]
    across = [(e.step, e.value) for e in events.Scalars("comm/bytes_across_workers")]
    assert inside == [(20, 10500.0), (30, 0.0)] and across == [(20, 1000.0), (30, 7.0)]


def test_the_printed_line_says_what_crossed_workers(group_of_one):
    record, _ = epoch_of(ranks_per_worker=2)
    mib = 2**20
    record = dataclasses.replace(
        record, bytes_sent=3 * mib, bytes_inside_workers=2 * mib, bytes_across_workers=mib
    )
    assert "2 syncs, 3.0 MiB (1.0 across workers) | lr" in record.line(2)
    one_rank, _ = epoch_of(ranks_per_worker=1)
    assert "across workers" not in one_rank.line(2)  # one rank per worker: the line as before


def test_describe_counts_workers_and_ranks_apart():
    config = json.loads((ROOT / "ds_configs" / "cpu_postlocal.json").read_text())
    config["local_sgd"]["ranks_per_worker"] = 2
    run = RunConfig.from_dict(config, world_size=4)
    assert (run.local_sgd.K, run.local_sgd.ranks_per_worker, run.batch.global_batch) == (2, 2, 128)
    line = describe(run, run.local_sgd, STEPS_PER_EPOCH, 10, 0)
    assert "K=2" in line and "batch 32 x 4 ranks (2 workers x 2 ranks) x 1 accumulation = 128" in line
    assert "peak lr 0.4 x 128 / 64 = 0.8" in line
    assert hparams_of(run, run.local_sgd, 10)["ranks_per_worker"] == 2

    one = RunConfig.from_dict(
        json.loads((ROOT / "ds_configs" / "cpu_postlocal.json").read_text()), world_size=2
    )
    assert "batch 32 x 2 workers x 1 accumulation = 64" in describe(one, one.local_sgd, 5, 10, 0)
