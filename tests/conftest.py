"""Shared test setup: make the helper modules in tests/ importable and keep each process to one thread."""

from __future__ import annotations

import glob
import os
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _remove_deepspeed_shm_workspaces():
    """The `deepspeed` launcher sets LOCAL_SIZE, and DeepSpeed's CPU accelerator then maps a 69 MB
    /dev/shm workspace per rank that nobody removes; remove the ones this session's runs left."""
    start = time.time()
    yield
    for path in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
        try:
            if os.path.getmtime(path) >= start:
                os.unlink(path)
        except OSError:
            pass
