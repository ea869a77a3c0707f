"""Each rank's own file in a checkpoint: what differs between workers mid-period (local weights, buffers,
optimizer state), beside DeepSpeed's model file, which holds the global average.

Written under a temporary name and renamed, so a crash never leaves a partial file under the real name.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

log = logging.getLogger("localsgd_ds")

RANK_FILE = "local_sgd_rank{rank:05d}.pt"


def save_rank_file(tag_dir: str, rank: int, world_size: int, state: dict[str, Any]) -> None:
    """Write ``state`` as this rank's file of the checkpoint in ``tag_dir``."""
    os.makedirs(tag_dir, exist_ok=True)
    path = os.path.join(tag_dir, RANK_FILE.format(rank=rank))
    torch.save({"world_size": world_size, **state}, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_rank_file(tag_dir: str, rank: int, world_size: int) -> dict[str, Any] | None:
    """This rank's file of the checkpoint in ``tag_dir``, or None (with a warning) when there is none or it
    was written by a run of another size: every rank then resumes from the averaged model."""
    path = os.path.join(tag_dir, RANK_FILE.format(rank=rank))
    if not os.path.exists(path):
        log.warning("local_sgd: no %s; every rank resumes from the averaged model", path)
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["world_size"] != world_size:
        log.warning(
            "local_sgd: %s was written by a run of %d ranks (now %d); every rank resumes from the averaged model",
            path,
            state["world_size"],
            world_size,
        )
        return None
    return state
