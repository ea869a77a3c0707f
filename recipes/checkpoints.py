"""Checkpoints under ``<output-dir>/checkpoints``: one DeepSpeed tag per save, the last N kept.

A save never endangers the previous checkpoint: DeepSpeed writes the new tag's files, every rank waits
for every other, and only then does rank 0 point ``latest`` at the new tag (written to a temporary file
and renamed over the old one, which is atomic on POSIX file systems) and delete tags beyond ``keep_last``.
A crash at any moment leaves ``latest`` naming a complete checkpoint. The output directory must be
shared by all nodes (DeepSpeed's rank 0 writes the model, every rank writes its local-SGD state).

Beside DeepSpeed's files (weights, optimizer, the hook's state), a checkpoint's ``client_state`` holds where
training stands (``Progress``: the next epoch, the meter of an epoch under way, the minutes so far) and
every rank's RNG states and meter, so a resume mid-epoch continues exactly where the run stopped::

    save(engine, ckpt_dir, step=1251, client_state={...}, keep_last=3)   # collective
    tag = latest_tag(ckpt_dir)                                           # "step000001251" or None
    progress = restore(engine, lr_scheduler, ckpt_dir, tag)              # after deepspeed.initialize
"""

from __future__ import annotations

import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from run_log import EpochMeter

from localsgd_ds.config import ConfigError

TAG = "step{step:09d}"
TAG_PATTERN = re.compile(r"^step\d{9}$")


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag ``latest`` points at, or None when there is no complete checkpoint."""
    pointer = ckpt_dir / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if tag and (ckpt_dir / tag).is_dir() else None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine: Any, ckpt_dir: Path, *, step: int, client_state: dict[str, Any], keep_last: int) -> str:
    """Collective. Save a DeepSpeed checkpoint (the hook adds its state) tagged by the optimizer step."""
    tag = TAG.format(step=step)
    rank = dist.get_rank()
    current = latest_tag(ckpt_dir)
    if current == tag:  # nothing happened since that save (e.g. a signal right after resuming)
        return tag
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if (ckpt_dir / tag).exists():  # the remains of a save that crashed before `latest` moved
            shutil.rmtree(ckpt_dir / tag)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()  # every rank has written its part
    if rank == 0:
        _write_atomically(ckpt_dir / "latest", tag)
        # Tags after this one (left by a crashed save) are replaced when training gets there again.
        tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))
        for old in [t for t in tags if t <= tag][:-keep_last]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    dist.barrier()
    return tag


def tag_to_resume(ckpt_dir: Path, resume: bool) -> str | None:
    """The checkpoint ``--resume`` continues from; refuses to start over a folder that holds checkpoints."""
    tag = latest_tag(ckpt_dir)
    if tag is not None and not resume:
        raise SystemExit(
            f"{ckpt_dir} holds checkpoints: pass --resume to continue, or choose a new --output-dir"
        )
    if tag is None and resume and dist.get_rank() == 0:
        print(f"--resume: no checkpoint in {ckpt_dir}, starting from scratch", flush=True)
    return tag


@dataclass
class Progress:
    """Where training stands: the epoch to run, the meter of an epoch under way, wall minutes so far."""

    epoch: int = 0
    meter: EpochMeter | None = None
    minutes_before: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def minutes(self) -> float:
        return self.minutes_before + (time.perf_counter() - self.started) / 60

    def client_state(self, next_epoch: int, meter: EpochMeter | None, lr_scheduler: Any) -> dict[str, Any]:
        """Collective: what a checkpoint holds beside DeepSpeed's files."""
        return {
            "epoch": next_epoch,  # with meters: that epoch is under way, resume it after meter.batches
            "lr_scheduler": None if lr_scheduler is None else lr_scheduler.state_dict(),
            "minutes": self.minutes(),
            "ranks": gather_rank_states(meter),  # rank 0 writes client_state: every rank's meter and RNG
        }


def restore(engine: Any, lr_scheduler: Any, ckpt_dir: Path, tag: str) -> Progress:
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
