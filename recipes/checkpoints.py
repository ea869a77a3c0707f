"""Checkpoints under ``<output-dir>/checkpoints``: one DeepSpeed tag per save, the last N kept.

A save never endangers the previous checkpoint: DeepSpeed writes the new tag's files, every rank waits
for every other, and only then does rank 0 point ``latest`` at the new tag (written to a temporary file
and renamed over the old one, which is atomic on POSIX file systems) and delete tags beyond ``keep_last``.
A crash at any moment leaves ``latest`` naming a complete checkpoint. The output directory must be
shared by all nodes (DeepSpeed's rank 0 writes the model, every rank writes its local-SGD state)::

    save(engine, ckpt_dir, step=1251, client_state={...}, keep_last=3)   # collective
    tag = latest_tag(ckpt_dir)                                           # "step000001251" or None
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

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
